"""`fgd serve` as a user runs it: a real Ray head, MLflow server and API, a job submitted with
`fgd submit --wait`, then SIGTERM and no process left behind; and `fgd demo --quick`.

One `fgd serve` process for the module (the Ray head takes ~20 s to start on 2 cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from fgd_cli.stack import free_port

pytestmark = pytest.mark.slow
# One trial of two steps: what the test needs is a job that the served stack runs on its Ray
# head and logs to its MLflow (the demo test below runs the teacher-then-sweep spec).
TINY_BASELINE = {
    "kind": "baseline",
    "data": {"shapes": {"num_train": 16, "num_val": 8, "image_size": 64, "seed": 0}},
    "model": {"backbone": "resnet18", "fpn_channels": 16, "min_size": 64, "max_size": 64},
    "train": {
        "batch_size": 4,
        "schedule": {"iterations": 2, "warmup_iters": 1},
        "eval_batch_size": 4,
        "eval_max_batches": 1,
    },
}
ROOT = Path(__file__).resolve().parents[1]
FGD = [sys.executable, "-m", "fgd_cli.main"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "FGD_HOME": str(home), "PYTHONPATH": str(ROOT)}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "FGD_URL", "FGD_TOKEN", "FGD_DATABASE_URL"):
        env.pop(name, None)
    env["FGD_MLFLOW_PORT"] = "0"  # any free port: the default 5151 may be taken here
    return {**env, **extra}


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _identity(pid: int) -> tuple[int, str, str] | None:
    """(pid, start time, state) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return pid, fields[19], fields[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    home: Path
    log: Path

    def fgd(self, *args: str, token: str | None = None, timeout: float = 60) -> str:
        env = _env(self.home, FGD_URL=self.url, **({"FGD_TOKEN": token} if token else {}))
        done = subprocess.run(
            [*FGD, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"fgd {args}: {done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("fgd_serve_home")
    port = free_port()
    log = home / "serve.log"
    cmd = [*FGD, "serve", "--port", str(port), "--num-cpus", "2", "--object-store-mb", "150"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=_env(home), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    served = Served(proc, f"http://127.0.0.1:{port}", home, log)
    try:
        deadline = time.monotonic() + 240
        while "ready." not in log.read_text():
            assert proc.poll() is None, f"fgd serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)


def test_a_job_runs_on_the_served_stack_through_the_cli(served: Served, tmp_path: Path) -> None:
    assert httpx.get(f"{served.url}/readyz", timeout=5).status_code == 200
    api = [p for p in descendants(served.proc.pid) if "service.main:app" in _cmdline(p)]
    assert len(api) == 1
    maps = Path(f"/proc/{api[0]}/maps").read_text()
    assert "libtorch" not in maps and "torch/lib" not in maps  # the API process loads no torch

    token = served.fgd("token", "create", "--name", "serve-test").strip().splitlines()[-1]
    assert token.startswith("fgd_")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY_BASELINE))
    t0 = time.monotonic()
    out = served.fgd("submit", str(spec), "--wait", "--poll-seconds", "1", token=token, timeout=300)
    job_id = out.split()[1]
    assert f"job {job_id} SUCCEEDED" in out and "1/1 trials" in out, out
    print(f"tiny job over `fgd serve`: {time.monotonic() - t0:.0f}s")

    board = served.fgd("results", job_id, token=token)
    assert "1 trials by bbox_AP (max)" in board and board.count("FINISHED") == 1, board
    status = served.fgd("status", job_id, token=token)
    assert "SUCCEEDED" in status and "/#/experiments/" in status  # the MLflow links
    logs = served.fgd("logs", job_id, token=token)
    assert f"job {job_id} attempt 1" in logs and "1 trials, 0 errored" in logs
    assert job_id in served.fgd("jobs", "--state", "SUCCEEDED", token=token)


def test_a_second_serve_is_refused_before_it_starts_anything(served: Served) -> None:
    port = served.url.rsplit(":", 1)[1]
    for args, message in (
        (["--port", port], f"port {port} on 127.0.0.1 is in use"),
        (["--port", str(free_port())], f"the service already runs on FGD_HOME={served.home}"),
    ):
        done = subprocess.run(
            [*FGD, "serve", *args],
            env=_env(served.home),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_sigterm_stops_everything_it_started(served: Served) -> None:
    family = descendants(served.proc.pid)
    cmdlines = {pid: _cmdline(pid) for pid in family}
    names = " ".join(cmdlines.values())
    for part in ("ray start --head", "raylet", "gcs_server", "mlflow server", "service.main:app"):
        assert part in names, part
    temp_dir = next(
        arg.split("=", 1)[1]
        for line in cmdlines.values()
        for arg in line.split()
        if arg.startswith("--temp-dir=") and "fgdray-" in arg
    )
    before = {pid: _identity(pid) for pid in family}

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(120) == 0, served.log.read_text()[-3000:]
    assert served.log.read_text().rstrip().endswith("stopped")

    def alive(pid: int) -> bool:
        now = _identity(pid)
        return now is not None and now[:2] == (before[pid] or now)[:2] and now[2] != "Z"

    deadline = time.monotonic() + 10  # children of killed groups may take a moment to exit
    while (left := [p for p in family if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, {p: cmdlines[p][:200] for p in left}
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    strays = [pid for pid in pids if temp_dir in _cmdline(pid)]  # Ray's, wherever they went
    assert not strays, {p: _cmdline(p)[:200] for p in strays}
    assert not Path(temp_dir).exists()
    assert not (served.home / "mlflow" / "server.json").exists()  # the embedded server stopped


def test_demo_quick_runs_the_service_end_to_end(tmp_path: Path) -> None:
    t0 = time.monotonic()
    done = subprocess.run(
        [*FGD, "demo", "--quick"],
        env=_env(tmp_path / "home"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in out
    assert "SUCCEEDED" in out and "trials by bbox_AP" in out
    assert "ui --backend-store-uri sqlite:///" in out and "/#/experiments/" in out
    assert "demo done in" in out and "Traceback" not in done.stderr
    print(f"fgd demo --quick: {time.monotonic() - t0:.0f}s")
