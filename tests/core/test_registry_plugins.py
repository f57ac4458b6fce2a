"""Discovery tested for real: each plugin is a throwaway installed distribution on sys.path."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from scalarlens import (
    DerivedScalarSource,
    DeriverBuildError,
    DstConfig,
    DstConflictError,
    DstCycleError,
    PassType,
    PluginLoadError,
    Registry,
    UnknownDstError,
)

# A working plugin that chains onto a builtin DST *by name*, without importing the builtins.
CHAINING = """
from scalarlens import (DerivedScalarType, Dimension, DstReference, NodeType, ScalarDeriver,
                        hookimpl)

SCALARLENS_PLUGIN_API = 1
DOUBLE = DerivedScalarType("example.double_post_act", (Dimension.TOKENS, Dimension.MLP_ACTS),
                           NodeType.MLP_NEURON, description="2 × mlp.post_act")

def build(config):
    return ScalarDeriver(DOUBLE, config, (DstReference("mlp.post_act"),),
                         lambda inputs, layer, ctx: 2 * inputs[0])

@hookimpl
def scalarlens_derivers():
    return {DOUBLE: build}
"""


def _loaded(reg: Registry) -> dict[str, object]:
    return {p.name: p for p in reg.plugins()}


def _builtins_still_work(reg: Registry) -> None:
    deriver = reg.get("mlp.post_act", DstConfig())
    assert deriver.dst.name == "mlp.post_act"
    assert _loaded(reg)["builtins"].status == "loaded"  # type: ignore[attr-defined]


def test_working_plugin_chains_onto_a_builtin_by_name(make_plugin_dist: Callable[..., str]) -> None:
    make_plugin_dist(CHAINING, dist="scalarlens-example", version="1.2.3")
    reg = Registry()
    info = reg.provider("example.double_post_act")
    assert (info.name, info.distribution, info.version, info.status) == (
        "example",
        "scalarlens-example",
        "1.2.3",
        "loaded",
    )
    assert info.dsts == ("example.double_post_act",)
    deriver = reg.get("example.double_post_act")
    (source,) = deriver.sub_scalar_sources
    assert isinstance(source, DerivedScalarSource)
    assert source.scalar_deriver.dst.name == "mlp.post_act"  # resolved by the registry
    assert deriver.raw_requirements() == reg.get("mlp.post_act").raw_requirements()
    _builtins_still_work(reg)


def test_import_error_is_contained(make_plugin_dist: Callable[..., str]) -> None:
    make_plugin_dist("import does_not_exist_anywhere\n", dist="scalarlens-broken", version="0.9")
    reg = Registry()
    broken = _loaded(reg)["broken"]
    assert broken.status == "failed"  # type: ignore[attr-defined]
    assert "ModuleNotFoundError" in broken.error  # type: ignore[attr-defined]
    assert "does_not_exist_anywhere" in broken.error  # type: ignore[attr-defined]
    _builtins_still_work(reg)
    with pytest.raises(PluginLoadError) as err:
        reg.get("broken.thing")
    message = str(err.value)
    for part in ("'broken'", "scalarlens-broken", "0.9", "ModuleNotFoundError"):
        assert part in message
    assert isinstance(err.value, KeyError)


def test_raising_hook_is_contained(make_plugin_dist: Callable[..., str]) -> None:
    make_plugin_dist(
        "from scalarlens import hookimpl\n"
        "@hookimpl\n"
        "def scalarlens_derivers():\n"
        "    raise RuntimeError('weights file missing')\n",
        dist="scalarlens-raiser",
        version="2.0",
    )
    reg = Registry()
    info = _loaded(reg)["raiser"]
    assert info.status == "failed"  # type: ignore[attr-defined]
    assert "scalarlens_derivers() raised RuntimeError: weights file missing" in info.error  # type: ignore[attr-defined]
    _builtins_still_work(reg)
    with pytest.raises(
        PluginLoadError, match=r"raiser.*scalarlens-raiser 2.0.*weights file missing"
    ):
        reg.get("raiser.x")


def test_wrong_return_type_is_contained(make_plugin_dist: Callable[..., str]) -> None:
    make_plugin_dist(
        "from scalarlens import hookimpl\n"
        "@hookimpl\n"
        "def scalarlens_derivers():\n"
        "    return ['mlp.not_a_mapping']\n",
        dist="scalarlens-wrongtype",
    )
    reg = Registry()
    info = _loaded(reg)["wrongtype"]
    assert info.status == "failed"  # type: ignore[attr-defined]
    assert "returned list; expected a mapping" in info.error  # type: ignore[attr-defined]
    _builtins_still_work(reg)


def test_api_version_mismatch_is_contained(make_plugin_dist: Callable[..., str]) -> None:
    make_plugin_dist(
        CHAINING.replace("SCALARLENS_PLUGIN_API = 1", "SCALARLENS_PLUGIN_API = 2"),
        dist="scalarlens-future",
        version="9.0",
    )
    reg = Registry()
    info = _loaded(reg)["future"]
    assert info.status == "failed"  # type: ignore[attr-defined]
    assert "SCALARLENS_PLUGIN_API = 2" in info.error  # type: ignore[attr-defined]
    assert "version 1" in info.error  # type: ignore[attr-defined]
    assert "example.double_post_act" not in reg
    _builtins_still_work(reg)


def test_conflict_names_both_distributions_and_can_be_overridden(
    make_plugin_dist: Callable[..., str],
) -> None:
    make_plugin_dist(CHAINING, dist="scalarlens-first", version="1.0")
    make_plugin_dist(CHAINING, dist="scalarlens-second", version="2.0")
    reg = Registry()
    with pytest.raises(DstConflictError) as err:
        reg.get("example.double_post_act")
    message = str(err.value)
    assert "scalarlens-first 1.0" in message and "scalarlens-second 2.0" in message
    assert "prefer" in message and "SCALARLENS_PREFER" in message
    _builtins_still_work(reg)

    preferred = Registry(prefer={"example.double_post_act": "second"})
    assert preferred.provider("example.double_post_act").distribution == "scalarlens-second"


def test_conflict_override_from_the_environment(
    make_plugin_dist: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_plugin_dist(CHAINING, dist="scalarlens-first")
    make_plugin_dist(CHAINING, dist="scalarlens-second")
    monkeypatch.setenv("SCALARLENS_PREFER", "example.double_post_act=first")
    assert Registry().provider("example.double_post_act").name == "first"


def test_cycle_prints_the_cycle(make_plugin_dist: Callable[..., str]) -> None:
    make_plugin_dist(
        """
