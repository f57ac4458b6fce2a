"""Every DST of this plugin honours the ScalarLens contract (scalarlens.testing).

Examples come from the plugin's ``scalarlens_dst_examples`` hook: node = neuron 0 of layer 0 at
the last token, valid on whatever model the kit uses.
"""

from scalarlens.testing import conformance_tests

# The SAE edges read scalarlens-sae's DSTs by name, so the kit's registry keeps that plugin too.
test_contract = conformance_tests("circuits", with_plugins=("sae",))
