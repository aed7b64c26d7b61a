"""CPU of each stepcast component (as a share of one core) over a stretch of a benchmark.

Components: the server processes, each worker, Redis, and Postgres with all
its backends (connections opened meanwhile included). psutil reads the
kernel's user + system time of each process.
"""

from __future__ import annotations

import time

import psutil  # type: ignore[import-untyped]

from bench import stack
from stepcast.cli.processes import LocalPostgres, LocalRedis

POSTGRES = "postgres (all backends)"


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class CpuMeter:
    """``start()``, run the load, then ``shares()``: CPU seconds per wall second for each component."""

    def __init__(self, running: stack.Running, postgres: LocalPostgres, redis: LocalRedis) -> None:
        assert postgres.process is not None and redis.process is not None
        self._postmaster = psutil.Process(postgres.process.pid)
        servers = {
            "server" if len(running.servers) == 1 else f"server {i + 1}": [psutil.Process(s.pid)]
            for i, s in enumerate(running.servers)
        }
        self.watched = {
            **servers,
            **{f"worker {i + 1}": [psutil.Process(w.pid)] for i, w in enumerate(running.workers)},
            "redis": [psutil.Process(redis.process.pid)],
            POSTGRES: self._postgres(),
        }
        self.start()

    def _postgres(self) -> list[psutil.Process]:
        return [self._postmaster, *self._postmaster.children(recursive=True)]

    def start(self) -> None:
        self._before = {name: _cpu_seconds(procs) for name, procs in self.watched.items()}
        self._began = time.perf_counter()

    def shares(self) -> dict[str, float]:
        self.watched[POSTGRES] = self._postgres()  # backends started meanwhile
        wall_s = time.perf_counter() - self._began
        return {
            name: round((_cpu_seconds(procs) - self._before.get(name, 0.0)) / wall_s, 3)
            for name, procs in self.watched.items()
        }

    def ms_per_job(self, jobs: int) -> dict[str, float]:
        """CPU milliseconds each component spent per job since ``start()``."""
        wall_s = time.perf_counter() - self._began
        return {name: round(share * wall_s / jobs * 1000, 2) for name, share in self.shares().items()}
