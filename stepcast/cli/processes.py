"""Postgres and Redis as local child processes on loopback.

Used by ``make run`` (the embedded default) and by the test suite, so both run
the same real servers the same way. Data lives under a git-ignored folder.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class ProcessError(RuntimeError):
    pass


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the ephemeral range.

    The kernel's own pick (bind to port 0) comes from the ephemeral range, where
    any outgoing connection may take it before the server binds it; ports below
    that range are only ever taken on purpose.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randint(max(1024, low - 16384), low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ProcessError("no free port below the ephemeral range")


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    name = Path(str(process.args[0] if isinstance(process.args, list) else process.args)).name
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProcessError(f"{name} exited with {process.returncode}; see {log}")
        if port_in_use(port):
            return
        time.sleep(0.05)
    raise ProcessError(f"{name} did not listen on 127.0.0.1:{port} within {timeout_s} s; see {log}")


def find_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the Postgres server binaries off PATH.
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return candidates[-1]
    raise ProcessError(f"{name} not found: run `make deps` (installs Postgres and Redis through apt)")


def _as_postgres_user() -> dict[str, Any]:
    """Postgres refuses to run as root; as root, run it as the ``postgres`` user."""
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


def _postgres_can_reach(path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(["test", "-x", str(path)], capture_output=True, **_as_postgres_user())
    return probe.returncode == 0


def _stop(process: subprocess.Popen[bytes] | None, sig: int, timeout_s: float = 10) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LocalPostgres:
    """A private Postgres cluster: ``initdb`` once, then ``postgres`` as a child process."""

    def __init__(self, data_dir: Path, port: int, *, user: str = "stepcast", durable: bool = True) -> None:
        self.requested_dir = data_dir
        self.port = port
        self.user = user
        self.durable = durable
        self.process: subprocess.Popen[bytes] | None = None
        self.data_dir = self._reachable_dir(data_dir)

    @staticmethod
    def _reachable_dir(wanted: Path) -> Path:
        wanted.parent.mkdir(parents=True, exist_ok=True)
        if _postgres_can_reach(wanted.parent):
            return wanted
        # The checkout sits below a folder the postgres user cannot enter (/root,
        # say): keep the cluster in a stable place it can, named after the checkout.
        tag = hashlib.sha256(str(wanted.resolve()).encode()).hexdigest()[:12]
        fallback = Path(tempfile.gettempdir()) / f"stepcast-pg-{tag}"
        logger.warning("postgres cannot reach %s; keeping its data in %s", wanted, fallback)
        return fallback

    @property
    def log(self) -> Path:
        return self.data_dir / "server.log"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        result = subprocess.run(args, capture_output=True, text=True, **_as_postgres_user())
        if result.returncode != 0:
            raise ProcessError(f"{args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self, timeout_s: float = 30) -> None:
        if port_in_use(self.port):
            raise ProcessError(f"127.0.0.1:{self.port} is taken; set another port or stop what holds it")
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.data_dir, "postgres", "postgres")
            self.data_dir.chmod(0o700)
            self._run(
                find_binary("initdb"), "-D", str(self.data_dir), "-U", self.user,
                "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions",
            )  # fmt: skip
        options = ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.data_dir}"]
        if not self.durable:
            # Test clusters are thrown away: skip the disk flushes.
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        log = self.log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [find_binary("postgres"), "-D", str(self.data_dir), "-p", str(self.port), *options],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **_as_postgres_user(),
            )  # fmt: skip
        wait_for_port(self.port, self.process, timeout_s, log)
        self._wait_accepting(timeout_s)

    def _wait_accepting(self, timeout_s: float) -> None:
        isready = find_binary("pg_isready")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [isready, "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user], capture_output=True
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise ProcessError(f"postgres on port {self.port} did not accept connections")

    def create_database(self, name: str, *, template: str | None = None) -> None:
        """CREATE DATABASE unless it exists (through psql: no event loop needed here)."""
        exists = subprocess.run(
            ["psql", self.dsn(), "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        if exists.stdout.strip() != "1":
            suffix = f' TEMPLATE "{template}"' if template else ""
            subprocess.run(["psql", self.dsn(), "-qc", f'CREATE DATABASE "{name}"{suffix}'], check=True)

    def stop(self) -> None:
        _stop(self.process, signal.SIGINT)  # SIGINT: Postgres "fast" shutdown


class LocalRedis:
    def __init__(
        self, data_dir: Path, port: int, *, durable: bool = True, options: tuple[str, ...] = ()
    ) -> None:
        """``options``: more of redis-server's arguments (``--cluster-enabled yes``, …)."""
        self.data_dir = data_dir
        self.port = port
        self.durable = durable
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.data_dir / "redis.log"

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout_s: float = 10) -> None:
        if port_in_use(self.port):
            raise ProcessError(f"127.0.0.1:{self.port} is taken; set another port or stop what holds it")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes"] if self.durable else ["--appendonly", "no", "--save", ""]
        log = self.log
        self.process = subprocess.Popen(
            [
                find_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--logfile", str(log), "--daemonize", "no",
                "--protected-mode", "yes", *persistence, *self.options,
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        wait_for_port(self.port, self.process, timeout_s, log)

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, as a crashed or lost node (no goodbye to its clients or its cluster)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class LocalRedisCluster:
    """A Redis Cluster on loopback: ``primaries`` shards of ``replicas + 1`` nodes each, made by
    ``redis-cli --cluster create`` (both from the redis-server package). For tests and
    benchmarks of the event plane on a cluster; nodes fail over after ``node_timeout_ms``."""

    def __init__(
        self, data_dir: Path, *, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
    ) -> None:
        self.data_dir = data_dir
        self.primaries_made = primaries
        self.replicas = replicas
        count = primaries * (replicas + 1)
        ports: list[int] = []  # each node's, then each node's cluster bus's (not port + 10000,
        while len(ports) < 2 * count:  # which may lie in the ephemeral range): all different
            if (port := free_port()) not in ports:
                ports.append(port)
        self.nodes = []
        for index, (port, bus) in enumerate(zip(ports[:count], ports[count:], strict=True)):
            data_dir = self.data_dir / f"node-{index}"
            options = (
                "--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-port", str(bus), "--cluster-config-file", str(data_dir / "nodes.conf"),
            )  # fmt: skip
            self.nodes.append(LocalRedis(data_dir, port, durable=False, options=options))

    def url(self) -> str:
        """A live node of the cluster, from which a client finds the others."""
        live = [node for node in self.nodes if node.process is not None and node.process.poll() is None]
        return (live or self.nodes)[0].url()

    def start(self, timeout_s: float = 30) -> None:
        """Start the nodes and make them one cluster; on any failure, stop the nodes started."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        for node in self.nodes:
            shutil.rmtree(node.data_dir, ignore_errors=True)
            node.start()
        if self.primaries_made >= 3:
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [find_binary("redis-cli"), "--cluster", "create", *addresses,
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout_s,
            )  # fmt: skip
        else:
            self._create_small(timeout_s)
        self.wait_until_healthy(timeout_s)

    def _create_small(self, timeout_s: float) -> None:
        """What ``redis-cli --cluster create`` does, for the one or two primaries it refuses
        (a benchmark's cluster that grows from one shard)."""
        primaries, replicas = self.nodes[: self.primaries_made], self.nodes[self.primaries_made :]
        step = 16384 // len(primaries)
        for index, node in enumerate(primaries):
            last = 16383 if index == len(primaries) - 1 else (index + 1) * step - 1
            self.cli(node, "CLUSTER", "ADDSLOTSRANGE", str(index * step), str(last))
            self.cli(node, "CLUSTER", "SET-CONFIG-EPOCH", str(index + 1))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.cli(node, "CLUSTER", "MEET", "127.0.0.1", str(first.port), self._bus_port(first))
        deadline = time.monotonic() + timeout_s
        while any(
            f"cluster_known_nodes:{len(self.nodes)}" not in self.cli(n, "CLUSTER", "INFO") for n in self.nodes
        ):
            if time.monotonic() > deadline:
                raise ProcessError(f"the nodes under {self.data_dir} did not meet in {timeout_s} s")
            time.sleep(0.1)
        for index, node in enumerate(replicas):
            primary = primaries[index % len(primaries)]
            self.cli(node, "CLUSTER", "REPLICATE", self.cli(primary, "CLUSTER", "MYID").strip())

    def _bus_port(self, node: LocalRedis) -> str:
        return node.options[node.options.index("--cluster-port") + 1]

    def wait_until_healthy(self, timeout_s: float = 30) -> None:
        """Until every live node says the cluster is ok (every slot has a live primary) and
        every replica is in sync."""
        deadline = time.monotonic() + timeout_s
        while True:
            if all(self._ok(node) for node in self.nodes if node.process and node.process.poll() is None):
                return
            if time.monotonic() > deadline:
                raise ProcessError(f"the Redis Cluster under {self.data_dir} is not ok after {timeout_s} s")
            time.sleep(0.1)

    def _ok(self, node: LocalRedis) -> bool:
        """The cluster is ok as this node sees it; a replica has its primary's data (it can
        take over)."""
        info = self.cli(node, "CLUSTER", "INFO", check=False)
        role = self.cli(node, "ROLE", check=False).split()
        synced = role[:1] == ["master"] or role[3:4] == ["connected"]
        return "cluster_state:ok" in info and "cluster_slots_ok:16384" in info and synced

    def cli(self, node: LocalRedis, *command: str, check: bool = True) -> str:
        answer = subprocess.run(
            [find_binary("redis-cli"), "-p", str(node.port), *command],
            capture_output=True, text=True, check=check, timeout=10,
        )  # fmt: skip
        return answer.stdout

    def primaries(self) -> list[LocalRedis]:
        """The live nodes that serve slots now."""
        live = [node for node in self.nodes if node.process is not None and node.process.poll() is None]
        return [node for node in live if self.cli(node, "ROLE", check=False).startswith("master")]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def running(*servers: LocalPostgres | LocalRedis) -> Iterator[None]:
    """Start the servers in order, stop them in reverse, whatever happens."""
    started: list[LocalPostgres | LocalRedis] = []
    try:
        for server in servers:
            server.start()
            started.append(server)
        yield
    finally:
        for server in reversed(started):
            server.stop()
