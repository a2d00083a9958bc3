"""patchline: nightly rebuilds of industrial visual anomaly-detection models, one per product line."""

__version__ = "0.1.0"
