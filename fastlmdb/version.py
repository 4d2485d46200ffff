"""The one version string: setup.cfg reads it, and any module may import it (the package's
``__init__`` re-exports it) without importing the package's lazy names."""

__version__ = "0.1.0"
