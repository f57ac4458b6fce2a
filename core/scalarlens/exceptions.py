"""Every error ScalarLens raises on purpose.

One base class so callers can catch everything of ours in one place, and each class also
subclasses the matching built-in (an unknown DST *is* a ``KeyError``, a bad option *is* a
``ValueError``) so code written against plain Python keeps working.  Messages say what was
wrong, where (plugin, distribution, DST, layer) and what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DeriverBuildError",
    "DstConflictError",
    "DstCycleError",
    "KernelError",
    "KernelMutationWarning",
    "MissingActivationError",
    "ModelInputError",
    "OutputError",
    "PluginLoadError",
    "RegistrationError",
    "ScalarLensError",
    "ShapeError",
    "StoreError",
    "TokenizerError",
    "TruncationWarning",
    "UnknownDstError",
    "UnknownInterventionError",
    "UnsupportedModelError",
    "UnsupportedPassError",
]


class ScalarLensError(Exception):
    """Base class of every error raised by ScalarLens and its plugin machinery."""


class ConfigError(ScalarLensError, ValueError):
    """A configuration value (``DstConfig`` field or plugin option) is invalid."""


class RegistrationError(ScalarLensError, TypeError):
    """A plugin handed the registry something it cannot use (wrong type, bad name)."""


class UnknownDstError(ScalarLensError, KeyError):
    """A derived scalar type name that no loaded plugin provides.

    ``KeyError`` quotes its argument with ``repr``; we override ``__str__`` so the
    suggestions print as prose, not as an escaped string.  ``hint`` (a sentence, with its
    leading space) goes before the closing pointer to ``scalarlens dsts``.
    """

    def __init__(self, name: str, suggestions: Sequence[str] = (), hint: str = "") -> None:
        self.name = name
        self.suggestions = tuple(suggestions)
        msg = f"unknown derived scalar type {name!r}"
        if self.suggestions:
            msg += "; did you mean " + " or ".join(repr(s) for s in self.suggestions) + "?"
        else:
            msg += "."
        msg += hint + " Run `scalarlens dsts` to list every registered DST."
        super().__init__(msg)

    def __str__(self) -> str:
        return str(self.args[0])


class PluginLoadError(UnknownDstError):
    """The DST exists only in a plugin that failed to load; the message carries its error."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.suggestions = ()
        KeyError.__init__(self, detail)


class DstConflictError(ScalarLensError, LookupError):
    """Two plugins registered the same DST name and no override says which one wins."""


class DeriverBuildError(ScalarLensError, RuntimeError):
    """A plugin's deriver factory raised or returned something that is not a deriver."""


class DstCycleError(ScalarLensError, RecursionError):
    """DST references form a cycle (``a`` needs ``b`` needs ``a``)."""


class UnsupportedPassError(ScalarLensError, ValueError):
    """A DST was asked for a pass (forward/backward) its deriver does not declare."""


class MissingActivationError(ScalarLensError, KeyError):
    """A deriver needs a raw activation (location, pass, layer) the store does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


class ShapeError(ScalarLensError, ValueError):
    """A tensor's shape disagrees with what its DST or weight location declares."""


class CheckpointError(ScalarLensError, ValueError):
    """A model checkpoint is missing, malformed, or in a format we refuse to load."""


class TokenizerError(ScalarLensError, ValueError):
    """Text could not be turned into token ids (unknown word, empty prompt)."""


class ModelInputError(ScalarLensError, ValueError):
    """Token ids, prompt lengths, layers or objectives handed to a model run are invalid."""


class UnsupportedModelError(ScalarLensError, ValueError):
    """A DST needs something the model does not have (a location it cannot capture, a gated
    MLP); raised before the model runs, naming the DST, the model and what would make it work."""


class UnknownInterventionError(ScalarLensError, KeyError):
    """No plugin provides the intervention a plugin location names."""

    def __str__(self) -> str:
        return str(self.args[0])


class KernelError(ScalarLensError, RuntimeError):
    """A deriver's kernel returned something unusable: not a tensor, wrong dtype, NaN/inf."""


class KernelMutationWarning(UserWarning):
    """A kernel tried to modify a tensor it does not own (an input or a model weight).

    The attempt is blocked before it happens and the kernel is re-run on private copies, so no
    other result can change; the warning names the DST and plugin so the author can switch to
    out-of-place operations (``x * 2``, not ``x.mul_(2)``) and skip the copy.  ``target``
    says what it tried to write ("its input mlp.post_act/...", "a model weight ...").
    """

    target: str = ""


class OutputError(ScalarLensError, OSError):
    """An output file cannot be written (missing or read-only directory, failed plot)."""


class StoreError(ScalarLensError, ValueError):
    """A derived-scalar store file is missing, unreadable, or was not written by ScalarLens."""


class TruncationWarning(UserWarning):
    """A corpus prompt was longer than the sweep's context and was cut to its first tokens.

    One warning per sweep: it names the first such prompt (file and line), its length and how
    many prompts were cut.
    """
