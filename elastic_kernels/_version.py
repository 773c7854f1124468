"""The package version (one place: pyproject.toml reads it, the package face re-exports it)."""
__version__ = "0.1.0"
