"""qpipe: recipe-driven quantization pipeline (calibrate -> quantize -> export -> eval -> smoke)."""

__version__ = "0.1.0"
