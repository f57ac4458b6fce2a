"""One shard: a loaded model turns a run of prompts into partial statistics.

Used unchanged by the local engine and by each Ray worker (which builds one ``ShardRunner`` and
keeps it, so the model loads once per worker).  The derivation goes through the public
``scalarlens.derive``, batch by batch; each batch's derived tensors become ``Rows`` (examples ×
components), are summarised, and are dropped — memory is bounded by the batch, never the corpus.

Gradient DSTs need an objective per prompt.  The default, ``"next_token"``, is the prompt's
log-likelihood ``Σ_t log p(x_{t+1} | x_≤t)``: one backward per prompt whose gradient at a
position sums the next-token log-prob gradients of every later position (one scalar per
prompt; the per-position log-prob would need one backward per token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from ._stats import ComponentStats, Rows, SweepSettings, make_key

if TYPE_CHECKING:
    from .._model import ModelAdapter, Objective
    from .._registry import Registry

NEXT_TOKEN = "next_token"


@attrs.frozen
class SweepSpec:
    """Everything a worker needs besides its prompts: plain data, cheap to ship."""

    model: str
    dsts: tuple[str, ...]
    dst_config: dict[str, Any] = attrs.field(hash=False)
    settings: SweepSettings
    context: int
    batch_size: int
    shard_size: int
    objective: str | None = NEXT_TOKEN


def next_token_objective(tokens: Sequence[int]) -> Objective:
    """``Σ_t log_softmax(logits[t])[x_{t+1}]`` for one prompt (0 for a one-token prompt)."""
    from .._model import CallableObjective

    following = torch.tensor(list(tokens[1:]), dtype=torch.long)

    def log_likelihood(logits: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits[: len(following)], dim=-1)
        return logprobs.gather(1, following[:, None]).sum()

    return CallableObjective(log_likelihood, "next_token_log_likelihood")


def example_kind(shape: Sequence[Any]) -> str:
    """How a DST's per-prompt tensor splits into examples: by ``token``, by causal
    ``token_pair`` (query, key), or one example per ``prompt`` (no token axis)."""
    from .._vocab import Dimension

    token_axes = [d for d in shape if d.is_token_axis]
    if not token_axes:
        return "prompt"
    if len(token_axes) == 1 and token_axes[0] is not Dimension.TOKEN_PAIRS:
        return "token"
    return "token_pair"


def to_rows(
    tensors: Sequence[torch.Tensor],
    prompt_ids: Sequence[int],
    shape: Sequence[Any],
    settings: SweepSettings,
) -> Rows:
    """One batch's per-prompt tensors as examples × components, keys ascending."""
    from .._store import pair_to_tokens
    from .._vocab import Dimension

    token_axes = [i for i, d in enumerate(shape) if d.is_token_axis]
    kind = example_kind(shape)
    values, keys, windows = [], [], []
    offset = 0
    offsets = torch.arange(-settings.window_before, settings.window_after + 1)
    for x, prompt in zip(tensors, prompt_ids, strict=True):
        x = x.detach().to("cpu", torch.float32)
        x = x.permute(*token_axes, *[i for i in range(x.ndim) if i not in token_axes])
        if kind == "prompt":
            rows = x.reshape(1, -1)
            t = s = torch.zeros(1, dtype=torch.int64)
        elif kind == "token":
            rows = x.reshape(x.shape[0], -1)
            t = torch.arange(rows.shape[0])
            s = torch.zeros_like(t)
        elif shape[token_axes[0]] is Dimension.TOKEN_PAIRS:
            rows = x.reshape(x.shape[0], -1)
            pairs = [pair_to_tokens(i) for i in range(rows.shape[0])]
            t = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
            s = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        else:  # tokens × attended tokens: the causal (s <= t) pairs only
            t, s = torch.tril_indices(x.shape[0], x.shape[1])
            rows = x[t, s].reshape(t.numel(), -1)
        n = rows.shape[0]
        if kind == "token":
            neighbour = t[:, None] + offsets
            inside = (neighbour >= 0) & (neighbour < n)
            window = torch.where(inside, neighbour + offset, -1)
        else:
            window = torch.full((n, offsets.numel()), -1, dtype=torch.int64)
            window[:, settings.window_before] = torch.arange(n) + offset
        values.append(rows)
        keys.append(make_key(torch.full_like(t, prompt), t, s))
        windows.append(window)
        offset += n
    return Rows(torch.cat(values), torch.cat(keys), torch.cat(windows))


