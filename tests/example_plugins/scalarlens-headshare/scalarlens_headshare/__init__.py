"""ScalarLens example plugin ``headshare``: each head's share of its layer's write norm."""

__version__ = "0.1.0"
