"""Kernel isolation: a kernel may read what it is given, never change it.

Captured activations, other DSTs' outputs and model weights are shared by every kernel of a
``derive`` call (and weights by every later call), so one in-place operation in one plugin would
silently change everyone's numbers.  Copying every input for every kernel would double the
engine's memory, so instead each kernel runs under a dispatch mode that sees every ATen
operation and *refuses* a write into a protected storage before it happens.  A kernel that tries
is then re-run on private copies of its inputs and weights (copy-on-write, paid only by kernels
that write), with a ``KernelMutationWarning`` naming the DST and plugin.
"""

from __future__ import annotations

import contextvars
import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .exceptions import KernelMutationWarning

if TYPE_CHECKING:
    import torch

# The guard of the kernel running in this thread (or None), consulted by ``ctx.weight``.
_ACTIVE: contextvars.ContextVar[_KernelGuard | None] = contextvars.ContextVar(
    "scalarlens_kernel_guard", default=None
)


class _BlockedWrite(Exception):
    """Raised inside the dispatch mode when a kernel writes into a protected tensor."""


def _storage_id(tensor: torch.Tensor) -> int:
    """Identifies the memory a tensor views (0 for empty storage, which holds nothing)."""
    return int(tensor.untyped_storage().data_ptr())


@functools.cache
def _written_arguments(schema: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of every argument an ATen op writes (``self`` of ``mul_``, ``out=``)."""
    return tuple(
        (i, arg.name)
        for i, arg in enumerate(schema.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write
    )


def _dispatch_mode_class() -> type:
    """Built on first use: importing torch's dispatch machinery costs startup time."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _ReadOnlyMode(TorchDispatchMode):  # type: ignore[no-untyped-call]
        def __init__(self, guard: _KernelGuard) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.guard = guard

        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            for position, name in _written_arguments(func._schema):
                target = args[position] if position < len(args) else kwargs.get(name)
                self.guard.check_write(target, str(func))
            return func(*args, **kwargs)

    return _ReadOnlyMode


_MODE_CLASS: type | None = None


class _KernelGuard:
    """Protected storages of one kernel call; ``private`` hands out copies instead."""

    def __init__(self, inputs: tuple[torch.Tensor | None, ...], *, private: bool) -> None:
        self.private = private
        # storage -> the input it belongs to (-1: a weight handed out by ctx.weight)
        self.protected = {
            _storage_id(t): i for i, t in reversed(list(enumerate(inputs))) if t is not None
        }
        self.protected.pop(0, None)
        self.blocked: str | None = None
        self.blocked_input: int = -1

    def check_write(self, target: Any, op: str) -> None:
        tensors = target if isinstance(target, (list, tuple)) else (target,)
        for tensor in tensors:
            if hasattr(tensor, "untyped_storage") and _storage_id(tensor) in self.protected:
                self.blocked = op
                self.blocked_input = self.protected[_storage_id(tensor)]
                raise _BlockedWrite(op)

    def hand_out(self, weight: torch.Tensor) -> torch.Tensor:
        if self.private:
            return weight.clone()
        self.protected.setdefault(_storage_id(weight), -1)
        self.protected.pop(0, None)
        return weight


def _unaliased(out: Any, guard: _KernelGuard, inputs: tuple[torch.Tensor | None, ...]) -> Any:
    """The kernel's output, copied if it is a view of a model weight.

    Returning an input unchanged (raw twins) is fine and free; returning a weight would let
    whoever holds the result change the model.
    """
    if not hasattr(out, "untyped_storage"):
        return out
    return out.clone() if guard.protected.get(_storage_id(out)) == -1 else out


def guarded_weight(weight: torch.Tensor) -> torch.Tensor:
    """What ``ctx.weight`` returns: the weight, protected (or copied) while a kernel runs."""
    guard = _ACTIVE.get()
    return weight if guard is None else guard.hand_out(weight)


@contextmanager
def _active(guard: _KernelGuard) -> Iterator[None]:
    token = _ACTIVE.set(guard)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def run_kernel(
    kernel: Callable[..., Any],
    inputs: tuple[torch.Tensor | None, ...],
    layer: int | None,
    ctx: Any,
    *,
    who: Callable[[], str],
    describe_input: Callable[[int], str],
) -> Any:
    """``kernel(inputs, layer, ctx)`` that cannot change ``inputs`` or the model's weights.

    ``who()`` names the DST, plugin and layer, ``describe_input(i)`` input ``i``, for the
    warning a writing kernel earns.
    """
    global _MODE_CLASS
    if _MODE_CLASS is None:
        _MODE_CLASS = _dispatch_mode_class()
    guard = _KernelGuard(inputs, private=False)
    try:
        with _active(guard), _MODE_CLASS(guard):
            out = kernel(inputs, layer, ctx)
    except _BlockedWrite:
        pass
    except Exception:
        if guard.blocked is None:
            raise
        # The kernel swallowed our refusal and failed later: re-run it on copies below.
    else:
        if guard.blocked is None:
            return _unaliased(out, guard, inputs)
    target = (
        "a model weight (from ctx.weight)"
        if guard.blocked_input < 0
        else f"its input {describe_input(guard.blocked_input)}"
    )
    warning = KernelMutationWarning(
        f"{who()} tried to modify {target} in place ({guard.blocked}); the write was "
        "blocked and the kernel re-run on private copies, so no other result changed. Use "
        "out-of-place operations (x * 2, not x.mul_(2)) to avoid the copy."
    )
    warning.target = target
    warnings.warn(warning, stacklevel=2)
    copies = tuple(None if t is None else t.clone() for t in inputs)
    with _active(_KernelGuard(copies, private=True)):
        return kernel(copies, layer, ctx)