class ShardRunner:
    """A model and the prepared DSTs, reused for every shard a worker runs."""

    def __init__(
        self,
        spec: SweepSpec,
        model: ModelAdapter | None = None,
        registry: Registry | None = None,
        objective: Objective | None = None,
    ) -> None:
        from .._config import DstConfig
        from .._prepare import check_model_support, prepare
        from ..models._loading import load_model

        if registry is None:
            from .._registry import registry as default_registry

            registry = default_registry
        self.spec = spec
        self.registry = registry
        self.config = DstConfig.from_dict(spec.dst_config)
        self.prepared = prepare(list(spec.dsts), self.config, registry)
        self.model = model if model is not None else load_model(spec.model, registry)
        self.model_loads = 0 if model is not None else 1
        check_model_support(self.prepared.requests, self.model)
        self.objective = objective
        self.per_prompt = bool(self.prepared.needs_objective) and objective is None
        self.layout: dict[str, dict[str, Any]] = {}

    def run(
        self,
        prompts: Sequence[tuple[int, Sequence[int]]],
        on_batch: Callable[[int], None] | None = None,
    ) -> dict[str, ComponentStats]:
        """The shard's statistics per ``"{dst}/{pass}/{layer}"``, batches merged in order."""
        state: dict[str, ComponentStats] = {}
        size = self.spec.batch_size
        for start in range(0, len(prompts), size):
            batch = prompts[start : start + size]
            for prefix, rows in self._batch(batch).items():
                previous = state.get(prefix)
                state[prefix] = (
                    ComponentStats.of_rows(rows, self.spec.settings)
                    if previous is None
                    else previous.update(rows)
                )
            if on_batch is not None:
                on_batch(sum(len(t) for _, t in batch))
        return state

    def shard(
        self,
        index: int,
        prompts: Sequence[tuple[int, Sequence[int]]],
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A shard file's tensors and header: the statistics, plus the prompts' tokens (so
        results can show any example's words without the corpus)."""
        return self.shard_state(index, prompts, on_batch)[1:]

    def shard_state(
        self,
        index: int,
        prompts: Sequence[tuple[int, Sequence[int]]],
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[dict[str, ComponentStats], dict[str, torch.Tensor], dict[str, Any]]:
        """``shard``'s tensors and header, and the statistics they hold (as ``stats_of``
        reads them back)."""
        state = self.run(prompts, on_batch)
        tensors: dict[str, torch.Tensor] = {}
        for prefix in sorted(state):
            tensors.update(state[prefix].to_tensors(prefix))
        lengths = [len(t) for _, t in prompts]
        tensors["tokens"] = torch.tensor([x for _, t in prompts for x in t], dtype=torch.int32)
        tensors["offsets"] = torch.cumsum(torch.tensor([0, *lengths], dtype=torch.int64), 0)
        meta = {
            "shard": index,
            "first_prompt": prompts[0][0],
            "n_prompts": len(prompts),
            "n_tokens": sum(lengths),
            "components": {p: self.layout[p] for p in sorted(state)},
        }
        return state, tensors, meta

    def _batch(self, batch: Sequence[tuple[int, Sequence[int]]]) -> dict[str, Rows]:
        from .._derive import derive
        from .._store import DerivedScalarStore

        tokens = [list(t) for _, t in batch]
        if self.per_prompt:
            store = DerivedScalarStore.concat(
                [
                    derive(
                        self.model,
                        [ids],
                        list(self.spec.dsts),
                        objective=next_token_objective(ids),
                        config=self.config,
                        registry=self.registry,
                    )
                    for ids in tokens
                ]
            )
        else:
            store = derive(
                self.model,
                tokens,
                list(self.spec.dsts),
                objective=self.objective,
                config=self.config,
                registry=self.registry,
            )
        ids = [i for i, _ in batch]
        out: dict[str, Rows] = {}
        for key in store.keys():
            per_prompt = [store.activations(key.dst, key.pass_type, p) for p in range(len(batch))]
            for layer in per_prompt[0].layer_indices:
                rows = to_rows(
                    [aam[layer] for aam in per_prompt], ids, key.dst.shape, self.spec.settings
                )
                name = "none" if layer is None else str(layer)
                prefix = f"{key.dst.name}/{key.pass_type.value}/{name}"
                out[prefix] = rows
                shape = key.dst.shape
                self.layout.setdefault(
                    prefix,
                    {
                        "dst": key.dst.name,
                        "pass": key.pass_type.value,
                        "layer": layer,
                        "example": example_kind(shape),
                        "axes": [d.value for d in shape if not d.is_token_axis],
                        "shape": component_shape(shape, per_prompt[0][layer]),
                    },
                )
        return out


def component_shape(store_shape: Sequence[Any], tensor: torch.Tensor) -> list[int]:
    """Sizes of the non-token axes of a per-prompt tensor (the component grid)."""
    return [n for d, n in zip(store_shape, tensor.shape, strict=True) if not d.is_token_axis]
