"""Run a command in its own memory cgroup under a cap, and record what the kernel saw.

Why a cgroup and not ``ru_maxrss``: a memory claim ("7B prunes under 8 GiB") is only checked when
the kernel enforces the cap, as on the user's machine, and a process's resident set misses its
children, its page cache and memory freed between two polls. Each step gets a fresh child cgroup
of ours with ``memory.max`` (cgroup v2) or ``memory.limit_in_bytes`` (v1), whichever controller this
machine mounts; swap is capped too where the kernel offers it (``memory.swap.max = 0`` on v2,
``memory.memsw.limit_in_bytes = cap`` on v1), so a step cannot hide memory in swap.

Recorded per step: wall time, exit code (a signal as its negative), whether the kernel's OOM
killer fired in the group (``oom_kill`` of v2 ``memory.events`` / v1 ``memory.oom_control``), and
two peaks:

- ``peak_bytes``: the cgroup's own peak (v2 ``memory.peak``, v1 ``memory.max_usage_in_bytes``; on an
  older v2 kernel, ``memory.current`` polled every 50 ms). It includes the page cache of files the
  step read or mapped (safetensors shards): charged to the group, but reclaimable, so under a cap
  it grows to the cap without harm;
- ``peak_anon_bytes``: anonymous memory (v2 ``anon``, v1 ``rss`` of ``memory.stat``) polled every
  50 ms: what the step itself holds and cannot give back. Tables compare this one with targets
  (a poll can miss a spike shorter than 50 ms; the cap itself catches every byte).

We run as root on the benchmark machines; where the cgroup file system is not writable,
:func:`cgroup_support` says why and :func:`run_capped` refuses in one line.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from ..units import parse_bytes  # noqa: F401  (re-exported: plans and benchmarks read caps with it)
from ..errors import ConfigError

POLL_S = 0.05


@dataclass(frozen=True)
class CgroupMemory:
    """Where this process's memory controller lives: its version, and the directory of our own
    cgroup under which the per-step groups are made."""

    version: int  # 1 or 2
    parent: Path

    def files(self) -> dict[str, str]:
        if self.version == 2:
            return {"limit": "memory.max", "usage": "memory.current", "peak": "memory.peak",
                    "events": "memory.events", "stat": "memory.stat", "anon": "anon", "swap": "memory.swap.max"}
        return {"limit": "memory.limit_in_bytes", "usage": "memory.usage_in_bytes",
                "peak": "memory.max_usage_in_bytes", "events": "memory.oom_control", "stat": "memory.stat",
                "anon": "rss", "swap": "memory.memsw.limit_in_bytes"}


def _mounts() -> list[tuple[str, str, set[str]]]:
    out = []
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                out.append((parts[2], parts[1], set(parts[3].split(","))))
    except OSError:
        pass
    return out


def _own_path(version: int) -> str:
    """Our cgroup path relative to the hierarchy root (``/proc/self/cgroup``)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, ctrls, path = line.split(":", 2)
            if version == 2 and hid == "0" and ctrls == "":
                return path
            if version == 1 and "memory" in ctrls.split(","):
                return path
    except (OSError, ValueError):
        pass
    return "/"


def detect_memory_cgroup() -> tuple[Optional[CgroupMemory], str]:
    """The memory controller of this machine, or None and the reason (one phrase)."""
    mounts = _mounts()
    for kind, where, opts in mounts:  # a v1 memory hierarchy holds the controller when it exists
        if kind == "cgroup" and "memory" in opts:
            return CgroupMemory(1, Path(where) / _own_path(1).lstrip("/")), ""
    for kind, where, _ in mounts:
        if kind == "cgroup2":
            ctrl = Path(where) / "cgroup.controllers"
            try:
                if "memory" in ctrl.read_text().split():
                    return CgroupMemory(2, Path(where) / _own_path(2).lstrip("/")), ""
            except OSError:
                continue
    return None, "no cgroup hierarchy with the memory controller is mounted (see /proc/self/mounts)"


def cgroup_support() -> tuple[Optional[CgroupMemory], str]:
    """The controller if we may create capped groups under our own cgroup (probed with an empty
    group that is removed at once), else None and why."""
    cg, why = detect_memory_cgroup()
    if cg is None:
        return None, why
    probe = cg.parent / f"sparse-runtime-probe-{os.getpid()}"
    try:
        if cg.version == 2:
            _enable_v2_memory(cg.parent)
        probe.mkdir()
        ok = (probe / cg.files()["limit"]).exists()
        probe.rmdir()
    except OSError as e:
        import errno

        if cg.version == 2 and e.errno == errno.EBUSY:
            return None, (f"cgroup v2 cannot give new groups under {cg.parent} the memory controller while that "
                          "group holds processes (the no-internal-process rule): start the runner in a group of "
                          "its own, e.g. `systemd-run --scope -p Delegate=yes python benchmarks/cgroup_run.py ...`")
        return None, f"cannot create a memory cgroup under {cg.parent} ({e.strerror or e}); run as root"
    if not ok:
        return None, f"a new cgroup under {cg.parent} has no {cg.files()['limit']} (memory controller not enabled)"
    return cg, ""


