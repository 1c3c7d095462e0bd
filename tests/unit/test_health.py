"""shared.health.Readiness with fake checks: a hung dependency is reported down within
the answer's bound, and probes meanwhile share the one check in flight."""

from __future__ import annotations

import asyncio

from shared.health import Readiness


class Hung:
    """A check that waits until released, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.cancelled = False

    async def __call__(self) -> None:
        self.calls += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def ok() -> None:
    return None


async def refused() -> None:
    raise ConnectionRefusedError


async def test_a_hung_check_is_reported_down_and_probes_share_it() -> None:
    hung = Hung()
    readiness = Readiness(
        {"db": ok, "redis": hung, "amqp": refused}, answer_within=0.05, check_timeout=60
    )
    try:
        async with asyncio.timeout(5):  # the answer's bound is 0.05 s: far below this
            for _ in range(3):
                assert await readiness() == (
                    False,
                    {
                        "status": "unavailable",
                        "dependencies": {
                            "db": "ok",
                            "redis": "down: TimeoutError",
                            "amqp": "down: ConnectionRefusedError",
                        },
                    },
                )
            # Three probes, one ping in flight: none was cancelled to start another.
            assert (hung.calls, hung.cancelled) == (1, False)
            hung.release.set()
            # The ping in flight answered: the probe takes its answer.
            assert (await readiness())[1]["dependencies"]["redis"] == "ok"
            assert hung.calls == 1
            # Once it ended, the next probe checks anew.
            await readiness()
            assert hung.calls == 2
    finally:
        await readiness.aclose()


async def test_a_check_late_past_its_own_timeout_ends_and_the_next_probe_starts_another() -> None:
    hung = Hung()
    readiness = Readiness({"redis": hung}, answer_within=0.05, check_timeout=0.1)
    try:
        async with asyncio.timeout(5):
            assert (await readiness())[1]["dependencies"] == {"redis": "down: TimeoutError"}
            await asyncio.sleep(0.2)  # past the check's own timeout: it was cut
            assert hung.cancelled
            await readiness()
            assert hung.calls == 2
    finally:
        await readiness.aclose()


async def test_closing_cancels_the_checks_in_flight() -> None:
    hung = Hung()
    readiness = Readiness({"redis": hung}, answer_within=0.01, check_timeout=60)
    await readiness()
    assert not hung.cancelled
    await readiness.aclose()
    assert hung.cancelled


async def test_all_ok_is_ready() -> None:
    readiness = Readiness({"db": ok, "redis": ok}, answer_within=1, check_timeout=1)
    assert await readiness() == (
        True,
        {"status": "ok", "dependencies": {"db": "ok", "redis": "ok"}},
    )
