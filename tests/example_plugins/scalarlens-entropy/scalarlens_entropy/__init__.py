"""ScalarLens example plugin ``entropy``: attention entropy per head and query token."""

__version__ = "0.1.0"
