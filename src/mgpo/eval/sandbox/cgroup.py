"""A memory and pids cgroup (v1) per run, where this process may create one: the budget then holds for every page the
program's processes hold, tmpfs, memfd and SysV shared memory included."""

from __future__ import annotations

import functools
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .limits import SandboxLimits

T = TypeVar("T")

# The memory cgroup. Only cgroup v1 is used: there a single thread can join a group, so the thread that starts a
# program joins the run's group for the fork alone and the program is born inside it (no window in which it runs
# outside). cgroup v2 allows that only for threaded groups, which the memory controller is not.
_CGROUP_ROOT = "/sys/fs/cgroup"


@functools.cache
def cgroup_homes() -> tuple[tuple[str, str] | None, str]:
    """((memory dir, pids dir) of this process, "") when runs can get their own cgroup v1 there, else (None, why)."""
    homes: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f.read().splitlines():
                _, controllers, path = line.split(":", 2)
                for controller in controllers.split(","):
                    if controller in ("memory", "pids"):
                        homes[controller] = os.path.join(_CGROUP_ROOT, controller, path.lstrip("/"))
    except (OSError, ValueError) as err:
        return None, f"/proc/self/cgroup cannot be read ({err})"
    if set(homes) != {"memory", "pids"}:
        return None, "no cgroup v1 memory and pids hierarchies (cgroup v2 is not used)"
    for home in homes.values():
        probe = os.path.join(home, f"mgpo-sandbox-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as err:
            return None, f"cannot create a cgroup in {home} ({err.strerror})"
    return (homes["memory"], homes["pids"]), ""


def _write(path: str, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


class Cgroup:
    """One run's cgroup: memory.limit_in_bytes = memory_budget_mb (tmpfs, memfd and SysV shm pages included),
    pids.max = max_processes + 2 (bwrap's outer process, and the starting thread for the fork)."""

    def __init__(self, homes: tuple[str, str], limits: SandboxLimits):
        self.homes = homes
        name = f"mgpo-sandbox-{secrets.token_hex(6)}"
        self.memory, self.pids = (os.path.join(home, name) for home in homes)
        os.mkdir(self.memory)
        os.mkdir(self.pids)
        budget = limits.memory_budget_mb * 2**20
        _write(os.path.join(self.memory, "memory.limit_in_bytes"), budget)
        swap = os.path.join(self.memory, "memory.memsw.limit_in_bytes")
        if os.path.exists(swap):  # memory + swap: no way around the budget through swap
            _write(swap, budget)
        _write(os.path.join(self.pids, "pids.max"), limits.max_processes + 2)

    def start(self, popen: Callable[[], T]) -> T:
        """Call ``popen`` with this thread inside the group: the child inherits the thread's cgroups."""
        tid = threading.get_native_id()
        _write(os.path.join(self.memory, "tasks"), tid)
        _write(os.path.join(self.pids, "tasks"), tid)
        try:
            return popen()
        finally:
            for home in self.homes:
                _write(os.path.join(home, "tasks"), tid)

    def oom_killed(self) -> bool:
        with open(os.path.join(self.memory, "memory.oom_control")) as f:
            return any(line.split() == ["oom_kill", n] and n != "0" for line in f for n in line.split()[1:2])

    def remove(self) -> None:
        for path in (self.memory, self.pids):
            for _ in range(100):  # the killed processes may take a moment to leave
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
