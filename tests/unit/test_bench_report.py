"""The benchmark's verdicts on the issue's targets: pure functions of a results
document, so they are checked here on documents made up for the purpose."""

from __future__ import annotations

from typing import Any

from bench import report
from bench.stats import series


def _doc(single: list[float], celery: list[float], post_p99: list[float]) -> dict[str, Any]:
    return {
        "longhaul": {
            "single_saturation": series("", [{"completed_per_s": v} for v in single]),
            "single_half_rate": series("", [{"submit_to_202_ms": {"p99": v}} for v in post_p99]),
        },
        "peers": {"celery_safe": series("", [{"completed_per_s": v} for v in celery])},
    }


def _target(doc: dict[str, Any], starts: str) -> dict[str, Any]:
    return next(t for t in report.targets(doc) if t["target"].startswith(starts))


def test_a_ratio_target_pairs_the_runs_of_each_round() -> None:
    # The peer drifts with the machine and Longhaul with it: every round meets 2x,
    # though the ratio of the two medians (1,000 / 600 = 1.67) does not.
    doc = _doc(single=[1000, 1400, 1900], celery=[480, 600, 900], post_p99=[10])
    got = _target(doc, "single-submit e2e ≥ 2x Celery")
    assert (got["value"], got["reference"]) == (1400, 600)
    assert (got["ratio"], got["ratio_min"], got["ratio_max"]) == (2.11, 2.08, 2.33)
    assert got["met"] is True
    assert (got["met_runs"], got["runs"]) == (3, 3)


def test_a_round_the_peer_missed_is_not_paired() -> None:
    doc = _doc(single=[1000, 1000, 1000], celery=[400, 600], post_p99=[10])
    got = _target(doc, "single-submit e2e ≥ 2x Celery")
    assert (got["ratio"], got["met"], got["met_runs"], got["runs"]) == (2.08, True, 1, 2)


def test_a_limit_target_counts_the_runs_within_it() -> None:
    doc = _doc(single=[1000], celery=[400], post_p99=[20, 30, 24])
    got = _target(doc, "POST /v1/tasks p99")
    assert (got["value"], got["met"], got["met_runs"], got["runs"]) == (24, True, 2, 3)


def test_a_target_not_measured_is_neither_met_nor_missed() -> None:
    got = _target(_doc(single=[1000], celery=[], post_p99=[]), "single-submit e2e ≥ Dramatiq")
    assert got["ratio"] is None and got["met"] is None and got["runs"] == 0
    assert "| 0 of 0 |" in report.targets_table(report.targets(_doc([1], [], [])))


def _fanout(gateway: list[float], raw: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "gateway": {
            "fanout_gateway_saturation": series("", [{"delivered_per_s": v} for v in gateway]),
            "fanout_raw_broadcast": series("", raw),
        }
    }


def test_a_round_whose_ceiling_run_is_invalid_is_left_out_of_the_ratio() -> None:
    # Round 2's raw server waited on a stuck client: its low ceiling would have met 50 %.
    raw: list[dict[str, Any]] = [
        {"delivered_per_s": 40_000},
        {"delivered_per_s": 10_000, "invalid": "stalled"},
        {"delivered_per_s": 40_000},
    ]
    got = _target(_fanout([16_000, 16_000, 18_000], raw), "fan-out ≥ 50%")
    assert (got["ratio"], got["met"], got["met_runs"], got["runs"]) == (0.42, False, 0, 2)
    assert got["invalid_runs"] == 1
    assert "0 of 2 (1 invalid, left out)" in report.targets_table([got])


def test_the_tables_median_leaves_out_an_invalid_run() -> None:
    raw: list[dict[str, Any]] = [
        {"delivered_per_s": 40_000},
        {"delivered_per_s": 10_000, "invalid": "stalled"},
        {"delivered_per_s": 30_000},
    ]
    doc = _fanout([16_000], raw)
    summary = doc["gateway"]["fanout_raw_broadcast"]["summary"]["delivered_per_s"]
    assert (summary["median"], summary["min"], summary["runs"]) == (35_000, 30_000, 2)
    row = next(r for r in report.table(doc).splitlines() if "raw websockets" in r)
    assert "(1 invalid run left out)" in row and "| 35,000 | 30,000-40,000 |" in row
    # Where every run is invalid there is still a figure, marked.
    doc = _fanout([16_000], [{"delivered_per_s": 9_000, "invalid": "stalled"}])
    assert "(every run invalid) | events delivered/s | 9,000" in report.table(doc)


def test_a_latency_target_is_not_met_in_a_run_that_shed_requests() -> None:
    # Run 2 answered fast because it refused 40 requests with 503: its p99 is no pass.
    doc = _doc(single=[1000], celery=[400], post_p99=[20, 10, 24])
    doc["longhaul"]["single_half_rate"] = series(
        "",
        [
            {"submit_to_202_ms": {"p99": 20}, "failed_requests": 0},
            {"submit_to_202_ms": {"p99": 10}, "failed_requests": 40},
            {"submit_to_202_ms": {"p99": 24}, "failed_requests": 0},
        ],
    )
    got = _target(doc, "POST /v1/tasks p99")
    assert (got["value"], got["met"], got["met_runs"], got["runs"]) == (20, False, 2, 3)
    assert got["failed_requests"] == 40
    assert "every request 202 (40 not)" in report.targets_table([got])
    # The table shows the failures, and only where there were some.
    assert "failed requests (not 202) | 0.00 | 0.00-40.0" in report.table(doc)
    doc["longhaul"]["single_half_rate"]["runs"][1]["failed_requests"] = 0
    doc["longhaul"]["single_half_rate"] = series("", doc["longhaul"]["single_half_rate"]["runs"])
    assert "failed requests" not in report.table(doc)
    assert _target(doc, "POST /v1/tasks p99")["met"] is True


def test_the_idle_memory_target_takes_the_worst_connection_count() -> None:
    # 10,000 connections spread the gateway's fixed cost thinner than 1,000 do: the
    # target holds for both counts, so it is judged on the worse.
    doc = {
        "gateway": {
            "idle_1000": series("", [{"kib_per_connection": v} for v in (21.0, 19.0, 22.0)]),
            "idle_10000": series("", [{"kib_per_connection": v} for v in (16.5, 16.6, 16.4)]),
        }
    }
    got = _target(doc, "gateway ≤ 20 KiB per idle connection")
    assert "idle_1000, idle_10000" in got["target"]
    assert (got["value"], got["met"], got["met_runs"], got["runs"]) == (21.0, False, 1, 3)


def test_negative_publish_to_client_samples_are_shown_only_when_there_are_some() -> None:
    def doc(negative: int) -> dict[str, Any]:
        run = {"delivered_per_s": 1000, "negative_samples": negative}
        return {"gateway": {"fanout_gateway_1k_per_s": series("", [run])}}

    assert "samples < 0" not in report.table(doc(0))
    assert "publish→client samples < 0 (the clock process woke late) | 12.0 |" in report.table(
        doc(12)
    )
