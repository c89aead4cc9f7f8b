"""CPU time and peak memory of process trees, read from ``/proc`` (no psutil).

- :func:`tree_cpu` — user+system seconds of a process, its live descendants, and the children it
  has already reaped (``cutime``/``cstime``): a Celery worker's recycled pool processes and
  Postfix's exited daemons stay counted. Take it before and after a run; the difference is the
  CPU the tree spent in between.
- :func:`machine_busy` — busy CPU seconds of the whole machine (to see other load).
- :func:`peak_rss` — ``VmHWM`` (peak resident set size) of the process and each live descendant.

A process that vanished between listing and reading is skipped (it is then counted through its
parent's ``cutime`` once reaped). Linux only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    """The fields of ``/proc/<pid>/stat`` that matter here (times in seconds)."""

    pid: int
    ppid: int
    comm: str
    own: float  # utime + stime
    reaped: float  # cutime + cstime: children that exited and were waited for


@dataclass(frozen=True)
class Memory:
    pid: int
    role: str  # "main" for the tree's root, else the child's command name
    peak_kb: int


def read_stat(pid: int) -> Stat | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may contain spaces or parentheses: split at the last ')'.
    head, _, rest = text.rpartition(")")
    comm = head.partition("(")[2]
    fields = rest.split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17 of proc(5).
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return Stat(
        pid, int(fields[1]), comm, (utime + stime) / CLOCK_TICKS, (cutime + cstime) / CLOCK_TICKS
    )


def _all_stats() -> list[Stat]:
    stats = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := read_stat(int(entry.name))) is not None:
            stats.append(stat)
    return stats


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, ...), by parent pid."""
    children: dict[int, list[int]] = {}
    for stat in _all_stats():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants, live or reaped (0.0 if it is gone)."""
    total = 0.0
    for member in (pid, *descendants(pid)):
        stat = read_stat(member)
        if stat is not None:
            total += stat.own + stat.reaped
    return total


def machine_busy() -> float:
    """CPU seconds spent by the whole machine (all cores, everything but idle and iowait) since
    boot, from the first line of ``/proc/stat``: subtracting what the measured processes spent
    shows how much *other* work shared the machine during a run."""
    fields = (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]
    return busy / CLOCK_TICKS


def vm_hwm_kb(pid: int) -> int | None:
    try:
        lines = (PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None  # a kernel thread or a zombie


def peak_rss(pid: int) -> list[Memory]:
    """Peak RSS of ``pid`` (role "main") and of each live descendant (role: its command name)."""
    out = []
    for member in (pid, *descendants(pid)):
        kb = vm_hwm_kb(member)
        stat = read_stat(member)
        if kb is not None and stat is not None:
            out.append(Memory(member, "main" if member == pid else stat.comm, kb))
    return out
