"""The package version, in a leaf module: records and model files stamp it from any layer without
importing the package's public facade (``lorex/__init__.py`` imports the model store)."""

__version__ = "0.1.0"
