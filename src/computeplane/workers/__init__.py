"""Background loops: provisioning deadlines, node heartbeats and record expiry.

Every step claims its rows under a lease, works with no transaction open and applies its
result only while the lease token still matches, so any number of worker processes can run.
"""
