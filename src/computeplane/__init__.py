"""computeplane: a GPU compute control plane serving fal's Compute Instances API."""

__version__ = "0.1.0"
