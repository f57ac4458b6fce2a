"""The sweep's progress line: tokens done, tokens per second, time left."""

from __future__ import annotations

import io

from scalarlens._progress import Progress


def test_progress_line_counts_tokens_and_shows_rate_and_eta() -> None:
    stream = io.StringIO()
    bar = Progress(1000, done=200, stream=stream)  # 200 tokens reused from an earlier run
    bar.advance(300)
    bar.close()
    text = stream.getvalue()
    assert "500/1000 tokens" in text and "tok/s" in text and "ETA " in text
    assert text.endswith("\n") and text.startswith("\r[############")
    assert bar.ran == 300  # the rate counts only tokens run now


def test_disabled_progress_writes_nothing() -> None:
    stream = io.StringIO()
    bar = Progress(10, enabled=False, stream=stream)
    bar.advance(10)
    bar.close()
    assert stream.getvalue() == "" and bar.done == 10
