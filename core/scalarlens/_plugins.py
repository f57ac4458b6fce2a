"""Finding plugins: entry points, environment switches, and per-plugin failure isolation.

Discovery reads entry-point *metadata* once; a plugin module is imported only when it is
loaded.  Every way a plugin can fail (import error, bad API version, hook raising, wrong return
type) is caught here and turned into a ``PluginInfo`` with status ``failed`` and the original
error, so one broken distribution never takes the registry down.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._offers import Contributions
from .hookspecs import PLUGIN_API_VERSION

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    import pluggy

ENTRY_POINT_GROUP = "scalarlens"
ENV_DISABLE_AUTOLOAD = "SCALARLENS_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "SCALARLENS_BLOCK_PLUGINS"
ENV_LOAD = "SCALARLENS_PLUGINS"
ENV_PREFER = "SCALARLENS_PREFER"


@attrs.frozen
class PluginInfo:
    """What ``registry.plugins()`` reports about one plugin."""

    name: str
    distribution: str | None
    version: str | None
    module: str
    status: str  # "loaded", "failed" or "blocked"
    dsts: tuple[str, ...] = ()
    error: str | None = None
    # Seconds spent importing the module and calling its hooks (None: not imported).
    load_seconds: float | None = None

    def where(self) -> str:
        dist = self.distribution or "not installed as a distribution"
        ver = f" {self.version}" if self.version else ""
        return f"plugin {self.name!r} (distribution {dist}{ver}, module {self.module})"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def distribution_and_version(entry_point: EntryPoint) -> tuple[str | None, str | None]:
    """The name and version of the distribution declaring ``entry_point``, read on demand.

    Parsing ``METADATA`` costs more than discovery itself, so only ``registry.plugins()`` and
    error messages ask for it.
    """
    if entry_point.dist is None:
        return None, None
    try:
        return entry_point.dist.metadata["Name"], entry_point.dist.version
    except Exception:  # a distribution with unreadable metadata still loads
        return None, None


def _split_env(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def blocked_names() -> frozenset[str]:
    return frozenset(_split_env(ENV_BLOCK))


def preferences_from_env() -> dict[str, str]:
    """``SCALARLENS_PREFER="mlp.write_norm=myplugin,..."`` → ``{dst: plugin}``."""
    out = {}
    for item in _split_env(ENV_PREFER):
        dst, sep, plugin = item.partition("=")
        if sep:
            out[dst.strip()] = plugin.strip()
    return out


def _entry_points(group: str) -> list[EntryPoint]:
    """``importlib.metadata.entry_points(group=group)``, parsing only the files that mention it.

    The same entry points in the same order: the first distribution of each name on the path
    (the standard library's rule and key), its ``entry_points.txt`` parsed for ``group``.  Most
    installed distributions declare console scripts and nothing of ours; parsing every file was
    most of discovery's cost, and a substring test skips them.  (The standard library's reader:
    the importlib-metadata backport measured ~11 ms against ~2 ms, and torch imports this one.)
    """
    from importlib.metadata import distributions

    seen: set[str] = set()
    found: list[EntryPoint] = []
    for dist in distributions():
        # entry_points()'s own key, taken from the directory name without parsing METADATA
        # (private, but there in every Python this supports; the fallback parses METADATA).
        key = getattr(dist, "_normalized_name", None) or dist.metadata["Name"]
        if key in seen:
            continue
        seen.add(key)
        text = dist.read_text("entry_points.txt")
        if text and group in text:
            found += dist.entry_points.select(group=group)
    return found


def discover_candidates() -> list[EntryPoint]:
    """Entry points of the ``scalarlens`` group, honouring the autoload switches.

    Found on the path, not yet imported: a plugin module is imported when it is loaded.
    """
    autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").lower() in ("", "0", "false", "no")
    explicit = set(_split_env(ENV_LOAD))
    if not autoload and not explicit:
        return []
    return [ep for ep in _entry_points(ENTRY_POINT_GROUP) if autoload or ep.name in explicit]


def format_error(exc: BaseException) -> str:
    """One line for tables plus the location where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def check_api_version(plugin: object) -> str | None:
    declared = getattr(plugin, "SCALARLENS_PLUGIN_API", PLUGIN_API_VERSION)
    if declared != PLUGIN_API_VERSION:
        return (
            f"plugin declares SCALARLENS_PLUGIN_API = {declared!r} but this scalarlens speaks "
            f"version {PLUGIN_API_VERSION}; upgrade the plugin or scalarlens so they match"
        )
    return None


