"""SAE edges against brute force in the real model (float64, tiny random GPT-2, random SAE).

As ``test_edges.py``: the oracle perturbs one write inside an ordinary run, holds fixed what
the edge's linearisation holds fixed, and takes a central difference of the downstream
attribution.  The SAE's latents in a perturbed run come from ``sae.latents`` (scalarlens-sae,
by name); these tests need that plugin installed.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import scalarlens
import torch
from conftest import DISTRACTOR, TARGET, TOKENS, random_gpt2
from scalarlens import ActivationLocationType as ALT
from scalarlens import DstConfig, Intervention, PassType
from scalarlens.testing import check_dst, isolated_registry
from test_edges import _attribution_after, _clean, _grad_at, _hold, _scale_neuron

from scalarlens_circuits._edges_sae import SAE_EDGE_EXAMPLES, SAE_EDGE_FACTORIES

pytest.importorskip("scalarlens_sae")

T = len(TOKENS)
ETA = 1e-5
N_LATENTS = 12


# The plugin offers the SAE edges itself once scalarlens-sae is installed.
REGISTRY = isolated_registry("circuits", "sae")


def test_the_plugin_offers_the_sae_edges_beside_scalarlens_sae() -> None:
    offered = {d for info in REGISTRY.plugins() if info.name == "circuits" for d in info.dsts}
    assert {dst.name for dst in SAE_EDGE_FACTORIES} <= offered


def _config(node: dict[str, Any], location: str, layer: int) -> DstConfig:
    sae = {"random_init": {"n_latents": N_LATENTS, "seed": 1}, "location": location, "layer": layer}
    return DstConfig(options={"circuits": {"node": node}, "sae": sae})


def _derive(model: Any, dsts: list[str], config: DstConfig, interventions: Any = ()) -> Any:
    return scalarlens.derive(
        model,
        TOKENS,
        dsts,
        config=config,
        target=TARGET,
        distractor=DISTRACTOR,
        registry=REGISTRY,
        interventions=interventions,
    )


def _add_to_row(location: ALT, layer: int, t: int, vector: torch.Tensor) -> Intervention:
    def fn(v: torch.Tensor, _: Any) -> torch.Tensor:
        v = v.clone()
        v[:, t] = v[:, t] + vector
        return v

    return Intervention(location, fn, [layer], name="nudge")


@pytest.mark.parametrize("sae_layer", [0, 1])
def test_out_edges_from_latents_into_a_neuron_match_brute_force(sae_layer: int) -> None:
    """Scale one latent's write (at resid.delta_mlp) by 1±η; N = a layer-2 neuron."""
    model = random_gpt2()
    t, n = T - 1, 7
    node = {"kind": "neuron", "layer": 2, "token": t, "index": n}
    config = _config(node, "mlp.post_act", sae_layer)
    store = _derive(model, ["edge.sae_out_attribution", "sae.online.write"], config)
    edges = store.get("edge.sae_out_attribution", sae_layer)
    writes = store.get("sae.online.write", sae_layer)
    grad = float(_grad_at(model, ALT.MLP_POST_ACT, 2)[t, n])
    between = [(ALT.RESID_DELTA_ATTN, 1), (ALT.RESID_DELTA_MLP, 1)] if sae_layer == 0 else []
    held = [*between, (ALT.RESID_DELTA_ATTN, 2), (ALT.MLP_INPUT_LAYER_NORM_SCALE, 2)]
    clean = _clean(model, held)
    holds = [_hold(loc, layer, clean[(loc, layer)]) for loc, layer in held]
    checked = 0
    for j in range(N_LATENTS):
        if writes[t, j].abs().max() == 0:
            continue  # an inactive latent writes nothing
        fd = []
        for sign in (1, -1):
            nudge = _add_to_row(ALT.RESID_DELTA_MLP, sae_layer, t, sign * ETA * writes[t, j])
            fd.append(_attribution_after(model, [*holds, nudge], ALT.MLP_POST_ACT, 2, (t, n), grad))
        want = (fd[0] - fd[1]) / (2 * ETA)
        assert float(edges[t, j]) == pytest.approx(want, rel=1e-6, abs=1e-9), j
        checked += 1
    assert checked >= 3
    assert edges[:t].abs().max() == 0  # N reads only its token's residual through the MLP
    other = 1 - sae_layer
    assert store.get("edge.sae_out_attribution", other).abs().max() == 0


