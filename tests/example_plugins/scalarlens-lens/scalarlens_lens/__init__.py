"""ScalarLens example plugin ``lens``: a logit lens of the objective."""

__version__ = "0.1.0"
