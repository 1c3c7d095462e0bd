"""Turning a results document into the Markdown table and the issue's targets."""

from __future__ import annotations

from typing import Any

from bench.stats import leaf, over_runs


def _s(doc: dict[str, Any], *path: str) -> dict[str, Any] | None:
    """The {median,min,max} summary at scenario path + figure key, or None."""
    node: Any = doc
    for p in path[:-1]:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    if not isinstance(node, dict):
        return None
    got = node.get("summary", {}).get(path[-1])
    return got if isinstance(got, dict) and got.get("median") is not None else None


def _med(doc: dict[str, Any], *path: str) -> float | None:
    s = _s(doc, *path)
    return None if s is None else float(s["median"])


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


# Rows shown only where some run had any.
FAILED = "failed requests (not 202)"
NEGATIVE = "publish→client samples < 0 (the clock process woke late)"
ROWS: list[tuple[str, str, tuple[str, ...], str]] = [
    (
        "1",
        "RabbitMQ ceiling (quorum, confirms + acks)",
        ("ceiling", "rabbitmq", "msgs_per_s"),
        "msgs/s",
    ),
    ("1", "PostgreSQL ceiling (insert + 2 updates)", ("ceiling", "postgresql", "per_s"), "rows/s"),
    ("1", "Redis ceiling (XADD + PUBLISH)", ("ceiling", "redis", "per_s"), "msgs/s"),
]
for key, label in (
    ("single_saturation", "Longhaul single, saturation"),
    ("single_half_rate", "Longhaul single, 50% rate"),
    ("batch_saturation", "Longhaul batch, saturation"),
    ("batch_half_rate", "Longhaul batch, 50% rate"),
):
    ROWS += [
        ("2", label, ("longhaul", key, "accepted_per_s"), "accepted/s"),
        ("2", label, ("longhaul", key, "completed_per_s"), "completed/s"),
        ("2", label, ("longhaul", key, "failed_requests"), FAILED),
    ]
    for lat, name in (
        ("submit_to_202_ms", "submit→202"),
        ("submit_to_running_ms", "submit→running"),
        ("submit_to_terminal_ws_ms", "submit→terminal (WS)"),
    ):
        for p in ("p50", "p95", "p99"):
            ROWS.append(("2", label, ("longhaul", key, f"{lat}.{p}"), f"{name} {p} ms"))
for key, label in (
    ("celery_safe", "Celery, confirms + results"),
    ("celery_unsafe", "Celery, fastest unsafe"),
    ("dramatiq_safe", "Dramatiq, confirms"),
    ("dramatiq_unsafe", "Dramatiq, fastest unsafe"),
):
    ROWS += [
        ("3", label, ("peers", key, "accepted_per_s"), "accepted/s"),
        ("3", label, ("peers", key, "completed_per_s"), "completed/s"),
    ]
ROWS.append(
    (
        "5",
        "POST /v1/tasks at 50% rate",
        ("longhaul", "single_half_rate", "submit_to_202_ms.p50"),
        "p50 ms",
    )
)
ROWS.append(
    (
        "5",
        "POST /v1/tasks at 50% rate",
        ("longhaul", "single_half_rate", "submit_to_202_ms.p99"),
        "p99 ms",
    )
)


def _gateway_rows(doc: dict[str, Any]) -> list[tuple[str, str, tuple[str, ...], str]]:
    rows: list[tuple[str, str, tuple[str, ...], str]] = []
    gw = doc.get("gateway", {})
    for key in sorted((k for k in gw if k.startswith("idle_")), key=lambda k: int(k[5:])):
        rows.append(
            (
                "4",
                f"{int(key[5:]):,} idle connections",
                ("gateway", key, "kib_per_connection"),
                "KiB/connection",
            )
        )
    for key, label in (
        ("fanout_raw_broadcast", "raw websockets broadcast"),
        ("fanout_gateway_1k_per_s", "gateway, 1 event/s per client"),
        ("fanout_gateway_saturation", "gateway fan-out, saturation"),
    ):
        rows += [
            ("4", label, ("gateway", key, "delivered_per_s"), "events delivered/s"),
            ("4", label, ("gateway", key, "latency_ms.p50"), "publish→client p50 ms"),
            ("4", label, ("gateway", key, "latency_ms.p99"), "publish→client p99 ms"),
        ]
        if key != "fanout_raw_broadcast":
            rows += [
                (
                    "4",
                    label,
                    ("gateway", key, "from_db_update_ms.p99"),
                    "DB update→client p99 ms (adds the commit)",
                ),
                ("4", label, ("gateway", key, "negative_samples"), NEGATIVE),
            ]
    return rows


