"""Plugins add `scalarlens` subcommands through the ``scalarlens_cli_commands`` hook."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from scalarlens import Registry
from scalarlens.cli import main

GREETER = '''
from scalarlens import hookimpl

def configure(parser):
    """say hello from a plugin"""
    parser.add_argument("--name", default="world")

    def run(args, registry):
        print(f"hello {args.name} ({len(registry.names())} DSTs)")
        return 0

    return run

def broken(parser):
    raise RuntimeError("no parser today")

@hookimpl
def scalarlens_cli_commands():
    return {"hello": configure, "oops": broken, "dsts": configure}
'''


def test_a_plugin_command_runs_and_a_broken_one_is_named(
    make_plugin_dist: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    make_plugin_dist(GREETER, dist="scalarlens-greeter")
    reg = Registry()
    assert main(["hello", "--name", "lens"], reg) == 0
    out, err = capsys.readouterr()
    assert out.startswith("hello lens (") and "DSTs)" in out
    assert "plugin 'greeter' failed to set up its command 'oops'" in err
    assert "no parser today" in err
    with pytest.raises(SystemExit):  # the broken command is not offered
        main(["oops"], reg)
    capsys.readouterr()
    # A built-in name is reserved: `dsts` is still core's listing, not the plugin's greeting.
    assert main(["dsts"], reg) == 0
    assert "hello" not in capsys.readouterr().out


def test_help_lists_plugin_commands(
    make_plugin_dist: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    make_plugin_dist(GREETER, dist="scalarlens-greeter")
    with pytest.raises(SystemExit):
        main(["--help"], Registry())
    out = capsys.readouterr().out
    assert "hello" in out and "say hello from a plugin" in out
