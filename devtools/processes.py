"""The service's processes, started from the project's root as `python -m <module>`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def spawn(
    module: str, env: Mapping[str, str], root: Path = ROOT, **kwargs: Any
) -> subprocess.Popen[bytes]:
    """`python -m module` from the project's root (or another checkout of it, `root`) with
    `env` added to this environment."""
    return subprocess.Popen(
        [sys.executable, "-m", module], cwd=root, env={**os.environ, **env}, **kwargs
    )


def stop_on_sigterm() -> None:
    """SIGTERM (`timeout`, a CI runner, kill) ends a run as Ctrl-C does: its cleanups run,
    stopping the processes it started and dropping what it created, instead of the process
    dying alone and leaving them behind."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def free_port() -> int:
    """A loopback port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """An API and workers as processes on one environment, each with its log in `logs`."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.workers: list[subprocess.Popen[bytes]] = []
        self.api: subprocess.Popen[bytes] | None = None
        self._log_paths: dict[int, Path] = {}

    def start(self, module: str, **env: str) -> subprocess.Popen[bytes]:
        """`python -m module` on the cluster's environment, with `env` over it."""
        path = self.logs / f"{len(self._log_paths)}-{module}.log"
        with path.open("wb") as log:
            process = spawn(module, {**self.env, **env}, stdout=log, stderr=subprocess.STDOUT)
        self._log_paths[process.pid] = path
        if module == "worker":
            self.workers.append(process)
        else:
            self.api = process
        return process

    def log_of(self, process: subprocess.Popen[bytes]) -> str:
        return self._log_paths[process.pid].read_text(errors="replace")

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    def worker_named(self, worker_id: str) -> subprocess.Popen[bytes] | None:
        # A worker's id is host-pid-suffix.
        pid = worker_id.rsplit("-", 2)[-2]
        return next((w for w in self.workers if str(w.pid) == pid), None)

    def stop(self) -> None:
        everyone = [*self.workers, *([self.api] if self.api else [])]
        for p in everyone:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in everyone:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
