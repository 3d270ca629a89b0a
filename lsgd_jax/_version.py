"""The package's version (one owner: the package root and the model file read it here)."""

__version__ = "0.1.0"
