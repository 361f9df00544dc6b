"""The package version, recorded in every file lrc writes."""

__version__ = "0.1.0"
