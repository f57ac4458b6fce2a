"""The whole plugin contract.

A plugin is a module (or object) named by an entry point in the ``scalarlens`` group.  It
implements any of the hooks below, decorated with ``scalarlens.hookimpl``, and may declare
``SCALARLENS_PLUGIN_API = 1`` (the contract version it was written for; a different major
version makes the registry skip it with a clear error instead of failing later).

Each hook is called once per plugin, when the registry first loads.  One plugin raising or
returning the wrong type is recorded as failed and skipped; the others keep working.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse

    from ._config import DstConfig
    from ._deriver import ScalarDeriver
    from ._dst import DerivedScalarType
    from ._model import Intervention, ModelAdapter

CliCommand = Callable[["argparse.ArgumentParser"], Callable[["argparse.Namespace", Any], int]]
"""``configure(parser) -> run``: add the command's arguments, return ``run(args, registry)``."""

PROJECT_NAME = "scalarlens"
PLUGIN_API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def scalarlens_derivers() -> Mapping[DerivedScalarType, Callable[[DstConfig], ScalarDeriver]]:
    """Return the DSTs this plugin provides, each with a factory ``config -> ScalarDeriver``.

    Factories may chain onto other plugins' DSTs by naming them in a ``DstReference`` source;
    the registry resolves references when ``registry.get`` builds the deriver.
    """
    return {}


@hookspec
def scalarlens_model_loaders() -> Mapping[str, Callable[[str], ModelAdapter]]:
    """Return model loaders keyed by a spec name or ``scheme:`` prefix.

    ``load_model("myarch:/path")`` calls the loader registered under ``"myarch:"`` with the whole
    spec; a loader registered under a plain name (``"tiny-induction"``) matches that name only.
    """
    return {}


@hookspec
def scalarlens_dst_examples() -> Mapping[str, DstConfig]:
    """Return, for DSTs that need plugin options, a config with which each can be derived.

    The conformance kit (``scalarlens.testing``) and the docs use these to exercise every DST
    on any small model; DSTs that work with ``DstConfig()`` need no entry.
    """
    return {}


@hookspec
def scalarlens_interventions() -> Mapping[
    str, Callable[[Mapping[str, Any], ModelAdapter], Sequence[Intervention]]
]:
    """Return intervention factories keyed by provider name.

    A DST that reads a ``PluginLocation`` (e.g. SAE latents spliced into the forward pass)
    names its provider; before the model runs, ``derive`` calls
    ``factory(location.params, model)`` once per distinct (provider, params) and splices the
    returned ``Intervention`` objects in.  Ablation or patching plugins use the same hook.
    """
    return {}


@hookspec
def scalarlens_cli_commands() -> Mapping[str, CliCommand]:
    """Return ``scalarlens`` subcommands keyed by name (``scalarlens graph …``).

    Each value is ``configure(parser) -> run``: it adds its arguments to the subcommand's
    ``argparse`` parser and returns ``run(args, registry) -> exit code``.  The first line of
    ``configure``'s docstring is the command's help.  Built-in command names are reserved; a
    ``configure`` that raises is reported (naming the plugin) and the other commands still work.
    """
    return {}


@hookspec
def scalarlens_feature_loaders() -> Mapping[str, Callable[[str, ModelAdapter], Any]]:
    """Return feature-dictionary loaders (transcoders, SAEs) keyed by a ``scheme:`` prefix.

    ``registry.feature_loader("transcoder:/path")`` finds the loader registered under
    ``"transcoder:"`` and calls it with the whole spec and the model the dictionary is for, so a
    plugin that consumes dictionaries (``scalarlens graph --transcoder SPEC``) never imports the
    plugin that reads them.  What the loader returns is between the two plugins' documented
    shapes (e.g. ``layers``, ``encode(layer, x)``, ``decoders``, ``b_dec`` for a transcoder).
    """
    return {}