def _cpu(doc: dict[str, Any], path: tuple[str, ...], party: str) -> str:
    s = _s(doc, *path[:-1], f"{party}_cpu_pct")
    return "" if s is None else f"{s['median']:.0f}%"


def table(doc: dict[str, Any]) -> str:
    lines = [
        "| # | scenario | figure | median | min-max | generator CPU | machine CPU |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    rows = ROWS[:3] + [r for r in ROWS[3:] if r[0] == "2"] + [r for r in ROWS if r[0] == "3"]
    rows += _gateway_rows(doc) + [r for r in ROWS if r[0] == "5"]
    for num, label, path, figure in rows:
        s = _s(doc, *path)
        if s is None or (figure in (FAILED, NEGATIVE) and not s["max"]):
            continue
        node = doc.get(path[0], {}).get(path[1], {})
        # The summary left invalid runs out, unless there was nothing else (stats.series).
        bad = node.get("invalid_runs", 0)
        shown = label
        if bad:
            shown += (
                " (every run invalid)"
                if bad == len(node["runs"])
                else f" ({bad} invalid run{'s' * (bad > 1)} left out)"
            )
        lines.append(
            f"| {num} | {shown} | {figure} | {_fmt(s['median'])} | "
            f"{_fmt(s['min'])}-{_fmt(s['max'])} | {_cpu(doc, path, 'generator')} | "
            f"{_cpu(doc, path, 'machine')} |"
        )
    return "\n".join(lines)


def _runs(doc: dict[str, Any], scenario: str, key: str, figure: str) -> list[Any]:
    """One figure of each run of a scenario, in run order (None where missing)."""
    node = doc.get(scenario, {}).get(key)
    runs = node.get("runs", []) if isinstance(node, dict) else []
    return [leaf(run, figure) for run in runs]


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue: value, threshold, ratio, met (None: not measured).

    A ratio target's ratio is the median of the ratios of the runs taken in the same
    round (the runs lists are in round order), with their min-max, not the ratio of two
    medians that may come from different rounds; ``met_runs`` counts the runs (or
    rounds) that met it on their own."""
    single = ("longhaul", "single_saturation", "completed_per_s")
    idle = sorted(
        (k for k in doc.get("gateway", {}) if k.startswith("idle_")), key=lambda k: int(k[5:])
    )
    out = []

    def higher(
        name: str, path: tuple[str, str, str], ref: tuple[str, str, str], factor: float
    ) -> None:
        # Run i of each side is round i: a scenario that fails is not run again, so a
        # shorter list lacks only the last rounds, which zip leaves unpaired. A round
        # where either run says it is invalid (``invalid``: why) is left out.
        rounds = list(
            zip(
                _runs(doc, *path),
                _runs(doc, *ref),
                _runs(doc, *path[:2], "invalid"),
                _runs(doc, *ref[:2], "invalid"),
                strict=False,
            )
        )
        invalid = sum(1 for _, _, bad, bad_ref in rounds if bad or bad_ref)
        ratios = [
            v / r
            for v, r, bad, bad_ref in rounds
            if v is not None and r and not bad and not bad_ref
        ]
        spread = over_runs(ratios)
        ratio = spread["median"]
        out.append(
            {
                "target": name,
                "value": _med(doc, *path),
                "reference": _med(doc, *ref),
                "ratio": None if ratio is None else round(ratio, 2),
                "ratio_min": None if ratio is None else round(spread["min"], 2),
                "ratio_max": None if ratio is None else round(spread["max"], 2),
                "met": None if ratio is None else ratio >= factor,
                "met_runs": sum(1 for x in ratios if x >= factor),
                "runs": len(ratios),
                "invalid_runs": invalid,
                "needs": f"ratio ≥ {factor:g}",
            }
        )

    def lower(
        name: str,
        path: tuple[str, str, str] | None,
        limit: float,
        failures: tuple[str, str, str] | None = None,
        worst_of: list[str] | None = None,
    ) -> None:
        """``failures``: a count per run of requests that failed (not 202). Their
        latencies are not in the figure, so a run with any does not meet the target,
        nor does the target when any run had them. ``worst_of``: scenario keys that
        take the place of ``path``'s key; the value is the worst of their medians, and
        a run meets the target when each key's run of that index does."""
        if path is None:
            value, per_run = None, []
        elif worst_of:
            medians = [m for k in worst_of if (m := _med(doc, path[0], k, path[2])) is not None]
            value = max(medians, default=None)
            columns = [_runs(doc, path[0], k, path[2]) for k in worst_of]
            per_run = [
                None if any(v is None for v in vs) else max(vs)
                for vs in zip(*columns, strict=False)
            ]
        else:
            value = _med(doc, *path)
            per_run = _runs(doc, *path)
        fails = [int(f or 0) for f in _runs(doc, *failures)] if failures else []
        fails += [0] * (len(per_run) - len(fails))
        values = [(v, f) for v, f in zip(per_run, fails, strict=False) if v is not None]
        failed = sum(fails)
        ratio = None if value is None else value / limit
        row: dict[str, Any] = {
            "target": name,
            "value": value,
            "reference": limit,
            "ratio": None if ratio is None else round(ratio, 2),
            "met": None if ratio is None else ratio <= 1.0 and failed == 0,
            "met_runs": sum(1 for v, f in values if v <= limit and not f),
            "runs": len(values),
            "needs": f"≤ {limit:g}",
        }
        if failures:
            row["failed_requests"] = failed
            row["needs"] += (
                f", every request 202 ({failed} not)" if failed else ", every request 202"
            )
        out.append(row)

    higher(
        "single-submit e2e ≥ 2x Celery (confirms + results)",
        single,
        ("peers", "celery_safe", "completed_per_s"),
        2.0,
    )
    higher(
        "single-submit e2e ≥ Dramatiq (confirms)",
        single,
        ("peers", "dramatiq_safe", "completed_per_s"),
        1.0,
    )
    higher(
        "single-submit e2e ≥ Celery fastest unsafe",
        single,
        ("peers", "celery_unsafe", "completed_per_s"),
        1.0,
    )
    higher(
        "batch-submit e2e ≥ 60% of the raw RabbitMQ ceiling",
        ("longhaul", "batch_saturation", "completed_per_s"),
        ("ceiling", "rabbitmq", "msgs_per_s"),
        0.6,
    )
    lower(
        "submit→running p95 ≤ 50 ms at 50% of saturation (ms)",
        ("longhaul", "single_half_rate", "submit_to_running_ms.p95"),
        50,
        ("longhaul", "single_half_rate", "failed_requests"),
    )
    lower(
        "progress worker→client p99 ≤ 10 ms at 1 event/s per client (1,000 clients) (ms)",
        ("gateway", "fanout_gateway_1k_per_s", "latency_ms.p99"),
        10,
    )
    lower(
        f"gateway ≤ 20 KiB per idle connection (the worst of {', '.join(idle) or 'n/a'}) (KiB)",
        ("gateway", "idle", "kib_per_connection") if idle else None,
        20,
        worst_of=idle,
    )
    higher(
        "fan-out ≥ 50% of raw websockets broadcast",
        ("gateway", "fanout_gateway_saturation", "delivered_per_s"),
        ("gateway", "fanout_raw_broadcast", "delivered_per_s"),
        0.5,
    )
    lower(
        "POST /v1/tasks p99 ≤ 25 ms at 50% of saturation (ms)",
        ("longhaul", "single_half_rate", "submit_to_202_ms.p99"),
        25,
        ("longhaul", "single_half_rate", "failed_requests"),
    )
    return out


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| target | value | reference | ratio (min-max over rounds) | met | runs that met it |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for t in rows:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        ratio = "n/a" if t["ratio"] is None else str(t["ratio"])
        if t.get("ratio_min") is not None and t["runs"] > 1:
            ratio += f" ({t['ratio_min']}-{t['ratio_max']})"
        runs = f"{t['met_runs']} of {t['runs']}"
        if t.get("invalid_runs"):
            runs += f" ({t['invalid_runs']} invalid, left out)"
        lines.append(
            f"| {t['target']} | {_fmt(t['value'])} | {_fmt(t['reference'])} | "
            f"{ratio} ({t['needs']}) | {met} | {runs} |"
        )
    return "\n".join(lines)


def configs(doc: dict[str, Any]) -> str:
    lines = []
    for scenario in ("ceiling", "longhaul", "peers", "gateway"):
        for key, node in doc.get(scenario, {}).items():
            if isinstance(node, dict) and "config" in node:
                lines.append(f"- **{scenario}.{key}**: {node['config']}")
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    meta = doc.get("meta", {})
    head = (
        f"## Longhaul benchmark ({meta.get('profile')}, {meta.get('started_at')}, "
        f"{meta.get('cpus')} CPUs, {meta.get('runs')} run(s) per figure, "
        f"{meta.get('duration_s')} s)\n"
    )
    if notes := meta.get("notes"):
        head += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    return (
        "\n\n".join(
            [
                head,
                table(doc),
                "### Targets",
                targets_table(doc.get("targets", [])),
                "### Configurations",
                configs(doc),
            ]
        )
        + "\n"
    )
