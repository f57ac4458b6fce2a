"""The DST registry: who provides which DST, and building resolved derivers.

``Registry`` loads plugins lazily (exactly once, under a lock, never visible half-done), keeps
every offer of every name (DSTs, model loaders, intervention providers) and refuses to guess:
two providers of one name is a conflict until an explicit preference says which wins.
``get`` builds a deriver and resolves its ``DstReference`` sources by name, recursively,
detecting cycles.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs

from ._bundled import BUNDLED_MODELS
from ._config import DstConfig
from ._deriver import DerivedScalarSource, ScalarDeriver
from ._dst import DerivedScalarType
from ._offers import Offer, OfferTable, Provision
from ._plugins import (
    PluginInfo,
    PluginSet,
    blocked_names,
    discover_candidates,
    format_error,
    preferences_from_env,
)
from ._sources import DstReference, ScalarSource
from .exceptions import (
    ConfigError,
    DeriverBuildError,
    DstCycleError,
    PluginLoadError,
    RegistrationError,
    ScalarLensError,
    UnknownDstError,
    UnknownInterventionError,
)

if TYPE_CHECKING:
    from ._model import Intervention, ModelAdapter

from ._recipes import Factory

InterventionFactory = Callable[[Mapping[str, Any], "ModelAdapter"], Sequence["Intervention"]]
ModelLoader = Callable[[str], "ModelAdapter"]
LOCAL_PLUGIN = "__local__"
CORE = "scalarlens"  # the pseudo-plugin offering the bundled models


class Problem(NamedTuple):
    """One thing ``scalarlens plugins --check`` found wrong, and whose it is."""

    plugin: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.plugin}: {self.subject}: {self.message}"


class Registry:
    """Maps DST names to deriver factories contributed by plugins.

    ``Registry()`` discovers installed plugins on first use; ``Registry(autoload=False)`` starts
    empty for tests and takes plugins through ``register`` (a module or object with hook
    implementations) or ``register_factory``.  ``prefer={"name": "plugin"}`` settles a
    conflict over a DST, model loader or intervention provider explicitly (so does
    ``SCALARLENS_PREFER=name=plugin``).  Safe to share between threads.
    """

    def __init__(
        self,
        *,
        autoload: bool = True,
        block: Iterable[str] = (),
        prefer: Mapping[str, str] | None = None,
    ) -> None:
        self._autoload = autoload
        self._block = frozenset(block)
        self._explicit_prefer: dict[str, str] = dict(prefer or {})
        self._lock = threading.RLock()
        self._loading_thread: int | None = None
        self._loaded = False
        self._reset()

    def _reset(self) -> None:
        self._prefer: dict[str, str] = dict(self._explicit_prefer)
        self._set = PluginSet()
        self._plugins = self._set.records
        offered = self._set.contributions
        self._dsts, self._loaders = offered.dsts, offered.loaders
        self._interventions, self._examples = offered.interventions, offered.examples

    # --- loading --------------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading_thread == threading.get_ident():
                return  # done meanwhile, or a plugin being loaded is using the registry
            self._loading_thread = threading.get_ident()
            try:
                if self._autoload:
                    self._prefer = {**preferences_from_env(), **self._explicit_prefer}
                    blocked = self._block | blocked_names()
                    for candidate in discover_candidates():
                        self._set.load_candidate(candidate, blocked)
                self._loaded = True  # only now may other threads see the tables
            except BaseException:
                self._reset()  # e.g. Ctrl-C mid-discovery: the next use starts over
                raise
            finally:
                self._loading_thread = None

    def register(
        self,
        plugin: object,
        name: str | None = None,
        *,
        distribution: str | None = None,
        version: str | None = None,
    ) -> PluginInfo:
        """Load an in-process plugin (module or object with hook implementations)."""
        self._ensure_loaded()
        plugin_name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        with self._lock:
            if plugin_name in self._plugins:
                raise RegistrationError(f"a plugin named {plugin_name!r} is already registered")
            info = PluginInfo(
                name=plugin_name,
                distribution=distribution,
                version=version,
                module=getattr(plugin, "__name__", type(plugin).__name__),
                status="loaded",
            )
            return self._set.add(plugin, info)

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it contributed."""
        self._ensure_loaded()
        with self._lock:
            if name not in self._plugins:
                raise RegistrationError(f"no plugin named {name!r} is registered")
            self._set.remove(name)

    def register_factory(
        self,
        dst: DerivedScalarType,
        factory: Factory,
        *,
        plugin: str = LOCAL_PLUGIN,
        override: bool = False,
    ) -> None:
        """Register one factory in process.  ``override=True`` replaces every other provider."""
        self._ensure_loaded()
        if not isinstance(dst, DerivedScalarType):
            raise RegistrationError(f"expected a DerivedScalarType, got {type(dst).__name__}")
        if not callable(factory):
            raise RegistrationError(f"the factory for {dst.name!r} is not callable")
        with self._lock:
            self._dsts.add(dst.name, Provision(dst, factory, plugin), plugin, replace=override)
            info = self._plugins.get(plugin) or PluginInfo(
                name=plugin,
                distribution=None,
                version=None,
                module="(in process)",
                status="loaded",
            )
            if dst.name not in info.dsts:
                info = attrs.evolve(info, dsts=(*info.dsts, dst.name))
            self._plugins[plugin] = info

    def prefer(self, name: str, plugin: str) -> None:
        """Settle a conflict: the DST, model loader or provider ``name`` comes from ``plugin``."""
        self._ensure_loaded()
        tables = (self._dsts, self._loaders, self._interventions)
        offered = [o.plugin for t in tables for o in t.offers(name)]
        offered += [CORE] if name in BUNDLED_MODELS else []
        if plugin not in offered:
            raise ConfigError(
                f"cannot prefer plugin {plugin!r} for {name!r}: it offers nothing under that "
                f"name (offered by: {', '.join(offered) or 'no plugin'})"
            )
        with self._lock:
            self._explicit_prefer[name] = plugin
            self._prefer[name] = plugin

    # --- queries --------------------------------------------------------------------------

    def _info(self, name: str) -> PluginInfo:
        return self._set.info(name)

    def _where(self, plugin: str) -> str:
        if plugin == CORE:
            return "scalarlens itself (a bundled model)"
        if plugin not in self._plugins:
            return f"plugin {plugin!r}"
        return self._info(plugin).where()

    def plugins(self) -> tuple[PluginInfo, ...]:
        self._ensure_loaded()
        return tuple(self._info(name) for name in list(self._plugins))

    def names(self) -> tuple[str, ...]:
        self._ensure_loaded()
        return tuple(sorted(self._dsts))

    def dsts(self) -> tuple[DerivedScalarType, ...]:
        """Every DST with a usable provider, sorted by name (conflicts resolve to the preferred)."""
        self._ensure_loaded()
        out = []
        for name in sorted(self._dsts):
            try:
                out.append(self._provision(name).dst)
            except ScalarLensError:
                out.append(self._dsts.offers(name)[0].value.dst)
        return tuple(out)

    def dst(self, name: str | DerivedScalarType) -> DerivedScalarType:
        return self._provision(name if isinstance(name, str) else name.name).dst

    def provider(self, name: str | DerivedScalarType) -> PluginInfo:
        """The plugin that provides a DST (after conflict resolution)."""
        plugin = self._provision(name if isinstance(name, str) else name.name).plugin
        return self._info(plugin)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        key = name.name if isinstance(name, DerivedScalarType) else name
        return key in self._dsts

    def _resolve_offer(self, table: OfferTable, name: str, extra: tuple[Offer, ...] = ()) -> Offer:
        return table.resolve(name, (*table.offers(name), *extra), self._prefer, self._where)

    def model_loaders(self) -> dict[str, ModelLoader]:
        """Every plugin loader key with its loader (the preferred one where two conflict)."""
        self._ensure_loaded()
        out: dict[str, ModelLoader] = {}
        for key, offers in self._loaders.items():
            try:
                out[key] = self._resolve_offer(self._loaders, key).value
            except ScalarLensError:
                out[key] = offers[0].value
        return out

    def model_loader(self, spec: str) -> ModelLoader | None:
        """The plugin loader for ``spec`` (exact name, else ``scheme:`` prefix), or ``None``.

        ``None`` also when a bundled model of that name wins; a plugin loader registered under
        a bundled model's name is a conflict like any other, settled by a preference.
        """
        self._ensure_loaded()
        bundled = (Offer(spec, None, CORE),) if spec in BUNDLED_MODELS else ()
        if spec in self._loaders or bundled:
            value: ModelLoader | None = self._resolve_offer(self._loaders, spec, bundled).value
            return value
        schemes = [key for key in self._loaders if key.endswith(":") and spec.startswith(key)]
        if not schemes:
            return None
        value = self._resolve_offer(self._loaders, max(schemes, key=len)).value
        return value

    def feature_loader(self, spec: str) -> Any:
        """The plugin loader for a feature dictionary ``spec`` (by its ``scheme:`` prefix).

        Raises ``ConfigError`` naming the registered schemes when no plugin reads ``spec``.
        """
        self._ensure_loaded()
        table = self._set.contributions.features
        schemes = [key for key in table if key.endswith(":") and spec.startswith(key)]
        if not schemes:
            known = ", ".join(sorted(table)) or "none (install scalarlens-sae for transcoders)"
            raise ConfigError(
                f"no plugin loads the feature dictionary {spec!r}: give it a registered "
                f"scheme prefix (registered: {known})"
            )
        return self._resolve_offer(table, max(schemes, key=len)).value

    def intervention_factory(self, provider: str) -> InterventionFactory:
        """The factory a plugin registered for ``provider`` (hook ``scalarlens_interventions``)."""
        self._ensure_loaded()
        if provider not in self._interventions:
            known = ", ".join(sorted(self._interventions)) or "none"
            raise UnknownInterventionError(
                f"no plugin provides the intervention {provider!r} (registered: {known}); "
                "install the plugin that defines it, then check with `scalarlens plugins`"
            )
        factory: InterventionFactory = self._resolve_offer(self._interventions, provider).value
        return factory

    def cli_commands(self) -> dict[str, tuple[str, Any]]:
        """Plugin subcommands: name -> (plugin, ``configure``); the first plugin wins a clash."""
        self._ensure_loaded()
        return {
            name: (offers[0].plugin, offers[0].value)
            for name, offers in self._set.contributions.commands.items()
        }

    def dst_examples(self) -> dict[str, DstConfig]:
        """Example configs plugins declared for DSTs that need options."""
        self._ensure_loaded()
        out = {}
        for name, offers in self._examples.items():
            chosen = offers[0]
            if name in self._dsts:
                try:
                    plugin = self._provision(name).plugin
                    chosen = next((o for o in offers if o.plugin == plugin), chosen)
                except ScalarLensError:
                    pass
            out[name] = chosen.value
        return out

    def _provision(self, name: str) -> Provision:
        self._ensure_loaded()
        if name not in self._dsts:
            raise self._unknown(name)
        provision: Provision = self._resolve_offer(self._dsts, name).value
        return provision

    def _unknown(self, name: str) -> UnknownDstError:
        import difflib  # only on this error path: it is slow to import

        suggestions = difflib.get_close_matches(name, list(self._dsts), n=3, cutoff=0.6)
        failed = [p for p in self.plugins() if p.status == "failed"]
        detail = "; ".join(f"{p.where()} failed to load: {p.error}" for p in failed)
        if failed and not suggestions:
            return PluginLoadError(
                name,
                f"unknown derived scalar type {name!r}. It may come from a plugin that failed "
                f"to load — {detail}. Fix or reinstall that plugin, then run "
                "`scalarlens plugins` to check.",
            )
        hint = f" It may also come from a plugin that failed to load — {detail}." if failed else ""
        return UnknownDstError(name, suggestions, hint)

    # --- building -------------------------------------------------------------------------

    def get(self, dst: str | DerivedScalarType, config: DstConfig | None = None) -> ScalarDeriver:
        """Build the deriver for ``dst`` with every DST reference in its tree resolved."""
        name = dst if isinstance(dst, str) else dst.name
        memo: dict[tuple[str, DstConfig], ScalarDeriver] = {}
        return self._build(self._provision(name), config or DstConfig(), (), memo)

    def from_serializable_dict(self, data: Mapping[str, Any]) -> ScalarDeriver:
        """Rebuild a deriver from ``ScalarDeriver.to_serializable_dict()`` output."""
        return self.get(str(data["dst"]), DstConfig.from_dict(data.get("config", {})))

    def _build(
        self,
        provision: Provision,
        config: DstConfig,
        stack: tuple[str, ...],
        memo: dict[tuple[str, DstConfig], ScalarDeriver],
    ) -> ScalarDeriver:
        name = provision.dst.name
        if name in stack:
            cycle = " -> ".join((*stack[stack.index(name) :], name))
            raise DstCycleError(f"DST references form a cycle: {cycle}")
        if (name, config) in memo:
            return memo[(name, config)]
        deriver = self._call_factory(provision, config)
        resolved = self._resolve(deriver, provision.plugin, (*stack, name), memo)
        memo[(name, config)] = resolved
        return resolved

    def _call_factory(self, provision: Provision, config: DstConfig) -> ScalarDeriver:
        name = provision.dst.name

        def where() -> str:
            return self._where(provision.plugin)

        try:
            deriver = provision.factory(config)
        except ScalarLensError:
            raise
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise DeriverBuildError(
                f"building {name!r} failed in {where()}: {format_error(exc)}"
            ) from exc
        if not isinstance(deriver, ScalarDeriver):
            raise DeriverBuildError(
                f"the factory for {name!r} in {where()} returned {type(deriver).__name__}, "
                "not a ScalarDeriver"
            )
        if deriver.dst != provision.dst:
            raise DeriverBuildError(
                f"the factory for {name!r} in {where()} built a deriver for "
                f"{deriver.dst.name!r} (or with different metadata); it must build the DST it "
                "registered"
            )
        return deriver

    def _resolve(
        self,
        deriver: ScalarDeriver,
        plugin: str,
        stack: tuple[str, ...],
        memo: dict[tuple[str, DstConfig], ScalarDeriver],
    ) -> ScalarDeriver:
        """``deriver`` with references built, and every deriver of its tree naming its plugin."""
        sources: list[ScalarSource] = []
        for source in deriver.sub_scalar_sources:
            new: ScalarSource = source
            if isinstance(source, DstReference):
                target = self._build(
                    self._referenced(source.dst_name, deriver.dst.name, plugin),
                    source.config or deriver.config,
                    stack,
                    memo,
                )
                new = DerivedScalarSource(
                    target, source.pass_type, source.layer_indexer, source.prompt
                )
            elif isinstance(source, DerivedScalarSource):
                inner = self._resolve(source.scalar_deriver, plugin, stack, memo)
                if inner is not source.scalar_deriver:
                    new = attrs.evolve(source, scalar_deriver=inner)
            sources.append(new)
        changed = any(a is not b for a, b in zip(sources, deriver.sub_scalar_sources, strict=True))
        if not changed and deriver.plugin is not None:
            return deriver
        return attrs.evolve(
            deriver, sub_scalar_sources=tuple(sources), plugin=deriver.plugin or plugin
        )

    def _referenced(self, name: str, holder: str, plugin: str) -> Provision:
        """The provision a ``DstReference`` names; unknown names say who holds the reference."""
        try:
            return self._provision(name)
        except UnknownDstError as exc:
            raise UnknownDstError(
                name,
                exc.suggestions,
                f" It is referenced by {holder!r} from {self._where(plugin)}: fix the "
                "reference or install the plugin that provides it (`scalarlens plugins "
                "--check` lists every unresolved reference).",
            ) from None

    # --- checking -------------------------------------------------------------------------

    def check(self) -> list[Problem]:
        """Everything wrong with the installed plugins, found without running a model.

        Builds every offered DST (each provider's, conflicts included) with its example
        config and resolves its references; reports failed plugins, conflicts and
        preferences that match nothing.
        """
        self._ensure_loaded()
        problems = [
            Problem(info.name, "load", info.error or "")
            for info in self.plugins()
            if info.status == "failed"
        ]
        examples = self.dst_examples()
        for name, offers in sorted(self._dsts.items()):
            for offer in offers:
                provision: Provision = offer.value
                try:
                    self._build(provision, examples.get(name, DstConfig()), (), {})
                except ScalarLensError as exc:
                    problems.append(Problem(offer.plugin, name, str(exc)))
        for table in (self._dsts, self._loaders, self._interventions):
            for name in table:
                bundled = (
                    (Offer(name, None, CORE),)
                    if table is self._loaders and (name in BUNDLED_MODELS)
                    else ()
                )
                try:
                    self._resolve_offer(table, name, bundled)
                except ScalarLensError as exc:
                    plugins = ", ".join(o.plugin for o in table.offers(name))
                    problems.append(Problem(plugins, name, str(exc)))
        for name, plugin in sorted(self._prefer.items()):
            if not any(name in t for t in (self._dsts, self._loaders, self._interventions)):
                problems.append(
                    Problem(
                        plugin,
                        name,
                        f"the preference {name}={plugin} matches nothing: "
                        "no plugin offers that name",
                    )
                )
        return problems


registry = Registry()
"""The process-wide registry; plugins are discovered on its first use."""
