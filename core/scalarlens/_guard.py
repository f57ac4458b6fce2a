"""Kernel isolation: a kernel may read what it is given, never change it.

Captured activations, other DSTs' outputs and model weights are shared by every kernel of a
``derive`` call (and weights by every later call), so one in-place operation in one plugin would
silently change everyone's numbers.  Copying every input for every kernel would double the
engine's memory, so instead each kernel runs under a torch-function mode that sees every torch
call it makes and *refuses* a write into a protected storage before it happens (in-place
methods, ``x[i] = v``, ``+=``, ``out=``).  A kernel that tries is then re-run on private copies
of its inputs and weights (copy-on-write, paid only by kernels that write), with a
``KernelMutationWarning`` naming the DST and plugin.  A function mode costs one Python call per
torch call (an ATen dispatch mode cost ~10× more here, because composite ops like ``einsum``
expand into many ATen calls); writes through ``torch.ops.aten`` directly are caught afterwards
by the tensors' version counters, as an error, since they cannot be undone.  Writes that bypass
torch altogether (through ``.numpy()``, ``untyped_storage()`` or ``.data =``) are not seen: the
kernel contract forbids them, and the docs say so.

Cost: every kernel call comes through here, and many kernels are one elementwise op, so the
common path is short.  A torch call already seen not to write costs the mode one set lookup (on
top of the ≈ 2–3 µs torch itself spends routing a call through any function mode); protected
storages are collected only when a kernel first tries a write or returns a view of a weight;
per kernel call that leaves the inputs' version counters, read before and after, and the mode's
push and pop: ≈ 3 µs (≈ 7 µs when the storages were collected up front).
"""

from __future__ import annotations

import contextvars
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .exceptions import KernelError, KernelMutationWarning

if TYPE_CHECKING:
    import torch

# The guard of the kernel running in this thread (or None), consulted by ``ctx.weight``.
_ACTIVE: contextvars.ContextVar[_KernelGuard | None] = contextvars.ContextVar(
    "scalarlens_kernel_guard", default=None
)


class _BlockedWrite(Exception):
    """Raised inside the dispatch mode when a kernel writes into a protected tensor."""


def _storage_id(tensor: Any) -> int:
    """Identifies the memory a tensor views; 0 for empty storage (it holds nothing) and for
    tensors without one (functorch wrappers, sparse layouts: never a shared capture)."""
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (NotImplementedError, RuntimeError, TypeError):
        return 0


def _version(tensor: torch.Tensor) -> int | None:
    """The version counter, ``None`` for inference tensors (they have none)."""
    return None if tensor.is_inference() else int(tensor._version)


def _versions(tensors: tuple[torch.Tensor | None, ...]) -> list[int | None]:
    try:  # the common case, one attribute read per input
        return [None if t is None else t._version for t in tensors]
    except RuntimeError:  # an inference tensor (derive under torch.inference_mode)
        return [None if t is None else _version(t) for t in tensors]


# Names that end like in-place ops but change no data (autograd flags, conversions).
_NOT_WRITES = frozenset(
    {
        "requires_grad_",
        "detach_",
        "share_memory_",
        "retain_grad",
        "__int__",
        "__index__",
        "__invert__",
        "__init_subclass__",
    }
)

# Torch functions seen not to write into their first argument: the mode's fast path.
_READS: set[Any] = set()
_WRITES: set[Any] = set()


def _writes(func: Any) -> bool:
    """Whether a torch function writes into its first argument (``mul_``, ``x[i] = v``, ``+=``).

    Decided once per function from its name; the answer is remembered in ``_READS`` (which
    the mode consults first) or ``_WRITES``.
    """
    if func in _WRITES:
        return True
    name = getattr(func, "__name__", "")
    writes = name not in _NOT_WRITES and (
        name in ("__setitem__", "set_", "copy_")
        or (name.startswith("__i") and name.endswith("__") and name not in ("__init__", "__iter__"))
        or (name.endswith("_") and not name.endswith("__"))
    )
    (_WRITES if writes else _READS).add(func)
    return writes


def _mode_class() -> type:
    """Built on first use, so that ``import scalarlens`` does not pay for it."""
    from torch.overrides import TorchFunctionMode

    class _ReadOnlyMode(TorchFunctionMode):
        """Sees every torch call a kernel makes; refuses writes into protected storage."""

        def __init__(self, guard: _KernelGuard) -> None:
            super().__init__()
            self.guard = guard

        def __torch_function__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            if func in _READS:  # the common path: a read, with no out= / inplace= keyword
                if not kwargs:
                    return func(*args)
                if "out" not in kwargs and "inplace" not in kwargs:
                    return func(*args, **kwargs)
            return self.guard.checked_call(func, args, kwargs or {})

    return _ReadOnlyMode


