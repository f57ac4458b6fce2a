"""Helpers shared by the plugin's tests (a uniquely named module: tests/ is not a package)."""

from __future__ import annotations

from typing import Any

import scalarlens
import torch
from scalarlens import ActivationLocationType, CaptureRequest, DstConfig, PassType

TOKENS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
TARGET, DISTRACTOR = 1, 2


def sae_options(
    location: str = "mlp.post_act", layer: int = 1, n_latents: int = 24, **extra: Any
) -> dict[str, Any]:
    return {
        "random_init": {"n_latents": n_latents, "seed": 0},
        "location": location,
        "layer": layer,
        **extra,
    }


def sae_config(**kwargs: Any) -> DstConfig:
    return DstConfig(options={"sae": sae_options(**kwargs)})


def grad_at(
    model: scalarlens.ModelAdapter,
    location: ActivationLocationType,
    layer: int,
    interventions: Any = (),
) -> list[torch.Tensor]:
    """Forward value and gradient of the logit-diff objective at one location (per prompt)."""
    runs = model.run(
        TOKENS,
        [
            CaptureRequest(location, PassType.FORWARD, {layer}),
            CaptureRequest(location, PassType.BACKWARD, {layer}),
        ],
        scalarlens.LogitDiffObjective(TARGET, DISTRACTOR),
        interventions=interventions,
    )
    return [torch.stack([r.captured[(location, p)][layer] for p in PassType]) for r in runs]
