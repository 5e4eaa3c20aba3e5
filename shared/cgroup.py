"""What the container may use: its cgroup's memory limit and CPU quota (cgroup v2 or v1).

A process finds its own group in ``/proc/self/cgroup``: inside a container (a cgroup namespace)
that is ``/``, the container's group; outside one (a test, a systemd slice) it is the group's
path under the hierarchy's mount. A container without a cgroup namespace (Docker and containerd
on cgroup v1 nodes, ``--cgroupns=host``) sees its group's path on the host there, while its own
group is what is mounted: where that path is not under the mount, the mount's root is the group.
Unreadable files mean "no limit".
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

MOUNT = Path("/sys/fs/cgroup")


def _files(v2_name: str, v1_controller: str, v1_names: tuple[str, ...]) -> list[tuple[Path, ...]]:
    """For each hierarchy this process is in that has the controller: its group's files."""
    found: list[tuple[Path, ...]] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, group = line.split(":", 2)
            group = group.strip("/")
            if controllers == "":  # cgroup v2: one hierarchy
                found.append((_group(MOUNT, group) / v2_name,))
            elif v1_controller in controllers.split(","):  # v1: mounted as cpu, cpu,cpuacct, memory …
                folder = MOUNT / controllers
                if not folder.is_dir():
                    folder = MOUNT / v1_controller
                found.append(tuple(_group(folder, group) / name for name in v1_names))
    return found


def _group(mount: Path, group: str) -> Path:
    """The folder of ``group`` under a hierarchy's ``mount``; the mount itself when the group's
    host path is not there (a container without a cgroup namespace: see the module's docstring)."""
    folder = mount / group
    return folder if folder.is_dir() else mount


def memory_limit() -> int | None:
    """This process's memory limit in bytes, or None when unlimited."""
    for path, *_ in _files("memory.max", "memory", ("memory.limit_in_bytes",)):
        with contextlib.suppress(OSError, ValueError):
            value = int(path.read_text().strip())  # "max" (v2, no limit) fails here
            if value < 1 << 60:  # v1 says "no limit" with a huge number
                return value
    return None


def cpu_quota() -> float | None:
    """This process's CPU quota in CPUs (a pod's ``limits.cpu``: 1.5 for "1500m"), or None."""
    for paths in _files("cpu.max", "cpu", ("cpu.cfs_quota_us", "cpu.cfs_period_us")):
        with contextlib.suppress(OSError, ValueError, ZeroDivisionError):
            if len(paths) == 1:  # v2: "max 100000" or "150000 100000"
                limit, period = paths[0].read_text().split()
                return None if limit == "max" else int(limit) / int(period)
            quota_us, period_us = (int(path.read_text()) for path in paths)
            return quota_us / period_us if quota_us > 0 else None  # v1: -1 is no quota
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by its CPU quota, at least one."""
    return max(1, math.ceil(cpu_capacity()))


def cpu_capacity() -> float:
    """CPU time this process may use per second: its affinity, capped by its quota (1.5 for
    "1500m"; :func:`usable_cpus` rounds it up to whole CPUs)."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota()
    return min(cpus, quota) if quota else float(cpus)


def runqueue_wait() -> float:
    """Seconds this process's threads have spent runnable but waiting for a CPU (the kernel's
    schedstat), 0.0 where the kernel does not say: it grows when the CPUs are all busy, with this
    process's work or anyone else's."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/self/task/{task}/schedstat").read_text().split()[1])
    return total / 1e9
