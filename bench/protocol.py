"""The protocol model checker (tests/protocol_model.py), run longer than the suite runs it.

Every schedule up to ``--deviations`` choices away from the default one in a
small world, then ``--seeds`` random schedules of a bigger world. Prints how
many schedules ran, how fast, and the first violation if any (none expected).

    python -m bench.protocol --deviations 2 --seeds 5000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bench.stack import write_result
from tests.protocol_model import Bounds, Violation, explore_exhaustively, explore_randomly

SMALL = Bounds(steps=1, positions=0, faults=1, reconnects=0, lease_expiries=0, cancel=False)
BIGGER = Bounds(steps=3, watchers=2, positions=2, faults=3, reconnects=2, actions=80)


async def measure(deviations: int, seeds: int, max_runs: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as monkeypatch:

        async def exhaustive() -> int:
            return await explore_exhaustively(SMALL, monkeypatch, deviations=deviations, max_runs=max_runs)

        async def randomly() -> int:
            return await explore_randomly(BIGGER, monkeypatch, range(seeds))

        runs: Callable[[], Awaitable[int]]
        for name, runs in (
            (f"exhaustive, {deviations} deviations, small world", exhaustive),
            (f"random, {seeds} seeds, bigger world", randomly),
        ):
            began = time.perf_counter()
            count: int | None = None
            violation: str | None = None
            try:
                count = await runs()
            except Violation as found:
                violation = str(found)
            seconds = time.perf_counter() - began
            figures[name] = {"schedules": count, "seconds": round(seconds, 1), "violation": violation}
            rate = f" ({count / seconds:.0f} schedules/s)" if count else ""
            print(f"{name}: {count} schedules in {seconds:.1f} s{rate}; violation: {violation or 'none'}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deviations", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2000)
    parser.add_argument("--max-runs", type=int, default=200_000)
    args = parser.parse_args()
    figures = asyncio.run(measure(args.deviations, args.seeds, args.max_runs))
    write_result("protocol", figures)


if __name__ == "__main__":
    main()