_MODE_CLASS: type | None = None


class _KernelGuard:
    """One kernel call: its inputs' versions, the weights it was handed, what it tried to write.

    ``private`` (a re-run on copies) protects only the model and hands out copies of weights.
    """

    def __init__(
        self,
        inputs: tuple[torch.Tensor | None, ...],
        *,
        private: bool,
        model_storages: frozenset[int] = frozenset(),
    ) -> None:
        self.inputs = inputs
        self.private = private
        self.model_storages = model_storages
        self.weights: list[tuple[torch.Tensor, int | None]] = []  # handed out, with versions
        self.blocked: str | None = None
        self.blocked_input: int = -1
        self.versions = _versions(inputs)
        self._protected: dict[int, int] | None = None

    def protected(self) -> dict[int, int]:
        """Storage -> the input it belongs to (-1: a weight handed out by ``ctx.weight``).

        Built on first need (a write attempt, or an output viewing a weight), not per call.
        """
        if self._protected is None:
            protected = (
                {}
                if self.private
                else {
                    _storage_id(t): i
                    for i, t in reversed(list(enumerate(self.inputs)))
                    if t is not None
                }
            )
            for weight, _ in self.weights:
                protected.setdefault(_storage_id(weight), -1)
            protected.pop(0, None)
            self._protected = protected
        return self._protected

    def checked_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``func(*args, **kwargs)``, unless it would write into protected storage."""
        empty = False
        if args and (_writes(func) or kwargs.get("inplace") is True):
            empty = self.check_write(args[0], getattr(func, "__name__", str(func)))
        out = kwargs.get("out")
        if out is not None:
            self.check_write(out, f"{getattr(func, '__name__', func)}(out=...)")
        result = func(*args, **kwargs)
        if empty:  # bumped a shared version counter without changing a value
            self.refresh_versions()
        return result

    def check_write(self, target: Any, op: str) -> bool:
        """Refuse a write into protected storage; ``True`` if the target is empty."""
        tensors = target if isinstance(target, (list, tuple)) else (target,)
        empty = False
        for tensor in tensors:
            if not hasattr(tensor, "untyped_storage"):
                continue
            if not tensor.numel():
                empty = True  # an empty write changes nothing
                continue
            storage = _storage_id(tensor)
            if storage and (storage in self.protected() or storage in self.model_storages):
                self.blocked = op
                self.blocked_input = self.protected().get(storage, -1)
                raise _BlockedWrite(op)
        return empty

    def refresh_versions(self) -> None:
        self.versions = _versions(self.inputs)
        self.weights = [(weight, _version(weight)) for weight, _ in self.weights]

    def hand_out(self, weight: torch.Tensor) -> torch.Tensor:
        if self.private:
            return weight.clone()
        (version,) = _versions((weight,))  # (runs under the mode: one torch call, not two)
        self.weights.append((weight, version))
        self._protected = None
        return weight

    def slipped_past(self) -> int | None:
        """The input (-1: a weight) whose version changed although no write was seen."""
        for i, (tensor, version) in enumerate(zip(self.inputs, self.versions, strict=True)):
            if version is not None and tensor is not None and tensor._version != version:
                return i
        for weight, version in self.weights:
            if version is not None and weight._version != version:
                return -1
        return None

    def unaliased(self, out: Any) -> Any:
        """The kernel's output, copied if it is a view of a model weight.

        Returning an input unchanged (raw twins) is fine and free; returning a weight would let
        whoever holds the result change the model.
        """
        if not hasattr(out, "untyped_storage"):
            return out
        storage = _storage_id(out)
        is_weight = storage and (
            storage in self.model_storages or (self.weights and self.protected().get(storage) == -1)
        )
        return out.clone() if is_weight else out


def guarded_weight(weight: torch.Tensor) -> torch.Tensor:
    """What ``ctx.weight`` returns: the weight, protected (or copied) while a kernel runs."""
    guard = _ACTIVE.get()
    return weight if guard is None else guard.hand_out(weight)


def _describe(index: int, describe_input: Callable[[int], str]) -> str:
    return "a model weight (from ctx.weight)" if index < 0 else f"its input {describe_input(index)}"


def _check_versions(
    guard: _KernelGuard, who: Callable[[], str], describe_input: Callable[[int], str]
) -> None:
    index = guard.slipped_past()
    if index is not None:
        raise KernelError(
            f"{who()}: {_describe(index, describe_input)} was modified in place through a path "
            "the engine cannot intercept (e.g. torch.ops.aten directly), or by another thread "
            "while the kernel ran; results of this call (and, for a weight, of later calls) "
            "may be wrong. Use out-of-place operations"
        )


def _guarded(
    kernel: Callable[..., Any], inputs: Any, layer: Any, ctx: Any, guard: _KernelGuard
) -> Any:
    """``kernel(inputs, layer, ctx)`` under ``guard``'s mode, with ``ctx.weight`` routed to it."""
    global _MODE_CLASS
    if _MODE_CLASS is None:
        _MODE_CLASS = _mode_class()
    token = _ACTIVE.set(guard)
    try:
        with _MODE_CLASS(guard):
            return kernel(inputs, layer, ctx)
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
    model_storages: frozenset[int] = frozenset(),
) -> Any:
    """``kernel(inputs, layer, ctx)`` that cannot change ``inputs`` or the model's weights.

    ``who()`` names the DST, plugin and layer, ``describe_input(i)`` input ``i``, for the
    warning a writing kernel earns.  ``model_storages`` are the model's parameter storages,
    protected however the kernel reached them (``ctx.model`` included).
    """
    guard = _KernelGuard(inputs, private=False, model_storages=model_storages)
    try:
        out = _guarded(kernel, inputs, layer, ctx, guard)
    except _BlockedWrite:
        pass
    except Exception:
        if guard.blocked is None:
            raise
        # The kernel swallowed our refusal and failed later: re-run it on copies below.
    else:
        if guard.blocked is None:
            _check_versions(guard, who, describe_input)
            return guard.unaliased(out)
    return _rerun_on_copies(kernel, inputs, layer, ctx, guard, who, describe_input)


