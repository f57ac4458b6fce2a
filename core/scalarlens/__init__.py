"""ScalarLens: derived scalars from transformer activations, through a registry of plugins.

    >>> from scalarlens import registry, DstConfig
    >>> deriver = registry.get("mlp.post_act", DstConfig(layer_indices=[0]))

Everything public is re-exported here; the implementation lives in private modules, one idea
each.  The plugin contract is ``scalarlens.hookspecs``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._config import DstConfig, FrozenOptions
from ._deriver import (
    DeriveContext,
    DerivedScalarSource,
    Inputs,
    Kernel,
    ScalarDeriver,
    identity_kernel,
    raw_deriver,
)
from ._direction import CausalDirectionIndexer, Direction, precedes
from ._dst import DerivedScalarType, DstAndPass, raw_dst
from ._layers import (
    IDENTITY,
    LAST_LAYER,
    NO_LAYERS,
    NOT_NEEDED,
    PREVIOUS_LAYER,
    IdentityLayerIndexer,
    LayerIndex,
    LayerIndexer,
    NoLayersLayerIndexer,
    OffsetLayerIndexer,
    StaticLayerIndexer,
)
from ._plugins import ENTRY_POINT_GROUP, PluginInfo
from ._recipes import (
    Factory,
    Recipe,
    act_times_grad,
    need,
    project_onto_direction,
    raw_source,
    recipe_factories,
    row_norm,
)
from ._registry import Registry, registry
from ._sources import (
    DstReference,
    PromptCombo,
    RawScalarSource,
    ScalarSource,
    direction_source,
)
from ._vocab import (
    ActivationLocationType,
    Dimension,
    LocationWithinLayer,
    NodeType,
    PassType,
    WeightLocationType,
    resolve_shape,
)
from .exceptions import (
    CheckpointError,
    ConfigError,
    DeriverBuildError,
    DstConflictError,
    DstCycleError,
    KernelError,
    KernelMutationWarning,
    MissingActivationError,
    ModelInputError,
    OutputError,
    PluginLoadError,
    RegistrationError,
    ScalarLensError,
    ShapeError,
    StoreError,
    TokenizerError,
    TruncationWarning,
    UnknownDstError,
    UnknownInterventionError,
    UnsupportedModelError,
    UnsupportedPassError,
)
from .hookspecs import PLUGIN_API_VERSION, hookimpl

if TYPE_CHECKING:
    from ._activations import ActivationsAndMetadata, RawActivationStore
    from ._compare import Comparison, compare
    from ._demo import demo_prompt
    from ._derive import derive
    from ._model import (
        CallableObjective,
        CaptureRequest,
        DirectionObjective,
        FinalResidualReadout,
        Intervention,
        LogitDiffObjective,
        LogProbObjective,
        ModelAdapter,
        ModelDims,
        NodeObjective,
        Objective,
        ObjectiveInfo,
        PluginLocation,
        RunResult,
    )
    from ._plan import EvaluationCounter, Plan, derive_from_raw, execute_plan, make_plan
    from ._prepare import Preparation, encode_prompt, encode_token, prepare, unsupported_reason
    from ._reconstitute import (
        AttentionParts,
        Reconstitutable,
        attention_on_path,
        reconstitute_gradient,
        reconstitute_jvp,
        residual_read_by,
    )
    from ._store import DerivedScalarStore, NodeRecord
    from ._sweep import (
        SweepRecord,
        SweepResult,
        export_neuronpedia,
        load_sweep,
        sweep,
        synthetic_corpus,
    )
    from .models._loading import load_model

# Imported on first use: resolving a deriver needs none of these, and keeping them out of
# `import scalarlens` keeps the startup budget (see benchmarks/bench_startup.py).
_LAZY = {
    "._activations": ("ActivationsAndMetadata", "RawActivationStore"),
    "._compare": ("Comparison", "compare"),
    "._model": (
        "CallableObjective",
        "CaptureRequest",
        "DirectionObjective",
        "FinalResidualReadout",
        "Intervention",
        "LogitDiffObjective",
        "LogProbObjective",
        "ModelAdapter",
        "ModelDims",
        "NodeObjective",
        "Objective",
        "ObjectiveInfo",
        "PluginLocation",
        "RunResult",
    ),
    "._plan": ("EvaluationCounter", "Plan", "derive_from_raw", "execute_plan", "make_plan"),
    "._derive": ("derive",),
    "._prepare": ("Preparation", "encode_prompt", "encode_token", "prepare", "unsupported_reason"),
    "._demo": ("demo_prompt",),
    "._reconstitute": (
        "AttentionParts",
        "Reconstitutable",
        "attention_on_path",
        "reconstitute_gradient",
        "reconstitute_jvp",
        "residual_read_by",
    ),
    ".models._loading": ("load_model",),
    "._store": ("DerivedScalarStore", "NodeRecord"),
    "._sweep": (
        "SweepRecord",
        "SweepResult",
        "export_neuronpedia",
        "load_sweep",
        "sweep",
        "synthetic_corpus",
    ),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


# Subpackages reachable as attributes (``help(scalarlens.models.GPT2Adapter)``) without an
# explicit import, but still imported only when used (they import torch).
_SUBMODULES = ("models", "testing")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'scalarlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "IDENTITY",
    "LAST_LAYER",
    "NOT_NEEDED",
    "NO_LAYERS",
    "PLUGIN_API_VERSION",
    "PREVIOUS_LAYER",
    "ActivationLocationType",
    "ActivationsAndMetadata",
    "AttentionParts",
    "CallableObjective",
    "CaptureRequest",
    "CausalDirectionIndexer",
    "CheckpointError",
    "Comparison",
    "ConfigError",
    "DeriveContext",
    "DerivedScalarSource",
    "DerivedScalarStore",
    "DerivedScalarType",
    "DeriverBuildError",
    "Dimension",
    "Direction",
    "DirectionObjective",
    "DstAndPass",
    "DstConfig",
    "DstConflictError",
    "DstCycleError",
    "DstReference",
    "EvaluationCounter",
    "Factory",
    "FinalResidualReadout",
    "FrozenOptions",
    "IdentityLayerIndexer",
    "Inputs",
    "Intervention",
    "Kernel",
    "KernelError",
    "KernelMutationWarning",
    "LayerIndex",
    "LayerIndexer",
    "LocationWithinLayer",
    "LogProbObjective",
    "LogitDiffObjective",
    "MissingActivationError",
    "ModelAdapter",
    "ModelDims",
    "ModelInputError",
    "NoLayersLayerIndexer",
    "NodeObjective",
    "NodeRecord",
    "NodeType",
    "Objective",
    "ObjectiveInfo",
    "OffsetLayerIndexer",
    "OutputError",
    "PassType",
    "Plan",
    "PluginInfo",
    "PluginLoadError",
    "PluginLocation",
    "Preparation",
    "PromptCombo",
    "RawActivationStore",
    "RawScalarSource",
    "Recipe",
    "Reconstitutable",
    "RegistrationError",
    "Registry",
    "RunResult",
    "ScalarDeriver",
    "ScalarLensError",
    "ScalarSource",
    "ShapeError",
    "StaticLayerIndexer",
    "StoreError",
    "SweepRecord",
    "SweepResult",
    "TokenizerError",
    "TruncationWarning",
    "UnknownDstError",
    "UnknownInterventionError",
    "UnsupportedModelError",
    "UnsupportedPassError",
    "WeightLocationType",
    "__version__",
    "act_times_grad",
    "attention_on_path",
    "compare",
    "demo_prompt",
    "derive",
    "derive_from_raw",
    "direction_source",
    "encode_prompt",
    "encode_token",
    "execute_plan",
    "export_neuronpedia",
    "hookimpl",
    "identity_kernel",
    "load_model",
    "load_sweep",
    "make_plan",
    "need",
    "precedes",
    "prepare",
    "project_onto_direction",
    "raw_deriver",
    "raw_dst",
    "raw_source",
    "recipe_factories",
    "reconstitute_gradient",
    "reconstitute_jvp",
    "registry",
    "residual_read_by",
    "resolve_shape",
    "row_norm",
    "sweep",
    "synthetic_corpus",
    "unsupported_reason",
]
