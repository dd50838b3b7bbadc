"""A Ray cluster started with the real ``ray start`` CLI, on loopback addresses, stopped by its pids.

Node addresses are 127.0.0.2 (head) and 127.0.0.3+ (workers): ``ray start`` replaces the
literal 127.0.0.1 by the machine's outward address, but keeps any other loopback address as
given. Token authentication is on (``RAY_AUTH_MODE=token``, a fresh random token), as the
README tells users to run it. Stopping never uses ``ray stop`` (it would stop every Ray on the
machine): the processes are found by this cluster's own temp dir and GCS address and killed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.2") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RayCliCluster:
    def __init__(self, workers: list[dict], head_cpus: int = 0):
        self.workers, self.head_cpus = workers, head_cpus
        # short: Ray's unix socket paths must stay under ~107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="ssr", dir="/tmp")
        self.host = "127.0.0.2"
        self.port, self.dashboard_port = free_port(), free_port()
        self.token = secrets.token_hex(16)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        }
        # The venv first on PATH, as a user who activated it: the job's entrypoint runs there.
        self.env.update(
            PATH=f"{BIN}:{os.environ.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
        )

    @property
    def gcs_address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    def _ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> RayCliCluster:
        head = self._ray(
            "start", "--head", f"--node-ip-address={self.host}", f"--port={self.port}",
            f"--dashboard-host={self.host}", f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={self.head_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        )  # fmt: skip
        if head.returncode:
            self.stop()
            raise RuntimeError(f"ray start --head failed:\n{head.stdout[-2000:]}\n{head.stderr[-2000:]}")
        for n, w in enumerate(self.workers):
            args = [
                "start", f"--address={self.gcs_address}", f"--node-ip-address=127.0.0.{3 + n}",
                f"--num-cpus={w.get('num_cpus', 1)}", "--disable-usage-stats",
            ]  # fmt: skip
            if w.get("resources"):
                import json

                args.append(f"--resources={json.dumps(w['resources'])}")
            out = self._ray(*args)
            if out.returncode:
                self.stop()
                raise RuntimeError(
                    f"ray start (worker {n}) failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
                )
        return self

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster (and their children)."""
        marks = (self.temp_dir, self.gcs_address)
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if any(m in cmd for m in marks):
                    found[p.pid] = p
                    for c in p.children(recursive=True):
                        found[c.pid] = c
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        # Most go at once; the GCS server and the autoscaler's monitor ignore SIGTERM for 15 s or
        # more (measured), so whatever is left after a short grace is killed, as `ray stop --force`.
        _, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
