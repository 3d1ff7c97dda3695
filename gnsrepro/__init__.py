"""gnsrepro: per-layer-type gradient noise scale from per-example gradient norms, while training."""

__version__ = "0.1.0"
