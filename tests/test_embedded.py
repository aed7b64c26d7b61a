"""``stepcast run`` keeps its children running: restarts with back-off, gives up on a crash loop,
stops everything in order; and one worker per GPU."""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stepcast import settings as settings_module
from stepcast.cli.embedded import visible_gpus, worker_envs
from stepcast.cli.processes import LocalPostgres, free_port, port_in_use
from stepcast.cli.supervisor import Command, GaveUp, RestartPolicy, Supervisor
from stepcast.settings import DATA_DIR
from tests.conftest import ROOT

FAST = RestartPolicy(first_s=0.1, cap_s=0.4, max_exits=5, window_s=60)


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def supervise_until(supervisor: Supervisor, done: threading.Event | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        supervisor.check()
        if done is not None and done.is_set():
            return
        time.sleep(0.01)
    if done is not None:
        raise AssertionError(f"not done after {timeout_s} s")


def test_a_child_that_exits_is_started_again_after_a_growing_back_off(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    stamp = "import sys, time; open(sys.argv[1], 'a').write(f'{time.monotonic()}\\n')"
    child = Command("stamper", python(stamp, str(starts)), os.environ, out=io.StringIO())
    supervisor = Supervisor([[child]], FAST)
    supervisor.start()
    try:
        # Four exits: started again after 0.1, 0.2, 0.4 and 0.4 s (the cap); the fifth gives up.
        with pytest.raises(GaveUp):
            supervise_until(supervisor, None, timeout_s=10)
    finally:
        supervisor.stop()
    times = [float(line) for line in starts.read_text().split()]
    assert len(times) == 5
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for gap, delay_s in zip(gaps, [0.1, 0.2, 0.4, 0.4], strict=True):
        assert gap >= delay_s, gaps


def test_a_child_that_keeps_exiting_stops_the_run_naming_it_with_its_last_lines() -> None:
    out = io.StringIO()
    crash = "import sys; print('\\n'.join(f'line {i}' for i in range(30))); sys.exit(3)"
    steady = Command("steady", python("import time; time.sleep(60)"), os.environ, out=out)
    crasher = Command("crasher", python(crash), os.environ, out=out)
    supervisor = Supervisor([[steady, crasher]], RestartPolicy(first_s=0.01, cap_s=0.01))
    supervisor.start()
    steady_pid = steady.pid
    try:
        with pytest.raises(GaveUp) as caught:
            supervise_until(supervisor, None, timeout_s=10)
    finally:
        supervisor.stop()
    message = str(caught.value)
    assert message.startswith("crasher exited with code 3: 5 exits within 60 s, giving up. Its last lines:\n")
    shown = re.findall(r"^    (line \d+)$", message, re.MULTILINE)
    assert shown == [f"line {i}" for i in range(10, 30)]  # the last 20
    assert "crasher  | line 29\n" in out.getvalue()  # and every line went to the terminal
    assert steady.pid == steady_pid and steady.poll() == -signal.SIGTERM


def test_stop_stops_the_last_layer_first_and_leaves_a_steady_child_alone(tmp_path: Path) -> None:
    record = tmp_path / "stopped"
    on_term = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        "    time.sleep(float(sys.argv[2]))\n"
        "    open(sys.argv[1], 'a').write(sys.argv[3] + '\\n')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    out = io.StringIO()
    database = Command("database", python(on_term, str(record), "0", "database"), os.environ, out=out)
    app = Command("app", python(on_term, str(record), "0.3", "app"), os.environ, out=out)
    supervisor = Supervisor([[database], [app]], FAST)
    supervisor.start()
    pids = (database.pid, app.pid)
    supervise_until(supervisor, None, timeout_s=0.5)
    while out.getvalue().count("| ready") < 2:
        time.sleep(0.01)
    started = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - started < 5
    assert (database.pid, app.pid) == pids  # never restarted
    assert record.read_text().split() == ["app", "database"]  # the app stopped before its database
    assert database.poll() == 0 and app.poll() == 0


def test_workers_get_one_gpu_each_distinct_ids_and_metrics_ports() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "3,5"}
    on_gpus = settings_module.load(device="cuda", worker_id="w", worker_metrics_port=9100)
    envs = worker_envs(on_gpus, env, None)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3", "5"]
    assert [e["STEPCAST_WORKER_ID"] for e in envs] == ["w-0", "w-1"]
    assert [e["STEPCAST_WORKER_METRICS_PORT"] for e in envs] == ["9100", "9101"]
    # --workers wins, round robin over the GPUs; so does an explicit STEPCAST_WORKERS.
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_envs(on_gpus, env, 3)] == ["3", "5", "3"]
    assert len(worker_envs(settings_module.load(device="cuda", workers=1), env, None)) == 1
    # STEPCAST_DEVICE=auto (the default) takes the GPUs there are, like cuda.
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_envs(settings_module.load(), env, None)] == ["3", "5"]
    # On the CPU: settings.workers of them, GPUs or not, ids left to each worker.
    on_cpu = worker_envs(settings_module.load(device="cpu", workers=2), env, None)
    assert len(on_cpu) == 2 and all(e == env for e in on_cpu)


