"""Fault injection for the crash tests: die (or raise) at a named point of a run.

`OVERTRAIN_FAULT=kill:<point>` makes the process SIGKILL its whole process group the
first time it passes `<point>` (`kill:<point>#<n>`: the n-th time, counted per
process): the study's parent and its workers die at once, like a power cut, with
nothing flushed or cleaned up. `raise:<point>` raises `InjectedFault` there instead
(a cell that fails). Points: `cell-<kind>` (a worker starts a cell), `checkpoint-saved`
(a checkpoint was just renamed into place), `store-write` (inside a result's
transaction, before its commit). Unset, as always outside tests, a check is one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_visits: Counter = Counter()


class InjectedFault(RuntimeError):
    pass


def fault_point(point: str) -> None:
    wanted = os.environ.get("OVERTRAIN_FAULT")
    if not wanted:
        return
    action, _, target = wanted.partition(":")
    name, _, nth = target.partition("#")
    if name != point:
        return
    _visits[point] += 1
    if _visits[point] != int(nth or 1):
        return
    if action == "kill":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at {point}")