def _enable_v2_memory(parent: Path) -> None:
    ctl = parent / "cgroup.subtree_control"
    if ctl.exists() and "memory" not in ctl.read_text().split():
        ctl.write_text("+memory")  # EBUSY when our own group holds processes (v2's no-internal-process rule)


def _read_int(p: Path) -> Optional[int]:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_keyed(p: Path) -> dict[str, int]:
    out = {}
    try:
        for line in p.read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def run_capped(cmd: Union[str, Sequence[str]], cap_bytes: Union[int, str], name: str, *,
               env: Optional[dict] = None, cwd: Optional[os.PathLike] = None, timeout_s: Optional[float] = None,
               log_dir: Optional[os.PathLike] = None, poll_s: float = POLL_S) -> dict:
    """Run ``cmd`` (argv list, or a string split like a shell would, without a shell) in a new
    memory cgroup capped at ``cap_bytes`` and return what happened (see the module docstring).
    stdout and stderr go to ``log_dir/<name>.log`` when given (else they are kept, tail in the
    result). ``timeout_s``: the step is killed (SIGKILL, the whole group) and ``timed_out`` set."""
    cg, why = cgroup_support()
    if cg is None:
        raise ConfigError(f"cannot cap memory: {why}")
    cap = parse_bytes(cap_bytes, "memory cap")
    argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    f = cg.files()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
    group = cg.parent / f"sparse-runtime-{safe}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    group.mkdir()
    try:
        (group / f["limit"]).write_text(str(cap))
        swap = group / f["swap"]
        if swap.exists():  # no hiding in swap: v2 none, v1 memory+swap = the cap
            try:
                swap.write_text("0" if cg.version == 2 else str(cap))
            except OSError:
                pass
        procs = str(group / "cgroup.procs")

        def enter() -> None:  # runs in the child between fork and exec: it is capped before it allocates
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))

        log = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            log = open(Path(log_dir) / f"{safe}.log", "wb")
        out = log if log is not None else subprocess.PIPE
        peak_anon, peak_usage = 0, 0
        stat = group / f["stat"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=enter, start_new_session=True)
        captured: list[bytes] = []
        reader = None
        if log is None:
            reader = threading.Thread(target=lambda: captured.append(proc.stdout.read()), daemon=True)
            reader.start()
        timed_out = False
        rusage = None
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            s = _read_keyed(stat)
            peak_anon = max(peak_anon, s.get(f["anon"], 0))
            peak_usage = max(peak_usage, _read_int(group / f["usage"]) or 0)
            if pid:
                rusage = ru
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                timed_out = True
                _kill_group(group, proc)
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
        if reader is not None:
            reader.join(timeout=10)
        if log is not None:
            log.close()
        oom = _read_keyed(group / f["events"]).get("oom_kill", 0)  # v2 memory.events, v1 memory.oom_control
        kernel_peak = _read_int(group / f["peak"])
        result = {
            "name": name, "cmd": argv, "cap_bytes": cap, "cgroup": f"v{cg.version}",
            "wall_s": round(wall, 3), "exit_code": proc.returncode,
            "signal": signal.Signals(-proc.returncode).name if proc.returncode < 0 else None,
            "oom_killed": oom > 0, "oom_kill_count": oom, "timed_out": timed_out,
            "peak_bytes": kernel_peak if kernel_peak is not None else peak_usage,
            "peak_source": f["peak"] if kernel_peak is not None else f"{f['usage']} polled every {poll_s * 1000:.0f} ms",
            "peak_anon_bytes": peak_anon,
            "peak_anon_source": f"{f['stat']} {f['anon']} polled every {poll_s * 1000:.0f} ms",
            "maxrss_bytes": int(rusage.ru_maxrss) * 1024 if rusage is not None else None,
            "ok": proc.returncode == 0 and oom == 0 and not timed_out,
        }
        if log is None:
            text = b"".join(captured).decode("utf-8", "replace")
            result["output_tail"] = text[-2000:]
        else:
            result["log"] = str(Path(log_dir) / f"{safe}.log")
        return result
    finally:
        _remove_group(group)


def _kill_group(group: Path, proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    except OSError:
        pass


def _remove_group(group: Path) -> None:
    """Remove the step's group once its processes are gone (a straggler child is killed first)."""
    for _ in range(100):
        try:
            left = (group / "cgroup.procs").read_text().split()
        except OSError:
            return
        for pid in left:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.05)
