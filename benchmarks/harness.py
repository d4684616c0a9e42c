"""What every benchmark measures, measured one way: a child process's or a block's wall time, CPU time (user +
system: what the path costs whatever else the machine is doing), peak RSS, page faults and disk I/O; the page
cache emptied of given files first; the workload line each script prints; ratios.

    from harness import Cost, measured, ratio, run_child, workload

    cost = run_child("patch", ["melsurgery", "patch", ...], cold=[model])      # a child, cold page cache
    with measured("fit step") as step:                                          # a block of this process
        objective.evaluate(row)
    print(workload("synthetic llama2-7b, 4 layers", f"{tokens} tokens"))
    print(ratio(step.wall_s, base.wall_s))
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9


@dataclass
class Cost:
    """What one path cost: a child process (`run_child`) or a block of this process (`measured`)."""

    name: str
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system
    peak_rss: int = 0  # bytes: the child's ru_maxrss, or this process's VmHWM at the end of the block
    minor_faults: int = 0  # pages mapped without disk I/O: memory allocated and freed shows up here
    major_faults: int = 0
    io: dict[str, int] = field(default_factory=dict)  # /proc/<pid>/io of a child: read_bytes, write_bytes, rchar...
    rc: int | None = None
    note: str = ""
    stdout: str = field(default="", repr=False)
    stderr: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def read_bytes(self) -> int:
        return self.io.get("read_bytes", 0)

    @property
    def written_bytes(self) -> int:
        return self.io.get("write_bytes", 0)


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _status(pid: int | str, key: str) -> int:
    """A size line of /proc/<pid>/status (VmRSS, VmHWM), in bytes; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss(pid: int) -> int:
    """A process's resident set now, in bytes."""
    return _status(pid, "VmRSS")


def peak_rss_self() -> int:
    """This process's peak resident set so far (VmHWM), in bytes."""
    return _status("self", "VmHWM")


def evict(paths: Sequence[Path]) -> None:
    """Drop these files (only) from the page cache, after a sync, so that the next reader starts cold."""
    os.sync()
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(name: str, cmd: Sequence[object], cold: Sequence[Path] = (), *, env: dict[str, str] | None = None,
              guard: int | None = None, log: Path | None = None, capture: bool = False,
              ok: tuple[int, ...] = (0,)) -> Cost:
    """Run `cmd` as a child on a cold page cache for `cold`: its wall and CPU time, peak RSS, page faults and disk
    I/O (its own and its reaped children's). `env` is added to this environment; `guard`: kill the child above
    this RSS; `log`: its output goes there, or with `capture` into the Cost. Exit codes in `ok` count as success
    (reported as 0, the code kept in the note)."""
    evict(cold)
    cost = Cost(name)
    sink = open(log, "w") if log else subprocess.PIPE if capture else subprocess.DEVNULL  # noqa: SIM115
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=sink, stderr=subprocess.STDOUT if log else sink,
                            text=True, env={**os.environ, **(env or {})})
    if capture:  # read while it runs (a full pipe would block it); the child is reaped below, not here
        readers = [threading.Thread(target=lambda s=s, k=k: setattr(cost, k, s.read()), daemon=True)
                   for s, k in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))]
        for r in readers:
            r.start()
    killed = threading.Event()

    def watch() -> None:
        while not killed.is_set():
            if guard and rss(proc.pid) > guard:
                killed.set()
                proc.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: /proc/<pid>/io is readable
    cost.wall_s = time.perf_counter() - start
    try:
        cost.io = {k: int(v) for k, v in (line.split(": ") for line in Path(f"/proc/{proc.pid}/io").read_text()
                                          .splitlines())}
    except OSError:
        cost.io = {}
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = cost.rc = os.waitstatus_to_exitcode(status)
    killed.set()
    watcher.join()
    if capture:
        for r in readers:
            r.join()
    if log:
        sink.close()
    cost.peak_rss = usage.ru_maxrss * 1024
    cost.cpu_s = usage.ru_utime + usage.ru_stime
    cost.minor_faults, cost.major_faults = usage.ru_minflt, usage.ru_majflt
    if cost.rc in ok:
        cost.note = f"exit {cost.rc}" if cost.rc else ""
        cost.rc = 0
    elif guard and cost.peak_rss > guard:
        cost.note = f"killed by the memory guard at {guard / GB:.1f} GB: does not fit"
    else:
        cost.note = f"failed (exit {cost.rc})" + (f", see {log}" if log else "")
    return cost


@contextmanager
def measured(name: str) -> Iterator[Cost]:
    """Measure a block of this process: wall and CPU time, page faults, and the peak RSS at its end (VmHWM: the
    process's peak so far, which includes anything before the block)."""
    cost = Cost(name, rc=0)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield cost
    finally:
        after = resource.getrusage(resource.RUSAGE_SELF)
        cost.wall_s = time.perf_counter() - start
        cost.cpu_s = time.process_time() - cpu
        cost.minor_faults = after.ru_minflt - before.ru_minflt
        cost.major_faults = after.ru_majflt - before.ru_majflt
        cost.peak_rss = peak_rss_self()


def workload(*parts: object) -> str:
    """The workload line every benchmark prints: what ran, then the machine it ran on (cores, load average,
    memory available, kernel), so that a figure is never quoted without its setting."""
    load = os.getloadavg()
    machine = (f"{os.cpu_count()} CPUs, load average {load[0]:.1f}, {mem_available() / GB:.1f} GB available, "
               f"kernel {platform.release()}")
    return "workload: " + "; ".join([*(str(p) for p in parts if p), machine])


def ratio(value: float | None, base: float | None) -> str:
    """`value / base` as "1.23x", or "-" where either is missing or the base is zero."""
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def ratio_of(a: Cost | None, b: Cost | None, attr: str = "wall_s") -> str:
    """The ratio of two costs' `attr` (both must have succeeded)."""
    if not (a and b and a.ok and b.ok):
        return "-"
    return ratio(getattr(a, attr), getattr(b, attr))
