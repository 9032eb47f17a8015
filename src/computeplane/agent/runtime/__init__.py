"""Runtimes start and stop instances on one node behind the ``Runtime`` interface."""
