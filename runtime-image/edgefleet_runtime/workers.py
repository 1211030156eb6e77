"""``serve --workers N``: N processes serve one port, for throughput beyond one process's GIL.

The process started as ``serve --workers N`` is a supervisor. It loads no model: it reserves the port, starts
N copies of the same command as workers (``EDGEFLEET_WORKER_INDEX`` set), and:

* each worker binds the port with SO_REUSEPORT, so the kernel spreads new connections over them (a
  shared accept socket balanced worse here);
* metrics: the workers write to one prometheus_client multiprocess directory (``--metrics-dir``, else a
  fresh temporary one), so /metrics on any worker answers the sums over all workers;
* gRPC (``--grpc-port``) is served by worker 0 only;
* the connection cap, the body budget and the concurrency cap are divided by N (``Limits.shared_by``);
* SIGTERM/SIGINT and SIGHUP are passed to every worker (drain, reload); the supervisor exits when they all
  have, with the first failure's exit code;
* a worker that exits on its own stops the others, and the supervisor exits non-zero: the kubelet restarts
  the container (nothing hides a crash loop);
* the management API and fleet monitoring keep state in one process, so they are refused with N > 1.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("edgefleet_runtime")

WORKER_ENV = "EDGEFLEET_WORKER_INDEX"
PARENT_ENV = "EDGEFLEET_WORKER_PARENT"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MONITORING_FLAGS = {
    "monitoring": "--monitoring", "hard_examples_dir": "--hard-examples-dir", "drift_reference": "--drift-reference",
    "drift_eval": "--drift-eval", "hard_examples_upload": "--hard-examples-upload",
}  # fmt: skip


def worker_index() -> int | None:
    """This worker's index under a supervisor; None in a plain (or supervising) serve."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None and value.isdigit() else None


def refusal(args: argparse.Namespace) -> str | None:
    """Why these serve flags cannot run with ``--workers``; None when they can."""
    if args.workers < 1:
        return "--workers must be at least 1"
    if args.workers == 1:
        return None
    if args.management_token_file or args.management_port is not None:
        flag = "--management-port" if args.management_port is not None else "--management-token-file"
        return (f"--workers {args.workers} cannot be combined with {flag}: a management load would reach one "
                "worker only; serve with --workers 1, or roll a new variant out through the EdgeDeployment")
    on = [flag for dest, flag in MONITORING_FLAGS.items() if getattr(args, dest)]
    if on:
        return (f"--workers {args.workers} cannot be combined with {on[0]}: fleet monitoring keeps its drift "
                "window, class counts and hard-example spool in one process; serve with --workers 1")
    return None


def die_with_parent() -> None:
    """A worker ends when its supervisor does, even on SIGKILL (Linux PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != os.environ.get(PARENT_ENV):
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor was gone before prctl took effect


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) the port the workers will share: a port in use fails here, with one message,
    and --port 0 picks one port for all of them. Bound, not listening: it never receives connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def metrics_dir(given: str | None) -> tuple[Path, bool]:
    """The multiprocess metrics directory, emptied of old values; True when it is ours to remove at exit."""
    if given is None:
        try:
            return Path(tempfile.mkdtemp(prefix="edgefleet-metrics-")), True
        except OSError as e:
            raise OSError(f"cannot create a metrics directory in {tempfile.gettempdir()} ({e.strerror}); "
                          "give --metrics-dir on a writable volume such as an emptyDir") from None
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):  # a previous run's values (a restarted container with the same volume)
        old.unlink()
    return path, False


def supervise(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``args.workers`` workers of the serve command ``argv`` until they have all exited."""
    try:
        reserved = reserve_port(args.host, args.port)
        mp_dir, ours = metrics_dir(args.metrics_dir)
    except OSError as e:
        print(f"edgefleet-runtime serve: cannot listen: {e}", file=sys.stderr)
        return 2
    port = reserved.getsockname()[1]
    env = {**os.environ, MULTIPROC_ENV: str(mp_dir), PARENT_ENV: str(os.getpid())}
    cmd = [sys.executable, "-m", "edgefleet_runtime.cli", *argv, "--port", str(port)]
    workers: dict[int, int] = {}
    stopping = [False]

    def forward(signum: int, _frame: object = None) -> None:
        if signum != signal.SIGHUP:
            stopping[0] = True
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for i in range(args.workers):
        workers[subprocess.Popen(cmd, env={**env, WORKER_ENV: str(i)}).pid] = i
    log.info("workers started", extra={"workers": args.workers, "port": port, "pids": sorted(workers),
                                       "metrics_dir": str(mp_dir)})  # fmt: skip
    try:
        return _wait(workers, mp_dir, stopping, forward)
    finally:
        reserved.close()
        if ours:
            shutil.rmtree(mp_dir, ignore_errors=True)


def _wait(workers: dict[int, int], mp_dir: Path, stopping: list[bool], forward: Callable[[int], None]) -> int:
    from prometheus_client import multiprocess

    code = 0
    while workers:
        pid, status = os.waitpid(-1, 0)
        index = workers.pop(pid, None)
        if index is None:
            continue
        rc = os.waitstatus_to_exitcode(status)
        multiprocess.mark_process_dead(pid, str(mp_dir))  # type: ignore[no-untyped-call]  # its live gauges (ready, model info) stop counting
        if not stopping[0]:
            log.error("a worker exited; stopping the others", extra={"worker": index, "pid": pid, "code": rc})
            forward(signal.SIGTERM)
            code = rc if rc > 0 else 1
        elif rc != 0 and code == 0:
            code = rc if rc > 0 else 1
    return code
