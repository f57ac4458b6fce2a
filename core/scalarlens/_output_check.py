"""Checking what a kernel returned before anyone consumes it.

A kernel's output feeds other DSTs and the user's rankings, so a wrong size, a NaN or a value
that is not a tensor at all must stop the derivation with an error naming the DST, its plugin
and the layer — not surface three DSTs later as a broadcast error or a silently wrong ranking.

Finiteness is checked on every output, intermediate or requested, right after its kernel, with
one reduction: a NaN or inf anywhere makes the ``sum`` non-finite (only an overflowing sum of
finite values needs the exact element-wise re-check).  That pass is most of what the checks
cost: it reads the output once more, which takes a quarter to two thirds of the time of a
one-op elementwise kernel (bench_dedup's consumers).  Two cheaper schemes were measured there
and not adopted:

* checking only what leaves the engine (requested outputs), walking back to the first
  non-finite producer on failure.  Not exact: a consumer can hide a producer's NaN or inf
  (``torch.where``, a comparison, ``exp(-inf)``, ``1 / inf``, ``clamp``) and return finite,
  wrong numbers; and intermediates are freed once consumed, so the walk back would have to
  re-derive them.  Nor worth it: requested outputs carry most of the checked bytes (in one
  plan for bench_dedup's 20 DSTs, intermediates were a quarter of the check time, ≈ 3 % of
  ``execute_plan``).
* another exact pass: ``torch.dot(v, v)`` reads the same bytes (no faster on large outputs,
  slower on small ones, and it overflows sooner); ``isfinite().all()``, ``amax`` with
  ``amin`` and ``vector_norm(v, inf)`` are 2–40× slower than the sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._vocab import Dimension, known_sizes
from .exceptions import KernelError, ShapeError

if TYPE_CHECKING:
    from ._activations import RawActivationStore
    from ._deriver import ScalarDeriver
    from ._model import ModelAdapter
    from ._vocab import PassType


def _n_tokens(raw_store: RawActivationStore) -> int | None:
    """The prompt's token count, read off any captured per-token tensor."""
    for (location, _), entry in raw_store.entries.items():
        if location.shape and location.shape[0] in (Dimension.TOKENS, Dimension.ATTENDED_TO_TOKENS):
            for tensor in entry.activations_by_layer_index.values():
                return int(tensor.shape[0])
    return None


class OutputChecker:
    """Validates kernel outputs against the declared shape (every size), dtype and finiteness."""

    def __init__(self, n_tokens: int | None, model_sizes: Mapping[Dimension, int]) -> None:
        self.n_tokens = n_tokens
        self.model_sizes = model_sizes

    @classmethod
    def for_store(
        cls,
        raw_store: RawActivationStore,
        model: ModelAdapter | None,
        n_tokens: int | None = None,
    ) -> OutputChecker:
        """``n_tokens`` when known, else read off the store's captures."""
        known = _n_tokens(raw_store) if n_tokens is None else n_tokens
        return cls(known, {} if model is None else model.dims.sizes())

    def expected(self, deriver: ScalarDeriver) -> tuple[int | None, ...]:
        """Declared sizes, ``None`` where this run cannot know one (no model, no tokens)."""
        return known_sizes(
            deriver.dst.shape,
            n_tokens=self.n_tokens,
            model_sizes=self.model_sizes,
            parameter_sizes=deriver.parameter_sizes,
        )

    def check(
        self,
        value: Any,
        deriver: ScalarDeriver,
        pass_type: PassType,
        layer: int | None,
        expected: tuple[int | None, ...],
        *,
        finite: bool = True,
    ) -> None:
        """Raise naming DST, pass, layer and plugin if ``value`` is not what was declared.

        ``expected`` is ``self.expected(deriver)``, computed once per node by the caller: this
        runs once per kernel call, so its common path is a few attribute reads and one sum.
        ``finite=False`` skips that sum, for an input passed through unchanged (a captured
        activation or an output checked when it was made).
        """
        import torch

        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and (value.shape == expected or _fits(tuple(value.shape), expected))
            # One reduction instead of an element-wise mask: a NaN or inf anywhere makes the
            # sum non-finite (an overflowing sum of finite values is re-checked exactly).
            and (
                not finite
                or deriver.dst.allows_non_finite
                or math.isfinite(value.sum().item())
                or bool(torch.isfinite(value).all())
            )
        ):
            return
        _raise(value, deriver, pass_type, layer, expected)


def _fits(actual: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(actual) == len(expected) and all(
        e is None or e == a for e, a in zip(expected, actual, strict=True)
    )


def _raise(
    value: Any,
    deriver: ScalarDeriver,
    pass_type: PassType,
    layer: int | None,
    expected: tuple[int | None, ...],
) -> None:
    """The error for an output ``OutputChecker.check`` refused, naming what is wrong."""
    import torch

    dst = deriver.dst
    at = "" if layer is None else f" at layer {layer}"
    plugin = "not from a registry" if deriver.plugin is None else repr(deriver.plugin)
    where = f"{dst.name} ({pass_type.value} pass{at}; plugin {plugin})"
    if not isinstance(value, torch.Tensor):
        raise KernelError(
            f"{where}: the kernel returned {type(value).__name__}, expected a torch.Tensor; "
            "return a tensor (convert numpy arrays with torch.as_tensor)"
        )
    if not value.is_floating_point():
        raise KernelError(
            f"{where}: the kernel returned a {value.dtype} tensor, expected a floating-point "
            "one; cast it with .to(torch.float32) or compute in floating point"
        )
    actual = tuple(value.shape)
    if not _fits(actual, expected):
        pairs = zip(dst.shape, expected, strict=True)
        shown = ", ".join(f"{d.value}={'?' if e is None else e}" for d, e in pairs)
        raise ShapeError(
            f"{where}: the kernel returned shape {actual}, declared ({shown}). Fix "
            "the kernel, or the DST's shape / the deriver's dimension_sizes"
        )
    bad = int((~torch.isfinite(value)).sum())
    raise KernelError(
        f"{where}: the kernel returned {bad} non-finite value(s) (NaN or inf) out of "
        f"{value.numel()}. Fix the kernel (e.g. a division by zero or log of 0), or "
        "declare DerivedScalarType(..., allows_non_finite=True) if they are meaningful"
    )