from scalarlens import DerivedScalarType, Dimension, DstReference, NodeType, ScalarDeriver, hookimpl

def dst(name):
    return DerivedScalarType(name, (Dimension.TOKENS,), NodeType.LAYER)

def factory(name, ref):
    return lambda config: ScalarDeriver(dst(name), config, (DstReference(ref),),
                                        lambda inputs, layer, ctx: inputs[0])

@hookimpl
def scalarlens_derivers():
    return {dst("loop.a"): factory("loop.a", "loop.b"),
            dst("loop.b"): factory("loop.b", "loop.c"),
            dst("loop.c"): factory("loop.c", "loop.a")}
""",
        dist="scalarlens-loop",
    )
    reg = Registry()
    with pytest.raises(DstCycleError, match=r"loop\.a -> loop\.b -> loop\.c -> loop\.a"):
        reg.get("loop.a")
    _builtins_still_work(reg)


def test_factory_errors_name_the_plugin(make_plugin_dist: Callable[..., str]) -> None:
    make_plugin_dist(
        "from scalarlens import DerivedScalarType, Dimension, NodeType, hookimpl\n"
        "X = DerivedScalarType('bad.factory', (Dimension.TOKENS,), NodeType.LAYER)\n"
        "def build(config):\n"
        "    raise ValueError('cannot build')\n"
        "@hookimpl\n"
        "def scalarlens_derivers():\n"
        "    return {X: build}\n",
        dist="scalarlens-badfactory",
        version="0.1",
    )
    reg = Registry()
    with pytest.raises(
        DeriverBuildError,
        match=r"'bad.factory' failed in plugin 'badfactory' "
        r"\(distribution scalarlens-badfactory 0.1.*ValueError: cannot build",
    ):
        reg.get("bad.factory")
    _builtins_still_work(reg)


def test_unknown_dst_suggests_names() -> None:
    reg = Registry()
    with pytest.raises(UnknownDstError, match=r"did you mean 'mlp.post_act'") as err:
        reg.get("mlp.post_akt")
    assert isinstance(err.value, KeyError)
    assert "scalarlens dsts" in str(err.value)


def test_environment_switches(
    make_plugin_dist: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_plugin_dist(CHAINING, dist="scalarlens-example")
    monkeypatch.setenv("SCALARLENS_BLOCK_PLUGINS", "example")
    reg = Registry()
    assert _loaded(reg)["example"].status == "blocked"  # type: ignore[attr-defined]
    assert "example.double_post_act" not in reg
    _builtins_still_work(reg)

    monkeypatch.delenv("SCALARLENS_BLOCK_PLUGINS")
    monkeypatch.setenv("SCALARLENS_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert Registry().plugins() == ()
    monkeypatch.setenv("SCALARLENS_PLUGINS", "builtins")
    assert [p.name for p in Registry().plugins()] == ["builtins"]


def test_in_process_registration_and_unregister() -> None:
    import types

    import scalarlens_builtins.plugin

    reg = Registry(autoload=False)
    assert reg.dsts() == ()
    reg.register(scalarlens_builtins.plugin, "builtins")
    module = types.ModuleType("mine")
    exec(CHAINING, module.__dict__)
    reg.register(module, "mine")
    assert reg.provider("example.double_post_act").name == "mine"
    reg.unregister("mine")
    assert "example.double_post_act" not in reg
    assert "mlp.post_act" in reg


def test_registry_loads_once_and_get_never_rescans(
    make_plugin_dist: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import scalarlens._registry as registry_module

    reg = Registry()
    reg.get("mlp.post_act")
    calls = []
    monkeypatch.setattr(registry_module, "discover_candidates", lambda: calls.append(1) or [])
    for _ in range(3):
        reg.get("mlp.pre_act", DstConfig(layer_indices=[0]))
    reg.dsts()
    assert calls == []
    assert PassType.BACKWARD in reg.get("mlp.post_act").derivable_pass_types


def test_discovery_finds_what_the_standard_library_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Discovery parses only the entry-point files that mention the group; the result is still
    ``entry_points(group="scalarlens")``: same entry points, same order, and a distribution
    shadowed by an earlier one of the same name on the path contributes nothing."""
    from importlib.metadata import entry_points

    from scalarlens._plugins import _entry_points

    def dist(site: Path, name: str, version: str, text: str) -> None:
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(text)

    first, second = tmp_path / "first", tmp_path / "second"
    dist(first, "sl_shadow", "2.0", "[console_scripts]\nsl-shadow = m:main\n")
    dist(second, "sl_shadow", "1.0", "[scalarlens]\nshadowed = sl_shadowed_module\n")
    dist(second, "sl_scripts", "1.0", "[console_scripts]\nscalarlens-tool = scalarlens_tool:main\n")
    dist(second, "sl_spaced", "1.0", "[console_scripts]\nx = y:z\n\n  [scalarlens]  \nspaced = m\n")
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))

    def described(found: Iterable[EntryPoint]) -> list[tuple[str, str, str | None]]:
        return [(ep.name, ep.value, ep.dist and ep.dist.version) for ep in found]

    ours = described(_entry_points("scalarlens"))
    assert ours == described(entry_points(group="scalarlens"))
    assert ("spaced", "m", "1.0") in ours
    assert "shadowed" not in [name for name, _, _ in ours]
