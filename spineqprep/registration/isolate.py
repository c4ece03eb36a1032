"""Run a callable in a forked child process, so that a hard crash kills the child only.

itk-elastix 0.25.4 can crash the process it runs in (a segmentation fault, no exception): the
registration of a grid runs in a child so that its Nipype node survives, flags the grid's
discs as failed and lets the subject's other derivatives be published (docs/registration.md).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from spineqprep.errors import one_line

T = TypeVar("T")


@dataclass(frozen=True)
class Crash:
    """Why a forked call gave no result: ``message`` on one line (it "raised ...", "was killed
    by signal ...", "exited with code ...", "did not finish ..." or "could not start ..."),
    and the child's traceback when it raised."""

    message: str
    traceback: str = ""


def run_forked(fn: Callable[[], T], timeout_s: float | None = None) -> T | Crash:
    """``fn()`` run in a forked child; its result (sent back pickled), or a ``Crash``.

    The child is not a daemon, so it may fork workers of its own (``fit_monoexp``). A result
    received in full counts even if the child dies afterwards; the child is always reaped, and
    killed with the workers it forked (its process group) when it has sent nothing after
    ``timeout_s`` seconds (a hung library must not block the run).
    """
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)

    def child() -> None:
        os.setpgrp()  # a group of its own: stopping it stops the workers it forked too
        try:
            writer.send((fn(), None))
        except BaseException as err:  # reported to the parent, whatever it is
            writer.send((None, Crash(f"raised {type(err).__name__}: {one_line(err)}",
                                     "".join(traceback.format_exception(err)))))

    proc = ctx.Process(target=child)
    try:
        proc.start()
    except OSError as err:  # e.g. a container's process limit
        reader.close()
        return Crash(f"could not start: {one_line(err)}")
    finally:
        writer.close()  # the child holds the only write end: its death is our end-of-file
    try:
        try:
            if not reader.poll(timeout_s):
                return Crash(f"did not finish within {timeout_s:g} s and was stopped")
            result, crash = reader.recv()
        except EOFError:  # died without a word: killed, or exited on its own
            proc.join()
            return _death(proc.exitcode)
        proc.join()
    finally:
        reader.close()
        if proc.is_alive():  # timed out, or interrupted (Ctrl-C): the child's work is moot
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.killpg(proc.pid, signal.SIGKILL)
            proc.join()
    return result if crash is None else crash


def _death(exitcode: int | None) -> Crash:
    """The crash of a child that sent nothing, from its exit code (negative: a signal)."""
    if exitcode is not None and exitcode < 0:
        return Crash(f"was killed by signal {-exitcode} "
                     f"({signal.strsignal(-exitcode) or 'unknown signal'})")
    return Crash(f"exited with code {exitcode} without a result")
