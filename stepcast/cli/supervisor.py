"""Keeps the child processes of ``stepcast run`` running.

A child that exits unasked is started again after a back-off (1 s, 2 s, 4 s… capped); one that
exits ``max_exits`` times within ``window_s`` stops the run (:class:`GaveUp`, with its last lines).
Children come in layers (Postgres and Redis, then the server and workers), started in order and
stopped in reverse, so the workers hand their jobs back while Postgres is still up.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol

from stepcast.cli.processes import LocalPostgres, LocalRedis, ProcessError

logger = logging.getLogger(__name__)

KEEP_LINES = 20
_print_lock = threading.Lock()


class GaveUp(ProcessError):
    """A child kept exiting: the run stops."""


def say(line: str) -> None:
    """A short line for the person at the terminal."""
    with _print_lock:
        print(line, flush=True)


class Child(Protocol):
    name: str

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def poll(self) -> int | None: ...

    def terminate(self) -> None:
        """Ask it to stop; :meth:`wait_stopped` waits for it."""

    def wait_stopped(self) -> None:
        """Wait until it has stopped, killing it if it takes too long."""

    def kill(self) -> None: ...

    def last_lines(self) -> list[str]: ...


class Command:
    """A command whose output goes to the terminal line by line, the last lines kept.

    It runs in its own process group, so a Ctrl-C at the terminal reaches only
    the supervisor, which then stops the children in order.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        stop_timeout_s: float = 40,
        out: IO[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.stop_timeout_s = stop_timeout_s
        self._out = out
        self._lines: deque[str] = deque(maxlen=KEEP_LINES)
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        self._process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        assert self._process.stdout is not None
        self._reader = threading.Thread(
            target=self._tee, args=(self._process.stdout,), name=f"tee-{self.name}", daemon=True
        )
        self._reader.start()

    def _tee(self, pipe: IO[bytes]) -> None:
        prefix = f"{self.name:<9}| "
        with pipe:
            for raw in pipe:
                line = raw.decode(errors="replace").rstrip("\r\n")
                with _print_lock:
                    self._lines.append(line)
                    try:
                        out = self._out or sys.stdout
                        out.write(prefix + line + "\n")
                        out.flush()
                    except (OSError, ValueError):
                        pass  # the terminal went away: keep draining so the child never blocks

    def poll(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def terminate(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()

    def wait_stopped(self) -> None:
        if self._process is None:
            return
        try:
            self._process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %g s; killing it", self.name, self.stop_timeout_s)
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(1)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def last_lines(self) -> list[str]:
        if self._reader is not None and self.poll() is not None:
            self._reader.join(1)  # what it wrote before it exited
        with _print_lock:
            return list(self._lines)


class Service:
    """Postgres or Redis as a child: its output is its log file; ``ready`` runs after each start."""

    def __init__(
        self, name: str, server: LocalPostgres | LocalRedis, *, ready: Callable[[], None] | None = None
    ) -> None:
        self.name = name
        self.server = server
        self._ready = ready

    @property
    def pid(self) -> int | None:
        return None if self.server.process is None else self.server.process.pid

    def start(self) -> None:
        try:
            self.server.start()
            if self._ready is not None:
                self._ready()
        except BaseException:
            self.server.stop()
            raise

    def poll(self) -> int | None:
        return None if self.server.process is None else self.server.process.poll()

    def terminate(self) -> None:
        pass  # its own stop sends the signal it wants and waits

    def wait_stopped(self) -> None:
        self.server.stop()

    def kill(self) -> None:
        if self.server.process is not None and self.server.process.poll() is None:
            self.server.process.kill()

    def last_lines(self) -> list[str]:
        try:
            return self.server.log.read_text(errors="replace").splitlines()[-KEEP_LINES:]
        except OSError:
            return []


@dataclass(frozen=True)
class RestartPolicy:
    first_s: float = 1.0
    cap_s: float = 30.0
    max_exits: int = 5
    window_s: float = 60.0

    def delay_s(self, recent_exits: int) -> float:
        return min(self.cap_s, self.first_s * 2.0 ** (recent_exits - 1))


@dataclass
class _Slot:
    child: Child
    exits: deque[float] = field(default_factory=deque)
    restart_at: float | None = None


def describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"code {code}"


class Supervisor:
    """Starts the layers of children, starts again whatever exits, stops them all in order."""

    def __init__(self, layers: Sequence[Sequence[Child]], policy: RestartPolicy | None = None) -> None:
        self.layers = [list(layer) for layer in layers]
        self.policy = policy or RestartPolicy()
        self._slots = [_Slot(child) for layer in self.layers for child in layer]

    def start(self) -> None:
        """Start every child in order; a child that cannot start at all raises."""
        for slot in self._slots:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.child.start()
        say(f"started {slot.child.name} (pid {slot.child.pid})")

    def check(self) -> None:
        """Start again the children whose back-off is over; note the ones that exited.

        Raises :class:`GaveUp` for a child that exited too often.
        """
        now = time.monotonic()
        for slot in self._slots:
            if slot.restart_at is None:
                if (code := slot.child.poll()) is not None:
                    self._exited(slot, now, f"exited with {describe(code)}")
            elif now >= slot.restart_at:
                slot.restart_at = None
                try:
                    self._start(slot)
                except (ProcessError, OSError, subprocess.SubprocessError) as exc:
                    self._exited(slot, time.monotonic(), f"could not start ({exc})")

    def _exited(self, slot: _Slot, now: float, what: str) -> None:
        slot.exits.append(now)
        while slot.exits[0] < now - self.policy.window_s:
            slot.exits.popleft()
        name = slot.child.name
        if len(slot.exits) >= self.policy.max_exits:
            lines = "\n".join(f"    {line}" for line in slot.child.last_lines()) or "    (no output)"
            raise GaveUp(
                f"{name} {what}: {len(slot.exits)} exits within {self.policy.window_s:g} s, "
                f"giving up. Its last lines:\n{lines}"
            )
        delay_s = self.policy.delay_s(len(slot.exits))
        logger.debug("%s %s; starting it again in %g s", name, what, delay_s)
        say(f"{name} {what}; starting it again in {delay_s:g} s")
        slot.restart_at = now + delay_s

    def stop(self) -> None:
        """Stop every child, the last layer first; each layer's children all at once."""
        for layer in reversed(self.layers):
            for child in layer:
                child.terminate()
            for child in layer:
                child.wait_stopped()

    def kill(self) -> None:
        """Kill every child now (a second Ctrl-C)."""
        for slot in self._slots:
            slot.child.kill()