def call_hook(pm: Any, hook: str, plugin: object) -> tuple[list[Any], str | None]:
    """Every result ``plugin``'s implementation of ``hook`` returned, or why it failed.

    The one place a plugin's hook is called: whatever it raises — ``SystemExit`` included,
    ``KeyboardInterrupt`` aside — becomes that plugin's failure, never the process's.
    """
    results = []
    for impl in getattr(pm.hook, hook).get_hookimpls():
        if impl.plugin is not plugin:
            continue
        try:
            results.append(impl.function())
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            return [], f"{hook}() raised {format_error(exc)}"
    return results, None


def check_mapping(hook: str, result: object, key: type, value: str) -> str | None:
    """Why ``result`` is not a mapping of ``key`` to a callable, or ``None`` if it is."""
    if not isinstance(result, Mapping):
        return (
            f"{hook}() returned {type(result).__name__}; expected a mapping of "
            f"{key.__name__} to {value}"
        )
    for name, item in result.items():
        if not isinstance(name, key):
            return (
                f"{hook}() returned a key of type {type(name).__name__} ({name!r}); keys must "
                f"be {key.__name__} values"
            )
        if not callable(item):
            return f"{hook}(): the {value} for {str(name)!r} is not callable"
    return None


def check_derivers_result(result: object) -> str | None:
    """Why a ``scalarlens_derivers`` return value is unusable, or ``None`` if it is fine."""
    from ._dst import DerivedScalarType

    if not isinstance(result, Mapping):
        return (
            f"scalarlens_derivers() returned {type(result).__name__}; expected a mapping "
            "{DerivedScalarType: factory(config) -> ScalarDeriver}"
        )
    for dst, factory in result.items():
        if not isinstance(dst, DerivedScalarType):
            return (
                f"scalarlens_derivers() returned a key of type {type(dst).__name__} ({dst!r}); "
                "keys must be DerivedScalarType values"
            )
        if not callable(factory):
            return f"scalarlens_derivers(): the factory for {dst.name!r} is not callable"
    return None


def _check_loaders(result: object) -> str | None:
    return check_mapping("scalarlens_model_loaders", result, str, "loader")


def _check_interventions(result: object) -> str | None:
    return check_mapping("scalarlens_interventions", result, str, "intervention factory")


def _check_feature_loaders(result: object) -> str | None:
    return check_mapping("scalarlens_feature_loaders", result, str, "feature loader")


def _check_commands(result: object) -> str | None:
    return check_mapping("scalarlens_cli_commands", result, str, "command")


def _check_examples(result: object) -> str | None:
    from ._config import DstConfig

    if not isinstance(result, Mapping) or not all(
        isinstance(k, str) and isinstance(v, DstConfig) for k, v in result.items()
    ):
        return "scalarlens_dst_examples() must return a mapping of DST name to DstConfig"
    return None


# Each hook with the check its return value must pass before anything it offers is filed.
HOOK_CHECKS: tuple[tuple[str, Callable[[object], str | None]], ...] = (
    ("scalarlens_derivers", check_derivers_result),
    ("scalarlens_model_loaders", _check_loaders),
    ("scalarlens_dst_examples", _check_examples),
    ("scalarlens_interventions", _check_interventions),
    ("scalarlens_cli_commands", _check_commands),
    ("scalarlens_feature_loaders", _check_feature_loaders),
)


