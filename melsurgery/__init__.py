"""melsurgery: find and fix massive activations (the Massive Emergence Layer) in decoder checkpoints."""

__version__ = "0.1.0"
