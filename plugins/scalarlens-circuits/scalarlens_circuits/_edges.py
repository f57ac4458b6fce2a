"""Edge-attribution DSTs (filled in by the edge DST work)."""

from __future__ import annotations

from typing import Any

FACTORIES: dict[Any, Any] = {}
EXAMPLES: dict[str, Any] = {}
