"""What the event script's history check costs Redis: the emit script as it is, against the
same script without its ``INFO replication`` (the replication id that tells a counter written
in another history, docs/events.md), side by side, alternating.

Loopback only: one Redis without persistence. ``--rounds`` rounds of ``--events`` emits
each through the event log (100 a round trip, over 500 jobs), for each script. Reported:
Redis CPU per emit (µs, as Redis counts it: ``INFO cpu``) for each round.

    python -m bench.history_check --rounds 4 --events 20000
"""

from __future__ import annotations

import argparse
import asyncio

from redis.asyncio import Redis

from bench import stack
from stepcast.cli.processes import LocalRedis, free_port
from stepcast.events import _EMIT, Block, EventLog, Progress
from stepcast.round_trips import RedisClient, script

CHECK = """local info_ok, info = pcall(redis.call, 'INFO', 'replication')
local rid = info_ok and string.match(info, 'master_replid:(%w+)') or '-'"""
WITHOUT = _EMIT.replace(CHECK, "local rid = '-'")
STEP = Progress(step=1, total=2, eta_s=0.1)
BLOCK = Block(1, 2**40)


async def cpu_s(redis: RedisClient) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def emits(log: EventLog, count: int, prefix: str) -> float:
    """Redis CPU per emit, in µs: ``count`` emits, 100 at a time (a pipeline, as a batch's
    steps go), over 500 jobs."""
    before = await cpu_s(log.redis)
    for start in range(0, count, 100):
        await asyncio.gather(
            *(
                log.emit(f"{prefix}{index % 500}", "o", STEP, attempt=1, block=BLOCK)
                for index in range(start, start + 100)
            )
        )
    return (await cpu_s(log.redis) - before) / count * 1e6


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    node = LocalRedis(stack.BENCH_DIR / "history-check" / "redis", free_port(), durable=False)
    node.start()
    redis = Redis(port=node.port)
    checked = EventLog(redis, stream_max=1000, ttl_s=3600)
    unchecked = EventLog(redis, stream_max=1000, ttl_s=3600)
    unchecked._emit = script(redis, WITHOUT)  # the one difference
    rounds: dict[str, list[float]] = {"with_check_us": [], "without_us": []}
    try:
        for index in range(args.rounds):
            rounds["with_check_us"].append(round(await emits(checked, args.events, f"a{index}-"), 1))
            rounds["without_us"].append(round(await emits(unchecked, args.events, f"b{index}-"), 1))
    finally:
        await redis.aclose()
        node.stop()
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--events", type=int, default=20000)
    args = parser.parse_args()
    assert WITHOUT != _EMIT, "the emit script's history check changed: update CHECK"
    stack.write_result("history_check", asyncio.run(measure(args)))


if __name__ == "__main__":
    main()
