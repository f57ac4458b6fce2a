"""The standard ScalarLens catalogue, shipped as an ordinary plugin.

It registers itself through the same ``scalarlens`` entry-point group as any third-party
plugin and uses only the public plugin contract (``scalarlens`` and ``scalarlens.hookspecs``).
"""

__version__ = "0.1.0"
