"""GPU memory as the run's readers judge it: who holds each GPU (this attempt's ranks, ranks
left from an earlier attempt, foreign processes), a rank's allocated and reserved peaks, and
when a GPU is under memory pressure (allocator retries, or a thin margin to the card).
RunState keeps these; the TUI, the headless log and the supervisor's OOM note read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftui.units import fmt_gib

PRESSURE_STEPS = 100  # allocator retries count over this many steps
PRESSURE_MARGIN = 0.05  # a GPU with less of its memory left than this at the reserved peak is under pressure


def peak_text(alloc: int | None, reserved: int | None) -> str | None:
    """A rank's peaks: ``alloc 21.2 / res 21.9 GiB`` where the two differ as shown, else
    ``peak 21.9 GiB`` (what the caching allocator keeps beyond the tensors is then nothing to
    speak of)."""
    if reserved is None:
        return None if alloc is None else f"alloc {fmt_gib(alloc)} GiB"
    if alloc is None or fmt_gib(alloc) == fmt_gib(reserved):
        return f"peak {fmt_gib(reserved)} GiB"
    return f"alloc {fmt_gib(alloc)} / res {fmt_gib(reserved)} GiB"


@dataclass(frozen=True)
class Holder:
    """A process holding memory on a GPU (telemetry's ``procs``), and whose it is: ``rank`` (a
    rank of the current attempt), ``leftover`` (a rank of an earlier attempt of this run, still
    there) or ``foreign`` (anything else)."""

    pid: int
    user: str | None
    command: str | None
    mem: int | None
    role: str
    rank: int | None = None
    attempt: int | None = None

    @property
    def outsider(self) -> bool:
        """Memory the current attempt cannot have."""
        return self.role != "rank"

    def text(self) -> str:
        """``40.2 GiB held by pid 1234, user bob, python train.py``; a leftover says whose it was."""
        held = f"{fmt_gib(self.mem)} GiB held" if self.mem is not None else "memory held"
        who = f" (rank {self.rank} of attempt {self.attempt}, left over)" if self.role == "leftover" else ""
        return f"{held} by pid {self.pid}{who}, user {self.user or 'n/a'}, {self.command or 'command n/a'}"


class RankPids:
    """Which pid was which rank of which attempt, on which host, from the ranks' ``rank_start``
    events: what tells a GPU's processes (telemetry) apart into this attempt's ranks, ranks left
    from an earlier attempt, and foreign processes. The supervisor keeps one, every reader too."""

    def __init__(self) -> None:
        self._by_pid: dict[int, tuple[int | None, int | None, str | None]] = {}

    def see(self, e: dict[str, Any]) -> None:
        if e.get("kind") == "rank_start" and isinstance(e.get("pid"), int):
            self._by_pid[e["pid"]] = (e.get("attempt"), e.get("rank"), e.get("host"))

    def holders(self, gpu: dict[str, Any], host: str | None, attempt: int | None) -> list[Holder]:
        """The GPU's processes, biggest first. A pid matches a rank only on the rank's host (the
        other machines of a multi-node run have pids of their own); a sample or an event without
        a host matches any."""
        out = []
        for p in gpu.get("procs") or []:
            pid = p.get("pid")
            if not isinstance(pid, int):
                continue
            known = self._by_pid.get(pid)
            role, rank, of = "foreign", None, None
            if known is not None and (host is None or known[2] is None or known[2] == host):
                of, rank = known[0], known[1]
                role = "rank" if of == attempt else "leftover"
            out.append(Holder(pid, p.get("user"), p.get("command"), p.get("mem"), role, rank, of))
        return out

    def outsider_line(self, gpu: dict[str, Any] | None, host: str | None, attempt: int | None) -> str | None:
        """``GPU 0: 40.2 GiB held by pid 1234, user bob, python train.py``: the biggest holder
        of the GPU that is not a rank of the current attempt, or None. The OOM prompt and the
        supervisor's note after an ``oom`` event say it."""
        if gpu is None:
            return None
        outsiders = [h for h in self.holders(gpu, host, attempt) if h.outsider]
        if not outsiders:
            return None
        biggest = max(outsiders, key=lambda h: h.mem or 0)
        return f"GPU {gpu.get('index')}: {biggest.text()}"

    def copy(self) -> "RankPids":
        other = RankPids()
        other._by_pid = dict(self._by_pid)
        return other


@dataclass
class RankMemory:
    """What a rank of the current attempt said of its GPU memory (``rank_stats``)."""

    gpu_uuid: str | None = None
    alloc_peak: int | None = None
    reserved_peak: int | None = None
    retries: list[tuple[int, int]] = field(default_factory=list)  # (step, retries since the report before)


@dataclass(frozen=True)
class Pressure:
    """A GPU under memory pressure: the allocator retried (``retries`` within the last
    PRESSURE_STEPS steps), or the reserved peak leaves less than PRESSURE_MARGIN of the card
    (``room``: what the run may use there, the card less what outsiders hold, under
    --mem-fraction)."""

    gpu: str  # "GPU 0"
    uuid: str
    retries: int
    reserved: int | None
    room: int | None
    total: int | None
    outsiders: int

    @property
    def margin(self) -> float | None:
        """What is left at the reserved peak, as a share of the card."""
        if self.reserved is None or not self.room or not self.total:
            return None
        return (self.room - self.reserved) / self.total

    @property
    def tight(self) -> bool:
        return self.margin is not None and self.margin < PRESSURE_MARGIN

    def text(self, remedy: str) -> str:
        """``GPU 0 under memory pressure: 12 allocator retries in the last 100 steps; `-` drops a rung``."""
        why = []
        if self.retries:
            why.append(f"{self.retries} allocator {'retry' if self.retries == 1 else 'retries'} "
                       f"in the last {PRESSURE_STEPS} steps")
        if self.tight and self.margin is not None:
            of = f"{fmt_gib(self.room)} GiB" + (" that other processes leave" if self.outsiders else "")
            why.append(f"reserved peak {fmt_gib(self.reserved)} of {of} ({max(0.0, self.margin) * 100:.1f}% left)")
        return f"{self.gpu} under memory pressure: {', '.join(why)}; {remedy}"