def test_out_edges_are_zero_where_the_sae_does_not_precede_the_node() -> None:
    model = random_gpt2()
    node = {"kind": "neuron", "layer": 1, "token": T - 1, "index": 3}
    store = _derive(model, ["edge.sae_out_attribution"], _config(node, "mlp.post_act", 1))
    assert store.get("edge.sae_out_attribution", 1).abs().max() == 0
    store = _derive(model, ["edge.sae_out_attribution"], _config(node, "resid.delta_attn", 1))
    assert store.get("edge.sae_out_attribution", 1).abs().max() > 0  # attention precedes


def _latents_after(
    model: Any, config: DstConfig, interventions: list[Intervention], layer: int
) -> torch.Tensor:
    return _derive(model, ["sae.latents"], config, interventions).get("sae.latents", layer)


@pytest.mark.parametrize(
    ("location", "held"),
    [
        ("mlp.post_act", [(ALT.RESID_DELTA_ATTN, 1), (ALT.MLP_INPUT_LAYER_NORM_SCALE, 1)]),
        ("resid.delta_mlp", [(ALT.RESID_DELTA_ATTN, 1), (ALT.MLP_INPUT_LAYER_NORM_SCALE, 1)]),
        ("resid.delta_attn", [(ALT.ATTN_INPUT_LAYER_NORM_SCALE, 1)]),
        ("resid.post_attn", [(ALT.RESID_DELTA_ATTN, 1)]),
    ],
)
def test_in_edges_into_latents_match_brute_force(location: str, held: list[Any]) -> None:
    """U = a layer-0 neuron at token 3; every latent of a layer-1 SAE, at every token."""
    model = random_gpt2()
    t, n, layer = 3, 5, 1
    node = {"kind": "neuron", "layer": 0, "token": t, "index": n}
    config = _config(node, location, layer)
    store = _derive(
        model,
        ["edge.sae_in_activation", "edge.sae_in_attribution", "sae.online.latents"],
        config,
    )
    activation = store.get("edge.sae_in_activation", layer)
    attribution = store.get("edge.sae_in_attribution", layer)
    clean = _clean(model, held)
    holds = [_hold(loc, lay, clean[(loc, lay)]) for loc, lay in held]
    up = _latents_after(model, config, [*holds, _scale_neuron(0, t, n, 1 + ETA)], layer)
    down = _latents_after(model, config, [*holds, _scale_neuron(0, t, n, 1 - ETA)], layer)
    fd = (up - down) / (2 * ETA)
    assert torch.allclose(activation, fd, rtol=1e-5, atol=1e-8)
    assert activation.abs().max() > 0
    assert store.get("edge.sae_in_activation", 0).abs().max() == 0
    if location != "resid.delta_attn":
        assert activation[:t].abs().max() == 0 and activation[t + 1 :].abs().max() == 0
    else:
        assert activation[:t].abs().max() == 0 and activation[t + 1 :].abs().max() > 0
    assert attribution.abs().max() > 0


def test_in_attribution_is_activation_times_the_latents_gradient() -> None:
    """From a head (all of its key tokens) into an attention-write SAE: J_f·w = ∇z ⊙ J_z·w."""
    model = random_gpt2()
    node = {"kind": "head", "layer": 0, "token": 4, "index": 2}
    config = attrs.evolve(_config(node, "resid.delta_attn", 1), derive_gradients=True)
    dsts = ["edge.sae_in_activation", "edge.sae_in_attribution", "sae.online.latents"]
    store = _derive(model, dsts, config)
    grad = store.get("sae.online.latents", 1, pass_type=PassType.BACKWARD)
    act = store.get("edge.sae_in_activation", 1)
    assert act[4:].abs().max() > 0 and act[:4].abs().max() == 0
    assert torch.allclose(store.get("edge.sae_in_attribution", 1), act * grad, atol=1e-14)


def test_sae_edges_conform_with_both_plugins() -> None:
    """The conformance kit, with scalarlens-sae installed beside this plugin."""
    for name, config in SAE_EDGE_EXAMPLES.items():
        check_dst(REGISTRY, name, random_gpt2(), config)


def test_a_missing_sae_says_what_to_add() -> None:
    model = random_gpt2()
    config = DstConfig(
        options={"circuits": {"node": {"kind": "neuron", "layer": 1, "token": 0, "index": 1}}}
    )
    with pytest.raises(scalarlens.ConfigError, match=r"options\['sae'\]( is missing|.*beside)"):
        scalarlens.derive(
            model,
            TOKENS,
            ["edge.sae_out_attribution"],
            config=config,
            registry=REGISTRY,
            target=TARGET,
            distractor=DISTRACTOR,
        )
