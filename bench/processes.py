"""What the benchmark scripts share to run servers as real processes: a free port, waiting
until one listens, stopping one, the open-files limit, and a process's RSS and CPU from /proc.

Imported by the scripts next to it (``bench/run``, ``bench/presence.py``, ``bench/refill.py``,
``bench/connections.py``, ``bench/soak.py``, ``bench/api.py``), which Python runs with
``bench/`` first on ``sys.path``.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import socket
import subprocess
import time
from typing import Any


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on right now, below the kernel's ephemeral
    range: no outgoing connection takes it before the server binds it, and probing it before
    then cannot connect the probe to itself (a TCP self-connect, which looks like a listener)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral = int(ranges.read().split()[0])
    for _ in range(1000):
        port = _ports.randrange(10000, ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 10000 and {ephemeral}")


_ports = random.Random()


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """Return once something accepts on ``port``; raise if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGINT (the broker drains and exits), then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def raise_open_files() -> int:
    """Lift this process's open-files limit (inherited by every child) to its hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for text in status:
            if text.startswith("VmRSS:"):
                return int(text.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process ``pid`` has used (utime + stime)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