def test_gpus_are_counted_by_nvidia_smi_and_none_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpus({}) == []
    nvidia_smi = tmp_path / "nvidia-smi"
    nvidia_smi.write_text("#!/bin/sh\necho 'GPU 0: H200 (UUID: GPU-a)'\necho 'GPU 1: H200 (UUID: GPU-b)'\n")
    nvidia_smi.chmod(0o755)
    assert visible_gpus({}) == ["0", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1"}) == ["1"]
    nvidia_smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert visible_gpus({}) == []


class Run:
    """``stepcast run`` as a child process, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(10)

    def wait_for(self, pattern: str, timeout_s: float, *, after: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if match := re.fullmatch(pattern, line):
                    return match
            assert self.process.poll() is None, "\n".join(self.lines[-40:])
            time.sleep(0.05)
        raise AssertionError(f"no line {pattern!r} after {timeout_s} s:\n" + "\n".join(self.lines[-40:]))

    def children(self) -> set[int]:
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.process.pid:
                found.add(int(stat.parent.name))
        return found


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = DATA_DIR / "test" / f"run-{uuid.uuid4().hex[:8]}"
    # Where Postgres keeps its data when it cannot reach the checkout (run as root under /root).
    postgres_dir = LocalPostgres(path / "postgres", 1).data_dir
    yield path
    shutil.rmtree(postgres_dir, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)


def test_stepcast_run_starts_a_killed_worker_again_and_stops_cleanly_on_ctrl_c(
    data_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("STEPCAST_")},
        "STEPCAST_PORT": str(port),
        "STEPCAST_DATABASE_URL": f"postgresql://stepcast@127.0.0.1:{free_port()}/stepcast",
        "STEPCAST_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "STEPCAST_STORAGE_DIR": str(tmp_path / "images"),
        "STEPCAST_BACKEND": "simulated",
        "STEPCAST_WORKERS": "2",
        "STEPCAST_HEARTBEAT_S": "0.2",
    }
    run = Run([sys.executable, "-m", "stepcast.cli", "run", "--data-dir", str(data_dir)], env)
    try:
        run.wait_for(r"stepcast is up: .*", timeout_s=60)
        # The fresh database was migrated before the server started (which would not).
        server_started = next(n for n, line in enumerate(run.lines) if line.startswith("started server"))
        assert run.lines.index("migrated  0001_pre_baseline") < server_started
        started = r"started (worker-\d) \(pid (\d+)\)"
        pids = {m[1]: int(m[2]) for line in run.lines if (m := re.fullmatch(started, line))}
        assert set(pids) == {"worker-0", "worker-1"}
        seen = len(run.lines)

        os.kill(pids["worker-0"], signal.SIGKILL)
        run.wait_for(r"worker-0 exited with signal 9; starting it again in 1 s", timeout_s=10, after=seen)
        again = run.wait_for(r"started worker-0 \(pid (\d+)\)", timeout_s=10, after=seen)
        assert int(again[1]) != pids["worker-0"]
        run.wait_for(r"worker-0 +\| .*worker ready.*", timeout_s=30, after=seen)

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            submitted = client.post("/v1/jobs", json={"prompt": "x", "steps": 2})
            assert submitted.status_code == 202, submitted.text
            deadline = time.monotonic() + 30
            while (job := client.get(f"/v1/jobs/{submitted.json()['id']}").json())["status"] != "completed":
                assert job["status"] in {"pending", "processing"} and time.monotonic() < deadline, job
                time.sleep(0.05)

        children = run.children()
        assert len(children) == 5  # postgres, redis, the server, two workers
        run.process.send_signal(signal.SIGINT)
        assert run.process.wait(60) == 0, "\n".join(run.lines[-40:])
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    finally:
        run.close()


async def test_admin_commands_start_the_embedded_postgres_when_make_run_is_not_up(tmp_path: Path) -> None:
    from stepcast.cli.main import _database

    port = free_port()
    settings = settings_module.load(database_url=f"postgresql://stepcast@127.0.0.1:{port}/stepcast")
    async with _database(settings, tmp_path) as db:
        assert await db.owners.api_keys() == []  # migrated: the table is there
    assert not port_in_use(port)  # stopped again after the command
