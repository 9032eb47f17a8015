"""The node agent: syncs desired instances from the control plane and runs them.

The agent talks to the control plane only over HTTP, because it runs on GPU hosts; it never
imports ``computeplane.store`` or ``computeplane.services``.
"""
