"""Plugins offer feature-dictionary loaders by scheme (hook ``scalarlens_feature_loaders``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from scalarlens import ConfigError, Registry

OFFERS = """
from scalarlens import hookimpl

def load(spec, model):
    return ("loaded", spec, model)

def load_deep(spec, model):
    return ("deep", spec, model)

@hookimpl
def scalarlens_feature_loaders():
    return {"dict:": load, "dict:deep:": load_deep}
"""


def test_the_longest_registered_scheme_loads_the_spec(make_plugin_dist: Callable[..., str]) -> None:
    make_plugin_dist(OFFERS, dist="scalarlens-dicts")
    reg = Registry()
    assert reg.feature_loader("dict:/a/b")("dict:/a/b", "m") == ("loaded", "dict:/a/b", "m")
    assert reg.feature_loader("dict:deep:x")("dict:deep:x", None)[0] == "deep"
    with pytest.raises(
        ConfigError, match=r"no plugin loads the feature dictionary 'other:x'.*dict:"
    ):
        reg.feature_loader("other:x")


def test_a_loader_that_is_not_callable_fails_its_plugin_only(
    make_plugin_dist: Callable[..., str],
) -> None:
    make_plugin_dist(
        "from scalarlens import hookimpl\n"
        "@hookimpl\ndef scalarlens_feature_loaders():\n    return {'bad:': 3}\n",
        dist="scalarlens-baddict",
    )
    reg = Registry()
    status = {p.name: p for p in reg.plugins()}
    assert status["baddict"].status == "failed"
    assert "feature loader for 'bad:' is not callable" in (status["baddict"].error or "")
    assert reg.get("mlp.post_act") is not None  # the others keep working
