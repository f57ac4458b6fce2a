"""The DST registry: who provides which DST, and building resolved derivers.

``Registry`` loads plugins lazily (once, on first use), keeps every provider of every DST name,
and refuses to guess: two providers of one name is a conflict until an explicit preference
says which wins.  ``get`` builds a deriver and resolves its ``DstReference`` sources by name,
recursively, detecting cycles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ._config import DstConfig
from ._deriver import ScalarDeriver
from ._dst import DerivedScalarType
from ._plugins import (
    PluginCandidate,
    PluginInfo,
    blocked_names,
    check_api_version,
    check_derivers_result,
    discover_candidates,
    format_error,
    preferences_from_env,
)
from ._sources import DerivedScalarSource, DstReference, ScalarSource
from .exceptions import (
    DeriverBuildError,
    DstConflictError,
    DstCycleError,
    PluginLoadError,
    RegistrationError,
    ScalarLensError,
    UnknownDstError,
)

if TYPE_CHECKING:
    import pluggy

    from ._model import Intervention, ModelAdapter

Factory = Callable[[DstConfig], ScalarDeriver]
InterventionFactory = Callable[[Mapping[str, Any], "ModelAdapter"], Sequence["Intervention"]]
LOCAL_PLUGIN = "__local__"


@attrs.frozen
class Provision:
    """One plugin's offer of one DST."""

    dst: DerivedScalarType
    factory: Factory = attrs.field(eq=False)
    plugin: str


