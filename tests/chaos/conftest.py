"""The chaos suite's figures: each scenario records what it measured (leaked slots, lost
requests, recovery time, 5xx count, ...) through the ``figures`` fixture; they are printed
at the end of the run ("chaos figures") and, with ``$DRIFTSCHED_CHAOS_REPORT`` set, written
there as JSON (``make chaos`` writes ``results/chaos.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_FIGURES: list[dict[str, Any]] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    def record(**values: Any) -> None:
        _FIGURES.append({"scenario": request.node.name, **values})

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("chaos figures")
    for f in _FIGURES:
        rest = ", ".join(f"{k}={round(v, 2) if isinstance(v, float) else v}"
                         for k, v in f.items() if k != "scenario")
        terminalreporter.write_line(f"{f['scenario']}: {rest}")
    out = os.environ.get("DRIFTSCHED_CHAOS_REPORT")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(_FIGURES, indent=2) + "\n")