class PluginSet:
    """The loaded plugins: their records, their pluggy registrations and what they offer.

    Loading lives here, apart from resolution (``Registry``): importing a candidate, calling
    each of its hooks once through one collector, and turning every way that can fail into a
    ``failed`` record instead of an exception.
    """

    def __init__(self) -> None:
        self.records: dict[str, PluginInfo] = {}
        self.candidates: dict[str, EntryPoint] = {}
        self.contributions = Contributions()
        self._pm: pluggy.PluginManager | None = None

    def manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            import pluggy

            from . import hookspecs

            self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            self._pm.add_hookspecs(hookspecs)
        return self._pm

    def remove(self, name: str) -> None:
        """Forget a plugin and everything it contributed."""
        self.contributions.drop(name)
        if self._pm is not None and self._pm.get_plugin(name) is not None:
            self._pm.unregister(name=name)
        del self.records[name]

    def info(self, name: str) -> PluginInfo:
        """A plugin's record, with distribution name and version filled in on first need."""
        info = self.records[name]
        candidate = self.candidates.get(name)
        if candidate is not None and info.distribution is None:
            distribution, version = distribution_and_version(candidate)
            info = attrs.evolve(info, distribution=distribution, version=version)
            self.records[name] = info
        return info

    def load_candidate(self, candidate: EntryPoint, blocked: frozenset[str]) -> None:
        info = PluginInfo(
            name=candidate.name,
            distribution=None,
            version=None,
            module=candidate.value,
            status="loaded",
        )
        if candidate.name in self.candidates:
            self._record_duplicate(candidate, info)
            return
        self.candidates[candidate.name] = candidate
        if candidate.name in blocked or (
            blocked and distribution_and_version(candidate)[0] in blocked
        ):
            self.records[candidate.name] = attrs.evolve(info, status="blocked")
            return
        started = time.perf_counter()
        try:
            plugin = candidate.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit at import is a broken plugin, not an exit
            self.records[candidate.name] = attrs.evolve(
                info,
                status="failed",
                error=f"import failed: {format_error(exc)}",
                load_seconds=time.perf_counter() - started,
            )
            return
        info = self.add(plugin, info)
        self.records[info.name] = attrs.evolve(info, load_seconds=time.perf_counter() - started)

    def _record_duplicate(self, candidate: EntryPoint, info: PluginInfo) -> None:
        """Two distributions use one entry-point name: the second is reported, not loaded."""
        first = distribution_and_version(self.candidates[candidate.name])
        dist, version = distribution_and_version(candidate)
        key = f"{candidate.name} ({dist or candidate.value})"
        self.records[key] = attrs.evolve(
            info,
            distribution=dist,
            version=version,
            status="failed",
            error=(
                f"duplicate entry-point name {candidate.name!r}: distribution {first[0]} "
                f"{first[1] or ''} already uses it, so this one was not loaded. Rename the "
                "entry point in one distribution's pyproject.toml "
                "([project.entry-points.scalarlens]) or uninstall one of them"
            ),
        )

    def add(self, plugin: object, info: PluginInfo) -> PluginInfo:
        problem = check_api_version(plugin)
        pm = self.manager()
        if problem is None:
            try:
                pm.register(plugin, name=info.name)
            except Exception as exc:  # pluggy validation errors, duplicate names
                problem = f"hook validation failed: {format_error(exc)}"
        dsts: list[str] = []
        if problem is None:
            problem = self._collect(pm, plugin, info.name, dsts)
            if problem is not None:
                pm.unregister(plugin)
                self.contributions.drop(info.name)
        info = (
            attrs.evolve(info, status="failed", error=problem)
            if problem
            else attrs.evolve(info, dsts=tuple(dsts))
        )
        self.records[info.name] = info
        return info

    def _collect(
        self, pm: pluggy.PluginManager, plugin: object, name: str, dsts: list[str]
    ) -> str | None:
        """Call each hook of ``plugin`` once and file what it offers; or say what is wrong."""
        for hook, check in HOOK_CHECKS:
            results, problem = call_hook(pm, hook, plugin)
            for result in results:
                problem = problem or check(result)
            if problem is not None:
                return problem
            for result in results:
                dsts += self.contributions.file(hook, result, name)
        return None
