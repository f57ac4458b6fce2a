"""The plugin author's primitives: kernel types, a declarative recipe table, common kernels.

Every catalogue (the builtins, the SAE plugin, yours) declares DSTs the same way — the DST,
the formula it computes, its sources and a per-layer kernel — so these live here once instead
of being re-declared by each plugin::

    from scalarlens import Recipe, act_times_grad, raw_source, recipe_factories

    RECIPES = (
        Recipe(MY_DST, "a[t,n]·∇a[t,n]", act_times_grad,
               (raw_source(ALT.MLP_POST_ACT), raw_source(ALT.MLP_POST_ACT, PassType.BACKWARD))),
    )

    @hookimpl
    def scalarlens_derivers():
        return recipe_factories(RECIPES)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import attrs

from ._config import DstConfig
from ._deriver import DeriveContext, Inputs, Kernel, ScalarDeriver
from ._dst import DerivedScalarType
from ._layers import IDENTITY, NO_LAYERS, LayerIndex
from ._sources import PromptCombo, RawScalarSource, ScalarSource
from ._vocab import ActivationLocationType, PassType

if TYPE_CHECKING:
    import torch

__all__ = [
    "Factory",
    "Recipe",
    "act_times_grad",
    "need",
    "project_onto_direction",
    "raw_source",
    "recipe_factories",
    "row_norm",
]

Factory = Callable[[DstConfig], ScalarDeriver]
"""What ``scalarlens_derivers`` maps each DST to: ``config -> ScalarDeriver``."""

Sources = tuple[ScalarSource, ...] | Callable[[DstConfig], tuple[ScalarSource, ...]]


def need(tensor: torch.Tensor | None, what: str = "input") -> torch.Tensor:
    """Narrow an input its indexer always provides (identity or no-layer sources) to a tensor."""
    if tensor is None:
        raise AssertionError(f"an always-needed {what} was not provided")
    return tensor


def raw_source(
    location: ActivationLocationType,
    pass_type: PassType | None = PassType.FORWARD,
    prompt: PromptCombo | None = None,
) -> RawScalarSource:
    """A raw source with the right indexer for ``location`` (no layers for the embedding).

    ``prompt`` reads another run when comparing two prompts (see ``PromptCombo``)."""
    indexer = NO_LAYERS if location.has_no_layers else IDENTITY
    return RawScalarSource(location, pass_type, indexer, prompt)


@attrs.frozen
class Recipe:
    """One catalogue entry: DST + formula + sources + kernel → a factory.

    ``sources`` may be a callable of the config, for entries whose inputs depend on options.
    ``direction=True`` appends the direction g (``direction_source(config.direction,
    dst.location)``) as the last input: ``None`` at layers that cannot influence g.
    The factory's docstring is ``"{name} = {formula}"`` plus the description, so ``help()``
    and the generated catalogue show the maths.
    """

    dst: DerivedScalarType
    formula: str
    kernel: Kernel
    sources: Sources = ()
    direction: bool = False

    def build(self, config: DstConfig) -> ScalarDeriver:
        from ._sources import direction_source

        sources = self.sources(config) if callable(self.sources) else self.sources
        if self.direction:
            sources = (*sources, direction_source(config.direction, self.dst.location))
        return ScalarDeriver(
            dst=self.dst,
            config=config,
            sub_scalar_sources=sources,
            tensor_calculate_derived_scalar_fn=self.kernel,
            derivable_pass_types=self.dst.pass_types,
        )

    def factory(self) -> Factory:
        def build(config: DstConfig) -> ScalarDeriver:
            return self.build(config)

        build.__name__ = "build_" + self.dst.name.replace(".", "_")
        build.__doc__ = f"{self.dst.name} = {self.formula}\n\n{self.dst.description}"
        return build


def recipe_factories(recipes: Iterable[Recipe]) -> dict[DerivedScalarType, Factory]:
    """``{dst: factory}`` for a ``scalarlens_derivers`` hook."""
    return {recipe.dst: recipe.factory() for recipe in recipes}


# --- common kernels --------------------------------------------------------------------------


def act_times_grad(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """``a·∇a``: sources are the activation and its gradient, same shape."""
    return need(inputs[0], "activation") * need(inputs[1], "gradient")


def row_norm(tensor: torch.Tensor) -> torch.Tensor:
    """``‖x‖₂`` over the last axis, kept as a size-1 axis (``T×D → T×1``)."""
    norm: torch.Tensor = tensor.norm(dim=-1, keepdim=True)
    return norm


def project_onto_direction(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """``x[t]·g[t]`` as ``T×1``: sources are a ``T×D`` write and the direction g (last input).

    Exact zeros where g is ``None`` (the write does not precede the direction).
    """
    x, g = need(inputs[0], "write"), inputs[-1]
    if g is None:
        return x.new_zeros((x.shape[0], 1))
    return (x * g).sum(dim=-1, keepdim=True)
