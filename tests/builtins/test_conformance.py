"""The builtins pass the same conformance kit that third-party plugins run."""

from scalarlens.testing import conformance_tests

test_builtins_conform = conformance_tests("builtins")
