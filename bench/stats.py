"""Pure numbers: percentiles, the median of runs with its min-max, CPU shares."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

NCPU = os.cpu_count() or 1


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """p50/p95/p99/max in milliseconds of a list of latencies in seconds."""
    out: dict[str, Any] = {"n": len(seconds)}
    for name, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100)):
        v = percentile(seconds, p)
        out[name] = None if v is None else round(v * 1000, 2)
    return out


def over_runs(values: Iterable[float | None]) -> dict[str, Any]:
    """Median and min-max of one figure over repeated runs (None values skipped)."""
    got = [float(v) for v in values if v is not None]
    if not got:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {
        "median": round(statistics.median(got), 3),
        "min": round(min(got), 3),
        "max": round(max(got), 3),
        "runs": len(got),
    }


def cpu_share(cpu_s: float, wall_s: float) -> float:
    """CPU seconds as a percentage of the whole machine (all cores) over ``wall_s``."""
    if wall_s <= 0:
        return 0.0
    return round(100 * cpu_s / (wall_s * NCPU), 1)


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median/min/max of every numeric leaf the runs share (``a.b`` keys flattened)."""
    flat = [_flatten(r) for r in runs]
    keys = [k for k in flat[0] if all(k in f for f in flat)] if flat else []
    out: dict[str, Any] = {}
    for key in keys:
        vals = [f[key] for f in flat]
        if all(isinstance(v, int | float) or v is None for v in vals) and not all(
            isinstance(v, bool) for v in vals
        ):
            out[key] = over_runs(vals)
    return out


def series(config: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A scenario's figure set as the results document holds it: its configuration, its
    runs and their summary.

    A run that says it is invalid (``invalid``: why) stays in ``runs`` but not in the
    summary, so the table's median is not taken over what the targets leave out; where
    every run is invalid the summary is of them all, and ``invalid_runs`` says so."""
    valid = [r for r in runs if not r.get("invalid")]
    out = {"config": config, "runs": list(runs), "summary": aggregate(valid or runs)}
    if len(valid) < len(runs):
        out["invalid_runs"] = len(runs) - len(valid)
    return out


def leaf(run: dict[str, Any], figure: str) -> Any:
    """The value at ``figure`` (``a.b`` for nested) in one run's results, or None."""
    node: Any = run
    for part in figure.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out
