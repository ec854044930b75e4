"""The version of somad (its own module, so that no module imports the package itself for it)."""

__version__ = "0.11.0"
