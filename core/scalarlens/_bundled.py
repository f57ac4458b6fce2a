"""Names of the models shipped inside the package (no torch needed to know them).

The registry needs them to treat a plugin loader registered under a bundled name as a conflict,
and must not import the model code (and torch) to do so.
"""

BUNDLED_MODELS: tuple[str, ...] = ("tiny-induction",)
