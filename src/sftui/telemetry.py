"""GPU (NVML, through nvidia-ml-py's ``pynvml``) and system (psutil) sampling.

No GPU, no driver or a failing query is a state, not a crash: a field that cannot be read is
``None`` (shown as "n/a"), and when NVML cannot start at all ``gpu_error`` says why.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Callable, Iterable

import psutil

GPU_FIELDS = ("mem_used", "mem_total", "util", "temp", "power_w", "power_limit_w", "procs")
COMMAND_CHARS = 160  # a process's command line as telemetry keeps it


def _nvml():
    import pynvml  # nvidia-ml-py

    return pynvml


class Nvml:
    """A started NVML session, or the reason there is none."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.count = 0
        try:
            self._nv = _nvml()
            self._nv.nvmlInit()
            self.count = self._nv.nvmlDeviceGetCount()
        except ImportError:
            self.error = "no GPU telemetry: nvidia-ml-py is not installed"
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.error = "no NVIDIA GPU found" if "NotFound" in type(e).__name__ or "Driver" in type(e).__name__ \
                else f"no GPU telemetry: {e}"
        if self.error is None and self.count == 0:
            self.error = "no NVIDIA GPU found"

    @property
    def ok(self) -> bool:
        return self.error is None

    def _q(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:
            return None

    def sample(self, index: int) -> dict[str, Any]:
        nv = self._nv
        h = self._q(lambda: nv.nvmlDeviceGetHandleByIndex(index))
        if h is None:
            return {"index": index, "name": None, "uuid": None, **{k: None for k in GPU_FIELDS}}
        # nvidia-smi's reading: the v2 query, whose `used` leaves out what the driver reserves
        # (the v1 `used` showed an idle H200 at 0.6 GiB, nvidia-smi at 4 MiB); v1 where the
        # driver lacks v2.
        mem = self._q(lambda: nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2)) \
            or self._q(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        util = self._q(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        power = self._q(lambda: nv.nvmlDeviceGetPowerUsage(h))
        limit = self._q(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
        return {
            "index": index,
            "name": _text(self._q(lambda: nv.nvmlDeviceGetName(h))),
            "uuid": _text(self._q(lambda: nv.nvmlDeviceGetUUID(h))),
            "mem_used": mem.used if mem else None,
            "mem_total": mem.total if mem else None,
            "util": util.gpu if util else None,
            "temp": self._q(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "power_w": power / 1000 if power is not None else None,
            "power_limit_w": limit / 1000 if limit is not None else None,
            "procs": self.processes(h),
        }

    def processes(self, h: Any) -> list[dict[str, Any]] | None:
        """Who holds memory on the GPU: NVML's compute and graphics processes (the v3 query, v2
        where the driver lacks it), as ``gpu_processes`` makes them; None when NVML will not say."""
        nv = self._nv
        records: list[Any] = []
        answered = False
        for kind in ("Compute", "Graphics"):
            got = self._q(lambda: getattr(nv, f"nvmlDeviceGet{kind}RunningProcesses")(h))
            if got is None:
                got = self._q(lambda: getattr(nv, f"nvmlDeviceGet{kind}RunningProcesses_v2")(h))
            if got is not None:
                answered = True
                records += got
        return gpu_processes(records) if answered else None

    def close(self) -> None:
        if self.ok:
            self._q(self._nv.nvmlShutdown)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_processes(records: Iterable[Any]) -> list[dict[str, Any]]:
    """NVML process records (``pid``, ``usedGpuMemory``) as telemetry's ``procs``: pid, user,
    command and memory, biggest holder first.

    ``mem`` is NVML's ``usedGpuMemory``, the figure ``nvidia-smi`` prints per process (None where
    the driver does not say). A process listed twice (compute and graphics) counts once, at its
    larger figure. User and command come from psutil; a pid it cannot see (another container's
    namespace, gone since) keeps them None."""
    mem: dict[int, int | None] = {}
    for r in records:
        pid, used = int(r.pid), r.usedGpuMemory
        if pid not in mem or (used is not None and (mem[pid] is None or used > mem[pid])):
            mem[pid] = used
    procs = [{"pid": pid, **_who(pid), "mem": used} for pid, used in mem.items()]
    return sorted(procs, key=lambda p: (-(p["mem"] or 0), p["pid"]))


def _who(pid: int) -> dict[str, str | None]:
    """The user and the command line (program name without its directory) of a process."""
    out: dict[str, str | None] = {"user": None, "command": None}
    try:
        p = psutil.Process(pid)
    except psutil.Error:
        return out
    try:
        out["user"] = p.username()
    except (psutil.Error, KeyError):  # KeyError: a uid with no passwd entry
        pass
    try:
        argv = p.cmdline()
        argv = [os.path.basename(argv[0]), *argv[1:]] if argv else [p.name()]
        # one line, whatever the arguments hold (`python -c` with a script of several lines)
        out["command"] = " ".join(" ".join(argv).split())[:COMMAND_CHARS]
    except psutil.Error:
        pass
    return out


def visible_gpus() -> tuple[list[int], str | None]:
    """NVML indices of the GPUs this process may use (CUDA_VISIBLE_DEVICES respected), and why none."""
    nvml = Nvml()
    try:
        if not nvml.ok:
            return [], nvml.error
        all_indices = list(range(nvml.count))
        spec = os.environ.get("CUDA_VISIBLE_DEVICES")
        if spec is None:
            return all_indices, None
        uuids = {i: (nvml.sample(i)["uuid"] or "") for i in all_indices}
        chosen: list[int] = []
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                break
            if item.isdigit() and int(item) in all_indices:
                chosen.append(int(item))
            else:
                match = [i for i, u in uuids.items() if item.startswith("GPU-") and u.startswith(item)]
                if not match:
                    break  # CUDA stops at the first invalid entry
                chosen.append(match[0])
        return chosen, (None if chosen else "CUDA_VISIBLE_DEVICES hides every GPU")
    finally:
        nvml.close()


def system_sample() -> dict[str, Any]:
    try:
        vm = psutil.virtual_memory()
        mem = {"mem_used": vm.total - vm.available, "mem_total": vm.total}
    except Exception:
        mem = {"mem_used": None, "mem_total": None}
    try:
        sw = psutil.swap_memory()
        swap = {"swap_used": sw.used, "swap_total": sw.total}
    except Exception:
        swap = {"swap_used": None, "swap_total": None}
    try:
        cpu = psutil.cpu_percent(interval=None)
    except Exception:
        cpu = None
    return {**mem, **swap, "cpu_percent": cpu}


def tree_rss(pid: int) -> int | None:
    """Resident memory of a process and all its descendants (the run's processes)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class Sampler:
    """Samples GPUs and the system on a background thread every ``interval`` seconds.

    ``latest()`` never blocks on NVML; ``run_uuids`` marks the GPUs the run's ranks are on.
    """

    def __init__(self, interval: float = 1.0, root_pid: int | None = None):
        self.interval = interval
        self.root_pid = root_pid or os.getpid()
        self.run_uuids: set[str] = set()
        self._latest: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return self._latest

    def sample_now(self, nvml: Nvml) -> dict[str, Any]:
        gpus = [nvml.sample(i) for i in range(nvml.count)] if nvml.ok else []
        for g in gpus:
            g["in_run"] = g["uuid"] in self.run_uuids
        return {
            "t": round(time.time(), 3),
            "host": socket.gethostname(),  # where the pids of ``procs`` live (rank_start says each rank's host)
            "gpus": gpus,
            "gpu_error": nvml.error,
            "system": system_sample(),
            "run_rss": tree_rss(self.root_pid),
        }

    def _loop(self) -> None:
        nvml = Nvml()
        try:
            while not self._stop.is_set():
                sample = self.sample_now(nvml)
                with self._lock:
                    self._latest = sample
                self._stop.wait(self.interval)
        finally:
            nvml.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
