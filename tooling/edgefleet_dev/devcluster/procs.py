"""Processes the dev cluster starts: pid files, start, stop, wait; shared by the control plane and the real
node."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from .. import toolchain as components


class ClusterError(RuntimeError):
    """The cluster could not be started or reached; the message says what to do."""


# ---------------------------------------------------------------- process bookkeeping


PYTHON_PROCESSES = {"registry-front"}  # run as `python -m ...` of this checkout, not a built binary


def binary(name: str) -> Path:
    """What a component's pid runs (its cmdline[0])."""
    return Path(os.path.realpath(sys.executable)) if name in PYTHON_PROCESSES else components.binary_path(name)


def pidfile(state: Path, name: str) -> Path:
    return state / "pids" / f"{name}.pid"


def alive(state: Path, name: str) -> bool:
    pid = read_pid(state, name)
    return pid is not None and pid_runs(pid, binary(name))


def read_pid(state: Path, name: str) -> int | None:
    try:
        return int(pidfile(state, name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pid_runs(pid: int, binary: Path) -> bool:
    """True when pid is alive and runs our binary (a recycled pid is not ours)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return cmdline == str(binary)


children: dict[str, subprocess.Popen] = {}  # processes this `up` started, by component
started_here: set[str] = set()  # clusters this process started (tests may restart their real node)


def exited(state: Path, name: str) -> bool:
    """True when a component we are starting has died (checked on the Popen: right after fork the
    child's /proc cmdline is still Python's, so the pid-file check would misfire)."""
    proc = children.get(name)
    return proc.poll() is not None if proc else not alive(state, name)


def start(state: Path, name: str, args: list[str], env: dict | None = None) -> None:
    log = state / "logs" / f"{name}.log"
    program = binary(name)
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [str(program), *args], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=state, start_new_session=True, env={**os.environ, **(env or {})},
        )
    children[name] = proc
    pidfile(state, name).write_text(f"{proc.pid}\n")


def stop(state: Path, name: str, grace: float = 5.0) -> bool:
    pid = read_pid(state, name)
    if pid is None or not pid_runs(pid, binary(name)):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_runs(pid, binary(name)):
        time.sleep(0.1)
    if pid_runs(pid, binary(name)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


# ---------------------------------------------------------------- waiting


def wait(what: str, check: Callable[[], bool], timeout: float, state: Path, log: str | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log and exited(state, log):
            raise ClusterError(f"{log} exited while starting; see {state / 'logs' / (log + '.log')}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    hint = f"; see {state / 'logs' / (log + '.log')}" if log else ""
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{hint}")


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "edgefleet", "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}
        ],
        "users": [{"name": user, "user": {"client-certificate": str(pki / f"{user}.crt"),
                                          "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "edgefleet", "context": {"cluster": "edgefleet", "user": user}}],
        "current-context": "edgefleet",
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
