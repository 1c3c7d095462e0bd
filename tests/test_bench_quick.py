"""The benchmark suite's quick mode runs end to end, so its code keeps working.

It asserts that every scenario ran and wrote valid JSON, never a timing: figures on a
shared 2-core machine are noise at this size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, timeout

pytestmark = pytest.mark.e2e

SCENARIOS = {
    "ceiling": {"rabbitmq", "postgresql", "redis"},
    "longhaul": {"single_saturation", "single_half_rate", "batch_saturation", "batch_half_rate"},
    "peers": {"celery_safe", "celery_unsafe", "dramatiq_safe", "dramatiq_unsafe"},
    "gateway": {"fanout_raw_broadcast", "fanout_gateway_1k_per_s", "fanout_gateway_saturation"},
}


# About a minute here, most of it starting processes and seeding: a machine several
# times slower must still finish it (pytest's own limit is 300 s per test).
QUICK_LIMIT_S = 420


@pytest.mark.timeout(timeout(QUICK_LIMIT_S + 60))
def test_bench_quick_runs_every_scenario_and_writes_json(tmp_path: Path) -> None:
    """`python -m bench --quick` exits 0 and its JSON holds every scenario with figures."""
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout(QUICK_LIMIT_S),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["errors"] == {}
    for scenario, keys in SCENARIOS.items():
        assert keys <= set(doc[scenario]), (scenario, sorted(doc[scenario]))
        for key in keys:
            node = doc[scenario][key]
            assert node["config"] and node["runs"], (scenario, key)
    assert any(k.startswith("idle_") for k in doc["gateway"])
    # Every run completed its work: all tasks accepted reached a terminal state.
    for key in SCENARIOS["longhaul"]:
        for run in doc["longhaul"][key]["runs"]:
            assert run["accepted"] > 0 and run["terminal_seen"] == run["accepted"], run
            # The whole machine was busy at least as much as the generator alone was.
            assert run["generator_cpu_pct"] <= run["machine_cpu_pct"] <= 100, run
    for key in SCENARIOS["peers"]:
        for run in doc["peers"][key]["runs"]:
            assert run["completed"] > 0, run
    assert len(doc["targets"]) == 9
    # Every target was measured, its verdict taken from at least one run.
    assert all(t["met"] is not None and t["runs"] >= 1 for t in doc["targets"]), doc["targets"]
    wake = doc["meta"]["wake_cost"]
    assert wake["work_us_back_to_back"] > 0 and wake["ratio"] > 0, wake
    for hop in doc["meta"]["round_trip"].values():
        assert hop["round_trip_us"] > 0 and hop["cpu_us_per_round_trip"] > 0, hop
    # The Markdown table is written beside the JSON.
    assert "| machine CPU |" in out.with_suffix(".md").read_text()
