"""The inline compile (operator process) runs in a child process with a deadline: a compile that runs past it is
stopped with CompileTimedOut, one that dies without an answer is CompileFailed naming its exit code."""

from __future__ import annotations

import multiprocessing
import os
import select
import time

from edgefleet.reconcile.model import _answer

SENDER = object()


def _child(target, *args):
    """A spawned child that holds the sending end (as compile_isolated's) and runs ``target(*args)``; a
    ``SENDER`` among the args is replaced by it."""
    spawn = multiprocessing.get_context("spawn")
    answers, sender = spawn.Pipe(duplex=False)
    args = tuple([sender] if a is SENDER else a for a in args)
    child = spawn.Process(target=target, args=args, daemon=True)
    child.start()
    sender.close()  # as compile_isolated: only the child holds the sending end
    return answers, child


def test_a_compile_past_its_deadline_is_stopped_and_named():
    answers, child = _child(select.select, SENDER, [], [], 60)  # stdlib: the child imports nothing of ours
    started = time.monotonic()
    try:
        reason, message, fix = _answer(answers, child, 1.0)
    finally:
        child.kill()
        child.join()
    assert reason == "CompileTimedOut" and "1 s" in message and "EDGEFLEET_COMPILE_DEADLINE_SECONDS" in fix
    assert time.monotonic() - started < 10


def test_a_compile_process_that_dies_is_a_failure_with_its_exit_code():
    answers, child = _child(os._exit, 9)
    reason, message, _ = _answer(answers, child, 30)
    child.join()
    assert reason == "CompileFailed" and "exit code 9" in message
