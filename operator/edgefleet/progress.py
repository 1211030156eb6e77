"""Progress of long waits (the cold control-plane build, compile candidates, the demo's waits) with rich.

On a terminal: a live display, one line per task with a bar, a status and the elapsed time; a task with an
estimate fills its bar over that many seconds and says how long is left. Elsewhere (CI logs, a pipe): plain
lines through ``echo``, one when a task starts, when its status changes, every ``heartbeat`` seconds while a
timed task runs, and when it ends, so a log shows what is going on without control characters.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

Echo = Callable[[str], None]


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal (rich's test, which also honours TERM=dumb and NO_COLOR-less CI)."""
    return Console(stderr=True).is_terminal and os.environ.get("TERM") != "dumb"


def duration(seconds: float) -> str:
    """12s, 4m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class _Task:
    name: str
    total: float | None
    estimate: float | None
    started: float = field(default_factory=time.monotonic)
    status: str = ""
    last_said: float = field(default_factory=time.monotonic)
    rich_id: TaskID | None = None
    finished: bool = False


class Progress:
    """Tasks shown live on a terminal, as plain lines elsewhere. Use as a context manager::

        with Progress(echo) as progress:
            task = progress.add("kube-apiserver", estimate=600)
            ...
            progress.done(task, "built in 9m58s")
    """

    def __init__(self, echo: Echo = print, live: bool | None = None, heartbeat: float = 60.0) -> None:
        self.echo = echo
        self.live = on_terminal() if live is None else live
        self.heartbeat = heartbeat
        self._tasks: list[_Task] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._rich: RichProgress | None = None

    def __enter__(self) -> Progress:
        if self.live:
            self._rich = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                      console=Console(stderr=True))
            self._rich.start()
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._ticker.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._rich is not None:
            self._rich.stop()

    def say(self, text: str) -> None:
        """A line above the live display (or a plain line)."""
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            self.echo(text)

    def add(self, name: str, total: float | None = None, estimate: float | None = None, status: str = "") -> _Task:
        """A task with ``total`` steps, or timed against ``estimate`` seconds, or open-ended (a spinner)."""
        task = _Task(name, total, estimate, status=status)
        with self._lock:
            self._tasks.append(task)
        if self._rich is not None:
            task.rich_id = self._rich.add_task(name, total=total or estimate, status=self._status(task))
        else:
            self.echo(f"{name}: {self._status(task)}".rstrip(": "))
        return task

    def update(self, task: _Task, completed: float | None = None, status: str | None = None) -> None:
        """Steps done and/or a new status; a plain line only when the status changes."""
        changed = status is not None and status != task.status
        if status is not None:
            task.status = status
        if self._rich is not None and task.rich_id is not None:
            self._rich.update(task.rich_id, completed=completed, status=self._status(task))
        elif changed:
            self._say_plain(task)

    def done(self, task: _Task, status: str) -> None:
        """The task's last status (a plain line only when it says something new)."""
        changed = status != task.status
        task.status, task.finished = status, True
        with self._lock:
            self._tasks.remove(task)
        if self._rich is not None and task.rich_id is not None:
            total = task.total or task.estimate or 1.0
            self._rich.update(task.rich_id, total=total, completed=total, status=status)
        elif changed or task.estimate is not None:
            self._say_plain(task)

    def _say_plain(self, task: _Task) -> None:
        task.last_said = time.monotonic()
        self.echo(f"{task.name}: {self._status(task)}")

    @staticmethod
    def _status(task: _Task) -> str:
        if task.estimate is None or task.finished:
            return task.status
        elapsed = time.monotonic() - task.started
        left = task.estimate - elapsed
        timing = f"about {duration(left)} left" if left > 0 else f"{duration(-left)} over the estimate"
        return f"{task.status} ({duration(elapsed)}, {timing})".lstrip()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            with self._lock:
                tasks = list(self._tasks)
            for task in tasks:
                if task.estimate is None:
                    continue
                if self._rich is not None and task.rich_id is not None:
                    self._rich.update(task.rich_id, completed=min(now - task.started, task.estimate * 0.99),
                                      status=self._status(task))
                elif now - task.last_said >= self.heartbeat:
                    self._say_plain(task)

