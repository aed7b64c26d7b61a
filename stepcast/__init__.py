"""stepcast: a serving layer for slow generative models."""

__version__ = "0.1.0"