def _rerun_on_copies(
    kernel: Callable[..., Any],
    inputs: tuple[torch.Tensor | None, ...],
    layer: int | None,
    ctx: Any,
    refused: _KernelGuard,
    who: Callable[[], str],
    describe_input: Callable[[int], str],
) -> Any:
    """Warn that ``refused`` blocked a write, then run the kernel again on private copies."""
    target = _describe(refused.blocked_input, describe_input)
    warning = KernelMutationWarning(
        f"{who()} tried to modify {target} in place ({refused.blocked}); the write was "
        "blocked and the kernel re-run on private copies, so no other result changed. Use "
        "out-of-place operations (x * 2, not x.mul_(2)) to avoid the copy."
    )
    warning.target = target
    warnings.warn(warning, stacklevel=3)
    copies = tuple(None if t is None else t.clone() for t in inputs)
    private = _KernelGuard(copies, private=True, model_storages=refused.model_storages)
    try:
        return private.unaliased(_guarded(kernel, copies, layer, ctx, private))
    except _BlockedWrite:
        raise KernelError(
            f"{who()} modifies the model's parameters in place ({private.blocked}) without "
            "going through ctx.weight, so it cannot be given a private copy. Read weights with "
            "ctx.weight(...) and use out-of-place operations"
        ) from None


# Per module: (registration generation, weak refs to its tensors, their storages).
_MODEL_TENSORS: weakref.WeakKeyDictionary[Any, tuple[int, list[Any], frozenset[int]]] = (
    weakref.WeakKeyDictionary()
)
_GENERATION = [0]  # bumped whenever any module registers a parameter, buffer or submodule


def _install_registration_hooks() -> None:
    """Invalidate the cache when a module gains a parameter, buffer or submodule anywhere."""
    from torch.nn.modules import module as nn_module

    def bump(*_: Any) -> None:
        _GENERATION[0] += 1

    for name in (
        "register_module_parameter_registration_hook",
        "register_module_buffer_registration_hook",
        "register_module_module_registration_hook",
    ):
        getattr(nn_module, name)(bump)


def _still_stored(refs: list[Any], storages: frozenset[int]) -> bool:
    """Every cached tensor is alive and still views a storage in ``storages``."""
    for ref in refs:
        tensor = ref()
        if tensor is None:
            return False
        storage = _storage_id(tensor)
        if storage and storage not in storages:
            return False
    return True


def model_storages(model: object) -> frozenset[int]:
    """Storages of the parameters and buffers of an adapter's ``model`` module, if it has one.

    Cached per module (walking the module tree costs about a millisecond, once per prompt
    otherwise) without keeping replaced weights alive (weak references), and revalidated:
    registering a parameter, buffer or submodule anywhere invalidates it, and a swapped
    storage (``model.to(...)``, ``param.data = ...``) shows in the cheap check below.
    """
    import torch

    module = getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        return frozenset()
    if not _GENERATION[0]:
        _install_registration_hooks()
        _GENERATION[0] = 1
    cached = _MODEL_TENSORS.get(module)
    if cached is not None:
        generation, refs, storages = cached
        if generation == _GENERATION[0] and _still_stored(refs, storages):
            return storages
    tensors = [*module.parameters(), *module.buffers()]
    storages = frozenset(_storage_id(t) for t in tensors) - {0}
    _MODEL_TENSORS[module] = (_GENERATION[0], [weakref.ref(t) for t in tensors], storages)
    return storages
