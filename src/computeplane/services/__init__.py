"""Business rules: authentication, placement, idempotency, instances, nodes and agents."""
