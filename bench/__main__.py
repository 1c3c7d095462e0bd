"""``python -m bench [--quick] [--only SCENARIO ...] [--out PATH]``.

Runs the scenarios of issue #6: the throughput runs in rounds (the ceilings, Longhaul
at saturation and the peers, one run each per round), then Longhaul and the API at half
the saturation rates, then the gateway. Writes ``bench/results/<timestamp>.json`` and
prints a Markdown table. Everything runs under a private namespace and database,
removed at the end even when a scenario fails."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from bench import ceiling, gateway, longhaul, machine, peers, report
from bench.infra import RESULTS, BenchEnv, cancel_on_signals, raise_fd_limit, run_loop, to_the_end
from bench.longhaul import LonghaulSystem
from bench.stats import series

SCENARIOS = ("ceiling", "longhaul", "gateway", "peers")


@dataclass(frozen=True)
class Profile:
    name: str
    runs: int
    n_amqp: int
    n_pg: int
    n_redis: int
    n_tasks: int
    batch: int
    max_rate_run_s: float
    idle_counts: tuple[int, ...]
    fanout_clients: int
    fanout_s: float
    timeout_s: float
    # Finished tasks in the database before the run (see BenchEnv._seed_history).
    history: int


FULL = Profile(
    "full",
    runs=3,
    n_amqp=30_000,
    n_pg=10_000,
    n_redis=30_000,
    n_tasks=10_000,
    batch=100,
    max_rate_run_s=15.0,
    idle_counts=(1_000, 10_000),
    fanout_clients=1_000,
    fanout_s=8.0,
    timeout_s=240.0,
    history=50_000,
)
QUICK = Profile(
    "quick",
    runs=1,
    n_amqp=1_000,
    n_pg=400,
    n_redis=1_000,
    n_tasks=200,
    batch=50,
    max_rate_run_s=2.0,
    idle_counts=(200,),
    fanout_clients=100,
    fanout_s=1.5,
    timeout_s=60.0,
    history=5_000,
)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("aio-pika", "aiohttp", "websockets", "asyncpg", "redis", "celery", "dramatiq"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


async def main_async(profile: Profile, only: list[str], out_path: Path | None) -> int:
    cancel_on_signals()
    started = time.monotonic()
    fds = raise_fd_limit()
    env = BenchEnv(history=profile.history)
    wake = machine.wake_cost()  # first, while nothing else of the run is busy
    hop = {
        "any_cpu": machine.round_trip(),
        "one_cpu": machine.round_trip(cpus={min(os.sched_getaffinity(0))}),
    }
    doc: dict[str, Any] = {
        "meta": {
            "profile": profile.name,
            "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpus": os.cpu_count(),
            "load_avg_before": [round(x, 2) for x in os.getloadavg()],
            "fd_limit": fds,
            "namespace": env.namespace,
            "runs": profile.runs,
            "settings": asdict(profile),
            "versions": _versions(),
            "wake_cost": wake,
            "round_trip": hop,
            "notes": [
                "medians of the runs with min-max; the ceilings, Longhaul's saturation "
                "runs and the peers run in rounds, one run of each per round, and a "
                "target's ratio is the median of its per-round ratios; generator CPU = "
                "the load generator's CPU (this process and its helper processes) as % "
                "of all cores; machine CPU = how busy all cores were, everything included",
                "the machine is shared with whatever else runs on it: see load_avg_*",
                f"the database holds {profile.history:,} finished tasks of another tenant, "
                "analyzed, before the run (as pgbench -i loads and vacuums its tables)",
                f"waking up costs: a small piece of Python work took {wake['ratio']}x its "
                f"back-to-back CPU after a 5 ms sleep ({wake['work_us_back_to_back']} -> "
                f"{wake['work_us_after_5ms_sleep']} us); below saturation each process "
                "pays that for every message it sleeps between (bench/machine.py)",
                "a message to another process and back (pipes, both asleep between): "
                f"{hop['any_cpu']['round_trip_us']} us and "
                f"{hop['any_cpu']['cpu_us_per_round_trip']} us of CPU; with both on one CPU "
                f"{hop['one_cpu']['round_trip_us']} us and "
                f"{hop['one_cpu']['cpu_us_per_round_trip']} us (bench/machine.py)",
            ],
        },
        "errors": {},
    }
    failed = False
    try:
        await env.open()
        await _rounds(env, profile, only, doc)
        if "longhaul" in doc or "gateway" in only:
            system = LonghaulSystem(env)
            try:
                await system.start()
                if "longhaul" in doc:
                    print("== 5. Longhaul at half the saturation rates", file=sys.stderr)
                    doc["longhaul"].update(
                        await _guard(
                            doc,
                            "longhaul",
                            longhaul.half_rates(
                                system,
                                doc["longhaul"],
                                n=profile.n_tasks,
                                runs=profile.runs,
                                batch=profile.batch,
                                max_rate_run_s=profile.max_rate_run_s,
                                timeout_s=profile.timeout_s,
                            ),
                        )
                    )
                if "gateway" in only:
                    print("== 4. gateway", file=sys.stderr)
                    doc["gateway"] = await _guard(
                        doc,
                        "gateway",
                        gateway.run(
                            system,
                            idle_counts=list(profile.idle_counts),
                            clients=profile.fanout_clients,
                            duration=profile.fanout_s,
                            runs=profile.runs,
                        ),
                    )
            finally:
                system.stop()
    except Exception:
        failed = True
        doc["errors"]["setup"] = traceback.format_exc()
    finally:
        await to_the_end(env.close())
    failed = failed or bool(doc["errors"])
    doc["meta"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    doc["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    doc["targets"] = report.targets(doc)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_path or RESULTS / f"{stamp}{'-quick' if profile.name == 'quick' else ''}.json"
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    md = report.markdown(doc)
    path.with_suffix(".md").write_text(md)
    print(md)
    for name, err in doc["errors"].items():
        print(f"scenario {name} failed:\n{err}", file=sys.stderr)
    print(f"results: {path}", file=sys.stderr)
    return 1 if failed else 0


async def _rounds(env: BenchEnv, profile: Profile, only: list[str], doc: dict[str, Any]) -> None:
    """The throughput runs, in rounds: each round runs once the ceilings, Longhaul's
    saturation runs and the peers, back to back, so that every ratio of a target is
    taken within a round (the machine drifts over minutes, the peers' figures with it).
    The ceilings and the peers swap places every other round, Longhaul in between:
    a drift over the run weighs on neither side of a ratio more than on the other."""
    steps = [s for s in ("ceiling", "longhaul", "peers") if s in only]
    found: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in steps}

    async def ceiling_round(i: int) -> dict[str, dict[str, Any]]:
        return await ceiling.one_round(
            env, n_amqp=profile.n_amqp, n_pg=profile.n_pg, n_redis=profile.n_redis, round_no=i
        )

    async def longhaul_round(i: int) -> dict[str, dict[str, Any]]:
        # Started for the round and stopped after it: the ceilings and the peers run on
        # a machine where nothing else of the benchmark runs.
        system = LonghaulSystem(env)
        try:
            await system.start()
            await longhaul.warm_up(system, n=profile.n_tasks, timeout_s=profile.timeout_s)
            return await longhaul.saturation_round(
                system, n=profile.n_tasks, batch=profile.batch, timeout_s=profile.timeout_s
            )
        finally:
            system.stop()

    async def peers_round(i: int) -> dict[str, dict[str, Any]]:
        return await peers.one_round(env, n=profile.n_tasks)

    run_step = {"ceiling": ceiling_round, "longhaul": longhaul_round, "peers": peers_round}
    for i in range(profile.runs):
        for step in steps if i % 2 == 0 else steps[::-1]:
            if step in doc["errors"]:
                # Failed in an earlier round: stopped for good, so what it measured is
                # rounds 0..k-1, still paired by index with the others' rounds.
                continue
            print(f"== round {i + 1}/{profile.runs}: {step}", file=sys.stderr)
            for key, result in (await _guard(doc, step, run_step[step](i))).items():
                found[step].setdefault(key, []).append(result)
    configs = {
        "ceiling": ceiling.configs(
            n_amqp=profile.n_amqp, n_pg=profile.n_pg, n_redis=profile.n_redis
        ),
        "longhaul": longhaul.saturation_configs(n=profile.n_tasks, batch=profile.batch),
        "peers": peers.configs(profile.n_tasks),
    }
    for name, by_key in found.items():
        if by_key:  # the rounds before a failure count (the error is in doc["errors"])
            doc[name] = {key: series(configs[name][key], rs) for key, rs in by_key.items()}


async def _guard(doc: dict[str, Any], name: str, coro: Any) -> dict[str, Any]:
    """Run one scenario; a failure is recorded and the next scenario still runs."""
    try:
        result: dict[str, Any] = await coro
        return result
    except Exception:
        doc["errors"][name] = traceback.format_exc()
        return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N, 1 run: checks the code")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--out", type=Path, help="where to write the JSON (default: bench/results/)"
    )
    parser.add_argument("--runs", type=int, help="runs per figure (overrides the profile)")
    parser.add_argument("--tasks", type=int, help="N of the end-to-end runs (overrides)")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.runs:
        profile = replace(profile, runs=args.runs)
    if args.tasks:
        profile = replace(profile, n_tasks=args.tasks)
    return run_loop(main_async(profile, args.only, args.out))


if __name__ == "__main__":
    sys.exit(main())
