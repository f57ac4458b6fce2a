"""``DerivedScalarStore``: what ``derive`` returns — every requested DST for every prompt.

Queries fix the reference's store bugs (§6 item 9): ``topk`` honours the layer filter, returns
exactly ``min(k, n)`` records over all DSTs and layers, and orders by ``largest``.  Files are
safetensors (one tensor per ``"{dst}/{pass}/{layer}"`` with a leading prompt axis, token axes
padded with NaN to the longest prompt) plus JSON metadata — never a pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from ._activations import ActivationsAndMetadata
from ._dst import DerivedScalarType, DstAndPass
from ._inputs import check_top_k
from ._vocab import Dimension, PassType
from .exceptions import MissingActivationError, ModelInputError, ShapeError, StoreError

LayerIndex = int | None
PromptResults = Mapping[DstAndPass, ActivationsAndMetadata]


@attrs.frozen
class NodeRecord:
    """One entry of a derived tensor, addressed the way researchers talk about it.

    ``token`` is the (query) token; ``attended_token`` is set for token-pair axes;
    ``component`` holds the remaining indices (neuron, head, latent, ...).
    """

    dst: str
    pass_type: PassType
    layer: LayerIndex
    prompt: int
    token: int
    attended_token: int | None
    component: tuple[int, ...]
    value: float

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["pass_type"] = self.pass_type.value
        out["component"] = list(self.component)
        return out


def pair_to_tokens(index: int) -> tuple[int, int]:
    """Flat lower-triangle index ``t(t+1)/2 + s`` → ``(t, s)``."""
    t = int(((8 * index + 1) ** 0.5 - 1) // 2)
    while t * (t + 1) // 2 > index:
        t -= 1
    while (t + 1) * (t + 2) // 2 <= index:
        t += 1
    return t, index - t * (t + 1) // 2


def _layer_key(layer: LayerIndex) -> str:
    return "none" if layer is None else str(layer)


def _parse_layer(text: str) -> LayerIndex:
    return None if text == "none" else int(text)


class DerivedScalarStore:
    """Derived tensors per prompt, keyed by (DST, pass) and layer."""

    def __init__(
        self,
        results: Sequence[PromptResults],
        tokens: Sequence[Sequence[int]],
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if len(results) != len(tokens):
            raise ShapeError(f"{len(results)} result sets for {len(tokens)} prompts")
        self._results = tuple(dict(r) for r in results)
        self.tokens: tuple[tuple[int, ...], ...] = tuple(tuple(t) for t in tokens)
        self.metadata: dict[str, Any] = dict(metadata or {})

    @classmethod
    def concat(cls, stores: Sequence[DerivedScalarStore]) -> DerivedScalarStore:
        """Prompts of several stores (same DSTs) as one store; list-valued metadata is joined."""
        if not stores:
            raise ShapeError("concat needs at least one store")
        keys = set(stores[0].keys())
        for other in stores[1:]:
            if set(other.keys()) != keys:
                raise ShapeError("stores to concat must hold the same DSTs and passes")
        metadata = dict(stores[0].metadata)
        for name, value in metadata.items():
            if isinstance(value, list):
                metadata[name] = [v for s in stores for v in s.metadata.get(name, [])]
        return cls(
            [r for s in stores for r in s._results],
            [t for s in stores for t in s.tokens],
            metadata,
        )

    # --- access ---------------------------------------------------------------------------

    @property
    def n_prompts(self) -> int:
        return len(self._results)

    def _prompt(self, prompt: int) -> PromptResults:
        """One prompt's results; an index outside the store names the valid range."""
        if (
            isinstance(prompt, bool)
            or not isinstance(prompt, int)
            or not (0 <= prompt < self.n_prompts)
        ):
            raise ModelInputError(
                f"prompt {prompt!r} is out of range; the store holds {self.n_prompts} prompt(s) "
                f"(valid: 0..{self.n_prompts - 1})"
            )
        return self._results[prompt]

    def keys(self) -> tuple[DstAndPass, ...]:
        return tuple(self._results[0]) if self._results else ()

    @property
    def dsts(self) -> tuple[DerivedScalarType, ...]:
        return tuple(dict.fromkeys(key.dst for key in self.keys()))

    def _key(self, dst: str | DerivedScalarType, pass_type: PassType) -> DstAndPass:
        name = dst if isinstance(dst, str) else dst.name
        for key in self.keys():
            if key.dst.name == name and key.pass_type is pass_type:
                return key
        held = ", ".join(str(k) for k in self.keys())
        raise MissingActivationError(
            f"the store has no {name}/{pass_type.value}; it holds: {held}. Ask derive() for it "
            "(set DstConfig(derive_gradients=True) for backward passes)"
        )

    def activations(
        self,
        dst: str | DerivedScalarType,
        pass_type: PassType = PassType.FORWARD,
        prompt: int = 0,
    ) -> ActivationsAndMetadata:
        return self._prompt(prompt)[self._key(dst, pass_type)]

    def get(
        self,
        dst: str | DerivedScalarType,
        layer: LayerIndex = None,
        pass_type: PassType = PassType.FORWARD,
        prompt: int = 0,
    ) -> torch.Tensor:
        """One layer's tensor; ``layer`` may be omitted for layer-less DSTs."""
        return self.activations(dst, pass_type, prompt)[layer]

    def __getitem__(self, dst: str) -> ActivationsAndMetadata:
        return self.activations(dst)

    # --- ranking --------------------------------------------------------------------------

    def topk(
        self,
        k: int,
        dsts: Iterable[str | DerivedScalarType] | None = None,
        layers: Iterable[int] | None = None,
        *,
        largest: bool = True,
        pass_type: PassType = PassType.FORWARD,
        prompt: int = 0,
        absolute: bool = False,
    ) -> list[NodeRecord]:
        """The ``k`` most extreme entries across the chosen DSTs and layers of one prompt.

        Layer-less DSTs are included unless ``layers`` is given.  ``absolute=True`` ranks by
        magnitude but reports signed values.  ``k`` must be at least 1: a zero or negative
        count is almost always a bug upstream, and an empty answer would hide it.
        """
        check_top_k(k)
        names = None if dsts is None else {d if isinstance(d, str) else d.name for d in dsts}
        wanted_layers = None if layers is None else set(layers)
        candidates: list[tuple[float, NodeRecord]] = []
        for key, aam in self._prompt(prompt).items():
            if key.pass_type is not pass_type or (names is not None and key.dst.name not in names):
                continue
            for layer in aam.layer_indices:
                if wanted_layers is not None and layer not in wanted_layers:
                    continue
                tensor = aam[layer]
                flat = tensor.reshape(-1).to(torch.float64)
                score = flat.abs() if absolute else flat
                score = torch.nan_to_num(score, nan=float("-inf") if largest else float("inf"))
                n = min(k, flat.numel())
                if n == 0:
                    continue
                top = torch.topk(score, n, largest=largest)
                for s, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    candidates.append((s, self._record(key, layer, prompt, tensor, idx)))
        candidates.sort(key=lambda c: c[0], reverse=largest)
        return [record for _, record in candidates[:k]]

    @staticmethod
    def _record(
        key: DstAndPass, layer: LayerIndex, prompt: int, tensor: torch.Tensor, flat: int
    ) -> NodeRecord:
        index = [int(i) for i in torch.unravel_index(torch.tensor(flat), tensor.shape)]
        first, rest = index[0], tuple(index[1:])
        attended: int | None = None
        shape = key.dst.shape
        if shape[0] is Dimension.TOKEN_PAIRS:
            first, attended = pair_to_tokens(first)
        elif len(shape) > 1 and shape[1] is Dimension.ATTENDED_TO_TOKENS:
            attended, rest = rest[0], rest[1:]
        return NodeRecord(
            key.dst.name,
            key.pass_type,
            layer,
            prompt,
            first,
            attended,
            rest,
            float(tensor.reshape(-1)[flat]),
        )

    # --- persistence ----------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write ``path`` (safetensors) with JSON metadata in its header.

        The directory is checked first and the file written under a temporary name then
        renamed, so a failure never leaves a truncated store that would load as garbage.
        """
        from ._output_files import atomic_write

        atomic_write(path, self._write, "store")

    def _write(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        dst_meta: dict[str, Any] = {}
        for key in self.keys():
            per_prompt = [r[key] for r in self._results]
            for layer in per_prompt[0].layer_indices:
                stacked = _pad_stack([aam[layer] for aam in per_prompt], key.dst)
                tensors[f"{key.dst.name}/{key.pass_type.value}/{_layer_key(layer)}"] = stacked
            dst_meta[key.dst.name] = {
                "shape": [d.value for d in key.dst.shape],
                "node_type": key.dst.node_type.value,
                "location": None if key.dst.location is None else key.dst.location.value,
                "pass_types": sorted(p.value for p in key.dst.pass_types),
                "description": key.dst.description,
                "has_no_layers": key.dst.has_no_layers,
                "allows_non_finite": key.dst.allows_non_finite,
                "needs_objective": key.dst.needs_objective,
            }
        header = {
            "scalarlens": json.dumps(
                {
                    "tokens": [list(t) for t in self.tokens],
                    "dsts": dst_meta,
                    "metadata": self.metadata,
                }
            )
        }
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> DerivedScalarStore:
        """Read a store written by ``save``; a missing or foreign file is a ``StoreError``."""
        header, raw = _read_store_file(Path(path))
        tokens = header["tokens"]
        dsts = {name: _dst_from_meta(name, meta) for name, meta in header["dsts"].items()}
        grouped: dict[DstAndPass, dict[LayerIndex, torch.Tensor]] = {}
        for name, tensor in raw.items():
            dst_name, pass_name, layer_text = name.rsplit("/", 2)
            key = DstAndPass(dsts[dst_name], PassType(pass_name))
            grouped.setdefault(key, {})[_parse_layer(layer_text)] = tensor
        results = []
        for p, toks in enumerate(tokens):
            per_prompt = {}
            for key, by_layer in grouped.items():
                per_prompt[key] = ActivationsAndMetadata(
                    key.dst,
                    key.pass_type,
                    {layer: _unpad(t[p], key.dst, len(toks)) for layer, t in by_layer.items()},
                )
            results.append(per_prompt)
        return cls(results, tokens, header["metadata"])


def _token_axes(dst: DerivedScalarType) -> list[tuple[int, Dimension]]:
    return [(i, d) for i, d in enumerate(dst.shape) if d.is_token_axis]


def _pad_stack(tensors: list[torch.Tensor], dst: DerivedScalarType) -> torch.Tensor:
    target = [max(t.shape[i] for t in tensors) for i in range(tensors[0].ndim)]
    padded = []
    for t in tensors:
        out = torch.full(target, float("nan"), dtype=t.dtype)
        out[tuple(slice(0, s) for s in t.shape)] = t
        padded.append(out)
    return torch.stack(padded).contiguous()


def _unpad(tensor: torch.Tensor, dst: DerivedScalarType, n_tokens: int) -> torch.Tensor:
    index: list[slice] = [slice(None)] * tensor.ndim
    for axis, dim in _token_axes(dst):
        size = n_tokens * (n_tokens + 1) // 2 if dim is Dimension.TOKEN_PAIRS else n_tokens
        index[axis] = slice(0, size)
    return tensor[tuple(index)].clone()


def read_tagged_safetensors(
    path: Path, key: str, what: str = "safetensors file"
) -> tuple[str | None, dict[str, torch.Tensor]]:
    """A safetensors file's tensors and its JSON header stored under metadata ``key`` (``None``
    when absent); unreadable files are a ``StoreError`` naming the path.  Stores and sweep
    shards both keep their description in such a header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            text = (fh.metadata() or {}).get(key)
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise StoreError(f"{path}: not a readable {what} ({exc})") from None
    return text, tensors


def _read_store_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise StoreError(f"{path}: no such store file (write one with store.save or --out)")
    text, raw = read_tagged_safetensors(path, "scalarlens")
    if text is None:
        raise StoreError(
            f"{path}: a safetensors file without ScalarLens metadata; load only files written "
            "by DerivedScalarStore.save or `scalarlens derive --out`"
        )
    header: dict[str, Any] = json.loads(text)
    return header, raw


def _dst_from_meta(name: str, meta: Mapping[str, Any]) -> DerivedScalarType:
    from ._vocab import LocationWithinLayer, NodeType

    return DerivedScalarType(
        name,
        tuple(Dimension(d) for d in meta["shape"]),  # type: ignore[call-arg]
        NodeType(meta["node_type"]),
        meta["description"],
        location=None if meta["location"] is None else LocationWithinLayer(meta["location"]),
        pass_types=frozenset(PassType(p) for p in meta["pass_types"]),
        has_no_layers=meta["has_no_layers"],
        allows_non_finite=meta.get("allows_non_finite", False),
        needs_objective=meta.get("needs_objective", False),
    )
