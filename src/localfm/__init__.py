"""localfm: Local Flow Matching generative models."""
__version__ = "0.1.0"
