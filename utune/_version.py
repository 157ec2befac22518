"""The one place the version lives (the package, the CLI, artifacts and the wheel read it)."""

__version__ = "0.2.0.dev0"