class Registry:
    """Maps DST names to deriver factories contributed by plugins.

    ``Registry()`` discovers installed plugins on first use; ``Registry(autoload=False)`` starts
    empty for tests and takes plugins through ``register`` (a module or object with hook
    implementations) or ``register_factory``.  ``prefer={"dst.name": "plugin"}`` settles a
    conflict explicitly (so does ``SCALARLENS_PREFER=dst.name=plugin``).
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
        self._prefer: dict[str, str] = dict(prefer or {})
        self._loaded = False
        self._pm: pluggy.PluginManager | None = None
        self._plugins: dict[str, PluginInfo] = {}
        self._provisions: dict[str, list[Provision]] = {}
        self._model_loaders: dict[str, tuple[Callable[[str], ModelAdapter], str]] = {}
        self._candidates: dict[str, PluginCandidate] = {}
        self._examples: dict[str, tuple[DstConfig, str]] = {}
        self._interventions: dict[str, tuple[InterventionFactory, str]] = {}

    # --- loading --------------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._autoload:
            self._prefer = {**preferences_from_env(), **self._prefer}
            blocked = self._block | blocked_names()
            for candidate in discover_candidates():
                self._load_candidate(candidate, blocked)

    def _plugin_manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            import pluggy

            from . import hookspecs

            self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            self._pm.add_hookspecs(hookspecs)
        return self._pm

    def _load_candidate(self, candidate: PluginCandidate, blocked: frozenset[str]) -> None:
        info = PluginInfo(
            name=candidate.name,
            distribution=None,
            version=None,
            module=candidate.value,
            status="loaded",
        )
        self._candidates[candidate.name] = candidate
        if candidate.name in blocked or (
            blocked and candidate.distribution_and_version()[0] in blocked
        ):
            self._plugins[candidate.name] = attrs.evolve(info, status="blocked")
            return
        try:
            plugin = candidate.load()
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            self._plugins[candidate.name] = attrs.evolve(
                info, status="failed", error=f"import failed: {format_error(exc)}"
            )
            return
        self._add_plugin(plugin, info)

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
        if plugin_name in self._plugins:
            raise RegistrationError(f"a plugin named {plugin_name!r} is already registered")
        info = PluginInfo(
            name=plugin_name,
            distribution=distribution,
            version=version,
            module=getattr(plugin, "__name__", type(plugin).__name__),
            status="loaded",
        )
        return self._add_plugin(plugin, info)

    def _add_plugin(self, plugin: object, info: PluginInfo) -> PluginInfo:
        problem = check_api_version(plugin)
        pm = self._plugin_manager()
        if problem is None:
            try:
                pm.register(plugin, name=info.name)
            except Exception as exc:  # pluggy validation errors, duplicate names
                problem = f"hook validation failed: {format_error(exc)}"
        if problem is not None:
            info = attrs.evolve(info, status="failed", error=problem)
            self._plugins[info.name] = info
            return info

        dsts: list[str] = []
        for impl in pm.hook.scalarlens_derivers.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                result = impl.function()
            except Exception as exc:
                problem = f"scalarlens_derivers() raised {format_error(exc)}"
                break
            problem = check_derivers_result(result)
            if problem is None:
                assert isinstance(result, Mapping)
                for dst, factory in result.items():
                    self._provisions.setdefault(dst.name, []).append(
                        Provision(dst, factory, info.name)
                    )
                    dsts.append(dst.name)
        if problem is None:
            for impl in pm.hook.scalarlens_model_loaders.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    loaders = impl.function()
                    if not isinstance(loaders, Mapping):
                        raise TypeError(
                            f"returned {type(loaders).__name__}, expected a mapping of "
                            "spec name to loader"
                        )
                    for key, loader in loaders.items():
                        self._model_loaders[key] = (loader, info.name)
                except Exception as exc:
                    problem = f"scalarlens_model_loaders() failed: {format_error(exc)}"
        if problem is None:
            problem = self._collect_examples(pm, plugin, info.name)
        if problem is None:
            problem = self._collect_interventions(pm, plugin, info.name)
        if problem is not None:
            pm.unregister(plugin)
            self._drop_provisions(info.name)
            info = attrs.evolve(info, status="failed", error=problem)
        else:
            info = attrs.evolve(info, dsts=tuple(dsts))
        self._plugins[info.name] = info
        return info

    def _collect_examples(
        self, pm: pluggy.PluginManager, plugin: object, plugin_name: str
    ) -> str | None:
        for impl in pm.hook.scalarlens_dst_examples.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                examples = impl.function()
            except Exception as exc:
                return f"scalarlens_dst_examples() raised {format_error(exc)}"
            if not isinstance(examples, Mapping) or not all(
                isinstance(k, str) and isinstance(v, DstConfig) for k, v in examples.items()
            ):
                return "scalarlens_dst_examples() must return a mapping of DST name to DstConfig"
            for name, config in examples.items():
                self._examples[name] = (config, plugin_name)
        return None

    def _collect_interventions(
        self, pm: pluggy.PluginManager, plugin: object, plugin_name: str
    ) -> str | None:
        for impl in pm.hook.scalarlens_interventions.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                factories = impl.function()
            except Exception as exc:
                return f"scalarlens_interventions() raised {format_error(exc)}"
            if not isinstance(factories, Mapping) or not all(
                isinstance(k, str) and callable(v) for k, v in factories.items()
            ):
                return "scalarlens_interventions() must return a mapping of name to factory"
            for name, factory in factories.items():
                if name in self._interventions:
                    other = self._interventions[name][1]
                    return f"intervention provider {name!r} is already registered by {other!r}"
                self._interventions[name] = (factory, plugin_name)
        return None

    def intervention_factory(self, provider: str) -> InterventionFactory:
        """The factory a plugin registered for ``provider`` (hook ``scalarlens_interventions``)."""
        self._ensure_loaded()
        try:
            return self._interventions[provider][0]
        except KeyError:
            known = ", ".join(sorted(self._interventions)) or "none"
            raise UnknownDstError(
                provider,
                (),
                f" No plugin provides the intervention {provider!r} "
                f"(registered: {known}); install the plugin that defines it.",
            ) from None

    def dst_examples(self) -> dict[str, DstConfig]:
        """Example configs plugins declared for DSTs that need options."""
        self._ensure_loaded()
        return {name: config for name, (config, _) in self._examples.items()}

    def _drop_provisions(self, plugin_name: str) -> None:
        for name in list(self._provisions):
            kept = [p for p in self._provisions[name] if p.plugin != plugin_name]
            if kept:
                self._provisions[name] = kept
            else:
                del self._provisions[name]
        self._model_loaders = {k: v for k, v in self._model_loaders.items() if v[1] != plugin_name}
        self._examples = {k: v for k, v in self._examples.items() if v[1] != plugin_name}
        self._interventions = {k: v for k, v in self._interventions.items() if v[1] != plugin_name}

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it contributed."""
        self._ensure_loaded()
        if name not in self._plugins:
            raise RegistrationError(f"no plugin named {name!r} is registered")
        self._drop_provisions(name)
        if self._pm is not None and self._pm.get_plugin(name) is not None:
            self._pm.unregister(name=name)
        del self._plugins[name]

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
        provision = Provision(dst, factory, plugin)
        if override:
            self._provisions[dst.name] = [provision]
        else:
            self._provisions.setdefault(dst.name, []).append(provision)
        info = self._plugins.get(plugin) or PluginInfo(
            name=plugin, distribution=None, version=None, module="(in process)", status="loaded"
        )
        if dst.name not in info.dsts:
            info = attrs.evolve(info, dsts=(*info.dsts, dst.name))
        self._plugins[plugin] = info

    def prefer(self, dst_name: str, plugin: str) -> None:
        """Settle a conflict: ``dst_name`` comes from ``plugin``."""
        self._prefer[dst_name] = plugin

    # --- queries --------------------------------------------------------------------------

    def _info(self, name: str) -> PluginInfo:
        """A plugin's record, with distribution name and version filled in on first need."""
        info = self._plugins[name]
        candidate = self._candidates.get(name)
        if candidate is not None and info.distribution is None:
            distribution, version = candidate.distribution_and_version()
            info = attrs.evolve(info, distribution=distribution, version=version)
            self._plugins[name] = info
        return info

    def plugins(self) -> tuple[PluginInfo, ...]:
        self._ensure_loaded()
        return tuple(self._info(name) for name in list(self._plugins))

    def names(self) -> tuple[str, ...]:
        self._ensure_loaded()
        return tuple(sorted(self._provisions))

    def dsts(self) -> tuple[DerivedScalarType, ...]:
        """Every DST with a usable provider, sorted by name (conflicts resolve to the preferred)."""
        self._ensure_loaded()
        out = []
        for name in sorted(self._provisions):
            try:
                out.append(self._provision(name).dst)
            except DstConflictError:
                out.append(self._provisions[name][0].dst)
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
        return key in self._provisions

    def model_loaders(self) -> dict[str, Callable[[str], ModelAdapter]]:
        self._ensure_loaded()
        return {key: loader for key, (loader, _) in self._model_loaders.items()}

    def _provision(self, name: str) -> Provision:
        self._ensure_loaded()
        offers = self._provisions.get(name)
        if not offers:
            raise self._unknown(name)
        if len(offers) == 1:
            return offers[0]
        preferred = self._prefer.get(name)
        if preferred is not None:
            for offer in offers:
                if offer.plugin == preferred:
                    return offer
        who = "; ".join(self._info(o.plugin).where() for o in offers)
        raise DstConflictError(
            f"DST {name!r} is provided by more than one plugin: {who}. Choose one with "
            f"Registry(prefer={{{name!r}: '<plugin>'}}), registry.prefer({name!r}, '<plugin>') "
            f"or SCALARLENS_PREFER={name}=<plugin>, or uninstall one of them"
        )

    def _unknown(self, name: str) -> UnknownDstError:
        import difflib  # only on this error path: it is slow to import

        suggestions = difflib.get_close_matches(name, list(self._provisions), n=3, cutoff=0.6)
        failed = [p for p in self.plugins() if p.status == "failed"]
        if failed and not suggestions:
            detail = "; ".join(f"{p.where()} failed to load: {p.error}" for p in failed)
            return PluginLoadError(
                name,
                f"unknown derived scalar type {name!r}. It may come from a plugin that failed "
                f"to load — {detail}. Fix or reinstall that plugin, then run "
                "`scalarlens plugins` to check.",
            )
        return UnknownDstError(name, suggestions)

    # --- building -------------------------------------------------------------------------

    def get(self, dst: str | DerivedScalarType, config: DstConfig | None = None) -> ScalarDeriver:
        """Build the deriver for ``dst`` with every DST reference in its tree resolved."""
        name = dst if isinstance(dst, str) else dst.name
        memo: dict[tuple[str, DstConfig], ScalarDeriver] = {}
        return self._build(name, config or DstConfig(), (), memo)

    def from_serializable_dict(self, data: Mapping[str, Any]) -> ScalarDeriver:
        """Rebuild a deriver from ``ScalarDeriver.to_serializable_dict()`` output."""
        return self.get(str(data["dst"]), DstConfig.from_dict(data.get("config", {})))

    def _build(
        self,
        name: str,
        config: DstConfig,
        stack: tuple[str, ...],
        memo: dict[tuple[str, DstConfig], ScalarDeriver],
    ) -> ScalarDeriver:
        if name in stack:
            cycle = " -> ".join((*stack[stack.index(name) :], name))
            raise DstCycleError(f"DST references form a cycle: {cycle}")
        if (name, config) in memo:
            return memo[(name, config)]
        provision = self._provision(name)
        try:
            deriver = provision.factory(config)
        except ScalarLensError:
            raise
        except Exception as exc:
            raise DeriverBuildError(
                f"building {name!r} failed in {self._info(provision.plugin).where()}: "
                f"{format_error(exc)}"
            ) from exc
        if not isinstance(deriver, ScalarDeriver):
            raise DeriverBuildError(
                f"the factory for {name!r} in {self._info(provision.plugin).where()} returned "
                f"{type(deriver).__name__}, not a ScalarDeriver"
            )
        if deriver.dst != provision.dst:
            raise DeriverBuildError(
                f"the factory for {name!r} in {self._info(provision.plugin).where()} built a "
                f"deriver for {deriver.dst.name!r} (or with different metadata); it must build "
                "the DST it registered"
            )
        resolved = self._resolve(deriver, (*stack, name), memo)
        memo[(name, config)] = resolved
        return resolved

    def _resolve(
        self,
        deriver: ScalarDeriver,
        stack: tuple[str, ...],
        memo: dict[tuple[str, DstConfig], ScalarDeriver],
    ) -> ScalarDeriver:
        sources: list[ScalarSource] = []
        changed = False
        for source in deriver.sub_scalar_sources:
            new: ScalarSource = source
            if isinstance(source, DstReference):
                target = self._build(source.dst_name, source.config or deriver.config, stack, memo)
                new = DerivedScalarSource(target, source.pass_type, source.layer_indexer)
            elif isinstance(source, DerivedScalarSource):
                inner = self._resolve(source.scalar_deriver, stack, memo)
                if inner is not source.scalar_deriver:
                    new = attrs.evolve(source, scalar_deriver=inner)
            changed = changed or new is not source
            sources.append(new)
        return attrs.evolve(deriver, sub_scalar_sources=tuple(sources)) if changed else deriver


registry = Registry()
"""The process-wide registry; plugins are discovered on its first use."""
