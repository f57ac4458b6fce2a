"""The example plugins under ``tests/example_plugins`` installed and run as a user would.

Each is a real package with its own ``pyproject.toml``; the ``install_example_plugin`` fixture
installs it from that file (dist-info + package on ``sys.path``).  These are also the plugins
the recipes page shows (``docs/plugins/recipes.md``), so the docs never show code that does
not run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import scalarlens
import torch
from scalarlens import DstConfig, ModelInputError, Registry, WeightLocationType
from scalarlens.testing import check_dst, isolated_registry, tiny_model

Install = Callable[[str], list[str]]

# distribution → (entry-point name, the DSTs it provides)
EXAMPLES = {
    "scalarlens-lens": ("lens", ("lens.logit_diff",)),
    "scalarlens-entropy": ("entropy", ("entropy.attention",)),
    "scalarlens-headshare": ("headshare", ("headshare.write_share",)),
}
PROMPT = "the old king saw a red fox the old king saw a red"


def _registry(install: Install, distribution: str) -> Registry:
    install(distribution)
    return isolated_registry(EXAMPLES[distribution][0])


@pytest.mark.parametrize("distribution", sorted(EXAMPLES))
def test_example_installs_from_its_pyproject(install: Install, distribution: str) -> None:
    reg = _registry(install, distribution)
    name, dsts = EXAMPLES[distribution]
    info = next(i for i in reg.plugins() if i.name == name)
    assert (info.distribution, info.version, info.status) == (distribution, "0.1.0", "loaded")
    assert info.dsts == dsts
    for dst in dsts:
        assert reg.provider(dst).name == name


# Every example DST, the lens included: the kit gives needs_objective DSTs an objective.
_KIT_CASES = [(distribution, dst) for distribution, (_, dsts) in EXAMPLES.items() for dst in dsts]


@pytest.mark.parametrize(("distribution", "dst"), _KIT_CASES)
def test_example_passes_the_conformance_kit(install: Install, distribution: str, dst: str) -> None:
    check_dst(_registry(install, distribution), dst, tiny_model(), DstConfig())


@pytest.fixture
def install(install_example_plugin: Install) -> Install:
    return install_example_plugin


# --- the logit lens: objective from target/distractor, no plugin options ---------------------


def test_logit_lens_from_python_equals_the_logits_dst_at_the_last_layer(install: Install) -> None:
    reg = _registry(install, "scalarlens-lens")
    model = scalarlens.load_model()
    store = scalarlens.derive(
        model, PROMPT, ["lens.logit_diff", "logits"], target="fox", distractor="king", registry=reg
    )
    fox, king = model.tokenizer.encode("fox king")  # type: ignore[attr-defined]
    logits = store.get("logits")
    expected = (logits[:, fox] - logits[:, king]).unsqueeze(-1)
    last = store.get("lens.logit_diff", model.dims.n_layers - 1)
    assert last.shape == (len(PROMPT.split()), 1)
    torch.testing.assert_close(last, expected, rtol=0, atol=1e-6)
    # Earlier layers are a real lens, not a copy of the last one.
    assert not torch.allclose(store.get("lens.logit_diff", 0), expected, atol=1e-3)


def test_logit_lens_refuses_to_run_without_an_objective(install: Install) -> None:
    reg = _registry(install, "scalarlens-lens")
    with pytest.raises(ModelInputError, match=r"lens\.logit_diff need\(s\) an objective"):
        scalarlens.derive(scalarlens.load_model(), PROMPT, "lens.logit_diff", registry=reg)


def test_logit_lens_from_the_cli(install: Install) -> None:
    paths = install("scalarlens-lens")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}
    env["SCALARLENS_PLUGINS"] = "builtins,lens"
    n_tokens, n_layers = len(PROMPT.split()), scalarlens.load_model().dims.n_layers
    command = [sys.executable, "-m", "scalarlens.cli", "derive", "--prompt", PROMPT,
               "--dst", "lens.logit_diff", "--target", "fox", "--distractor", "king",
               "--top", str(n_tokens * n_layers), "--json"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)["results"][0]["top"]
    assert len(records) == n_tokens * n_layers  # every (layer, token): the whole tensor

    reg = isolated_registry("lens")
    store = scalarlens.derive(
        scalarlens.load_model(), PROMPT, ["lens.logit_diff", "logits"],
        target="fox", distractor="king", registry=reg,
    )  # fmt: skip
    for record in records:
        assert record["dst"] == "lens.logit_diff" and record["component"] == [0]
        want = store.get("lens.logit_diff", record["layer"])[record["token"], 0]
        assert record["value"] == pytest.approx(float(want), abs=1e-6)


# --- attention entropy and the chained head share ------------------------------------------


def test_attention_entropy_matches_an_independent_computation(install: Install) -> None:
    reg = _registry(install, "scalarlens-entropy")
    model = tiny_model()
    tokens = [3, 1, 4, 1, 5, 9]
    store = scalarlens.derive(model, [tokens], ["entropy.attention", "attn.qk_probs"], registry=reg)
    for layer in range(model.dims.n_layers):
        probs = store.get("attn.qk_probs", layer)  # T×S×H, zero above the diagonal
        entropy = store.get("entropy.attention", layer)
        assert torch.isfinite(entropy).all()
        for t in range(len(tokens)):
            seen = probs[t, : t + 1]  # the keys query t may attend to, all p > 0
            want = -(seen * seen.log()).sum(dim=0)
            torch.testing.assert_close(entropy[t], want)
        assert torch.equal(entropy[0], torch.zeros_like(entropy[0]))  # one key: certain


def test_head_share_is_each_heads_write_norm_over_the_layer_total(install: Install) -> None:
    reg = _registry(install, "scalarlens-headshare")
    model = tiny_model()
    store = scalarlens.derive(
        model, [[2, 6, 5, 3]], ["headshare.write_share", "attn.v_out"], registry=reg
    )
    for layer in range(model.dims.n_layers):
        # The definition from scratch: ‖o[t,h] W_O[h]‖ over its sum across heads.
        w_o = model.weight(WeightLocationType.ATTN_TO_RESIDUAL, layer)
        norms = torch.einsum("thv,hvd->thd", store.get("attn.v_out", layer), w_o).norm(dim=-1)
        share = store.get("headshare.write_share", layer)
        torch.testing.assert_close(share, norms / norms.sum(dim=-1, keepdim=True))
        torch.testing.assert_close(share.sum(dim=-1), torch.ones(share.shape[0], dtype=share.dtype))


def test_head_share_resolves_its_reference_through_the_registry(install: Install) -> None:
    reg = _registry(install, "scalarlens-headshare")
    (source,) = reg.get("headshare.write_share").sub_scalar_sources
    assert source.scalar_deriver.dst.name == "attn.write_norm_per_token"  # type: ignore[attr-defined]
    assert reg.provider("attn.write_norm_per_token").name == "builtins"
