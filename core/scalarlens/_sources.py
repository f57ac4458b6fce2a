"""Scalar sources: the inputs of a deriver.

A source is a raw captured activation, another deriver's output, or a *reference by name* to
another DST.  References are what let a plugin chain onto a DST from a different plugin without
importing it: the registry resolves them into derived sources when the deriver is built.

``pass_type=None`` means "whatever pass the consuming deriver is asked for", which is how a raw
twin serves both the value and its gradient through one declaration.

``prompt`` says *which run* a source reads when a derivation compares two prompts (a clean
"main" prompt and a corrupted "baseline" one): ``None`` is the consumer's own prompt (always the
main prompt for what a user requests); ``PromptCombo.MAIN_MINUS_BASELINE`` is the difference of
the two, so attribution patching ``(a_clean − a_corrupt)·∇a`` is an ordinary deriver over two
ordinary sources.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from ._config import DstConfig
from ._direction import CausalDirectionIndexer, Direction
from ._layers import (
    IDENTITY,
    IdentityLayerIndexer,
    LayerIndexer,
    OffsetLayerIndexer,
    StaticLayerIndexer,
)
from ._vocab import ActivationLocationType, LocationWithinLayer, PassType
from .exceptions import ConfigError

if TYPE_CHECKING:
    from ._locations import PluginLocation


class PromptCombo(enum.Enum):
    """Which prompt's run a source reads (see the module docstring).

    ``MAIN`` and ``BASELINE`` read one run; ``MAIN_MINUS_BASELINE`` reads both and subtracts.
    Two more are runs the engine makes from the pair, for raw sources only:

    * ``INTEGRATED`` (backward pass only): the gradient at this location averaged along the
      straight path from the baseline's value to the main prompt's value *at this location and
      layer*, everything upstream as on the main prompt (Gauss–Legendre rule with
      ``DstConfig.steps`` points) — integrated gradients at a node;
    * ``PATCHED`` (forward pass only): per component (one head, neuron or latent at one
      position; vector channels are patched whole), ``objective(main) − objective(main with
      this component's value taken from the baseline)`` — activation patching, the exact effect.
      Its value has the location's shape without the channel axes.
    """

    MAIN = "main"
    BASELINE = "baseline"
    MAIN_MINUS_BASELINE = "main_minus_baseline"
    INTEGRATED = "integrated"
    PATCHED = "patched"


#: Runs of an actual prompt (a plan node is evaluated on one of them).
PROMPT_RUNS = (PromptCombo.MAIN, PromptCombo.BASELINE)
#: Runs the engine derives from a prompt pair; only raw sources read them.
ENGINE_RUNS = (PromptCombo.INTEGRATED, PromptCombo.PATCHED)


def prompt_name(prompt: PromptCombo | None) -> str:
    return "" if prompt is None else f" @{prompt.value}"


def _check_engine_run(inst: Any, _: attrs.Attribute[Any], prompt: PromptCombo | None) -> None:
    if prompt not in ENGINE_RUNS:
        return
    if not isinstance(inst, RawScalarSource):
        raise ConfigError(
            f"prompt={prompt.value!r} is a run the engine makes at a raw location; use it on a "
            "RawScalarSource, not on a derived source or reference"
        )
    wanted = PassType.BACKWARD if prompt is PromptCombo.INTEGRATED else PassType.FORWARD
    if inst.pass_type is not wanted:
        raise ConfigError(
            f"raw source {inst.location.value} with prompt={prompt.value!r} must read the "
            f"{wanted.value} pass (got {pass_name(inst.pass_type)})"
        )


@runtime_checkable
class ScalarSource(Protocol):
    """An input of a deriver: where it comes from, in which pass, through which layer indexer."""

    @property
    def pass_type(self) -> PassType | None: ...

    @property
    def layer_indexer(self) -> LayerIndexer: ...

    def describe(self) -> str: ...


def _check_raw_indexer(
    inst: RawScalarSource, _: attrs.Attribute[Any], indexer: LayerIndexer
) -> None:
    # Indexers that always answer an integer layer can never read a layer-less location;
    # others (e.g. causal masks) are checked per layer when the plan is made.
    if inst.location.has_no_layers and isinstance(
        indexer, (IdentityLayerIndexer, OffsetLayerIndexer, StaticLayerIndexer)
    ):
        raise ConfigError(
            f"raw source {inst.location.value} has no layers: use NoLayersLayerIndexer "
            f"(got {indexer.describe()})"
        )


@attrs.frozen
class RawScalarSource:
    """A captured activation (or its gradient) at a model location or a plugin's splice."""

    location: ActivationLocationType | PluginLocation
    pass_type: PassType | None = PassType.FORWARD
    layer_indexer: LayerIndexer = attrs.field(default=IDENTITY, validator=_check_raw_indexer)
    prompt: PromptCombo | None = attrs.field(default=None, validator=_check_engine_run)

    def describe(self) -> str:
        indexer = self.layer_indexer.describe()
        where = prompt_name(self.prompt)
        return f"raw {self.location.value}/{pass_name(self.pass_type)}{where} [{indexer}]"


@attrs.frozen
class DstReference:
    """Another DST named by its key, resolved by the registry at build time.

    ``config=None`` builds the referenced DST with the consuming deriver's config.
    """

    dst_name: str
    pass_type: PassType | None = PassType.FORWARD
    layer_indexer: LayerIndexer = IDENTITY
    config: DstConfig | None = None
    prompt: PromptCombo | None = attrs.field(default=None, validator=_check_engine_run)

    def describe(self) -> str:
        where = prompt_name(self.prompt)
        return (
            f"ref {self.dst_name}/{pass_name(self.pass_type)}{where} "
            f"[{self.layer_indexer.describe()}]"
        )


def pass_name(pass_type: PassType | None) -> str:
    return "same-pass" if pass_type is None else pass_type.value


def direction_source(
    direction: Direction, component_location: LocationWithinLayer | None
) -> RawScalarSource:
    """``g`` as a deriver input, causally masked for components at ``component_location``."""
    return RawScalarSource(
        direction.location,
        PassType.BACKWARD,
        CausalDirectionIndexer(direction, component_location),
    )
