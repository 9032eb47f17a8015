"""The ``computeplane`` command line."""
