"""The fault-injection table printed at the end of the session (also written to
``test-artifacts/faults.json``).

A plugin of the top-level conftest, not of ``tests/faults/conftest.py``: under
pytest-xdist the controller collects nothing, so only the top-level conftest's hooks
run there. Each worker hands its rows to the controller in ``workeroutput``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.faults.harness import FaultResult
from tests.support import ARTIFACTS

ROWS = pytest.StashKey[list[dict[str, Any]]]()
COLUMNS = ("fault", "tasks", "lost", "duplicates", "redeliveries", "recover_s")


def record(config: pytest.Config, result: FaultResult) -> None:
    """Add one fault's verdict to the table, as plain JSON values (execnet carries
    nothing else from a worker)."""
    config.stash[ROWS].append(json.loads(json.dumps(result.as_dict(), default=str)))


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ROWS] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    # On an xdist worker: the controller prints the table, from every worker's rows.
    if (output := getattr(session.config, "workeroutput", None)) is not None:
        output["faults"] = session.config.stash[ROWS]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    node.config.stash[ROWS].extend(getattr(node, "workeroutput", {}).get("faults", []))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(ROWS, [])
    if not results or hasattr(config, "workeroutput"):
        return
    rows = [["-" if r[c] is None else str(r[c]) for c in COLUMNS] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    terminalreporter.section("fault injection")
    terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        terminalreporter.write_line("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    for r in results:
        if r["extra"] or r["notes"]:
            terminalreporter.write_line(f"{r['fault']}: {r['notes']} {json.dumps(r['extra'])}")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "faults.json").write_text(json.dumps(results, indent=2))
