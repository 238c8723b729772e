"""tomd: a headless Target and Observation Manager."""
__version__ = "0.1.0"
