"""The version, in one place: the package, `--version`, provenance and cards read it from here."""

__version__ = "0.1.0"
