"""The figures of one OOM recovery, from a run's events: one definition for every bench script.

    from recovery import NoRecovery, recovery_figures, recovery_line

(the scripts put scripts/ on sys.path, as bench_lora does for bench_causal). Recovery is the time
from the first `oom` event to the first `step` of the attempt after it (the goal of the open
issues: <= 20 s on a GPU, eager and compiled, one and two GPUs), broken down so that it can be
attributed:

- teardown_s: oom -> the OOM attempt's `attempt_end` (emergency checkpoint, ranks leaving);
- oom_to_attempt_start_s: oom -> the next `attempt_start` (teardown plus the supervisor's decision);
- oom_to_rank_start_s: oom -> the next attempt's last `rank_start` (every rank up: Python started,
  torch/transformers imported, the rendezvous met). This is what the ranks started ahead
  (`trainer/standby.py`) save: with them it is the rendezvous alone;
- warm: the next `attempt_start`'s `warm` (its ranks were started ahead), None where the events
  predate the field;
- oom_after_rank_start_s: the OOM attempt's first `rank_start` -> the oom. The supervisor starts the
  standby ranks at that `rank_start` and they need some seconds of imports: an OOM sooner than that
  waits for the rest of their imports (still `warm`), so read a warm figure next to this one;
- timeline: the next attempt's attempt_start / rank_start / phase / data / model / first step, in
  seconds after the oom.
"""

from __future__ import annotations

from typing import Any

Events = list[dict[str, Any]]
GOAL_S = 20.0  # the open issues' goal for oom -> the next attempt's first step, on a GPU


class NoRecovery(ValueError):
    """The events hold no `oom`: nothing to measure."""


def recovery_figures(evs: Events, goal_s: float = GOAL_S) -> dict[str, Any]:
    """From the first `oom` to the next attempt's first step. Raises NoRecovery without an `oom`;
    a figure whose event never came (no restart, no step after it) is None, and ``missing`` names
    those events."""
    ooms = [e for e in evs if e.get("kind") == "oom"]
    if not ooms:
        raise NoRecovery("no oom event")
    oom = ooms[0]
    attempt = oom.get("attempt", 1)
    nxt = attempt + 1
    t0 = oom["t"]

    def first(kind: str, att: int) -> dict[str, Any] | None:
        return next((e for e in evs if e.get("kind") == kind and e.get("attempt", 1) == att), None)

    def rel(e: dict[str, Any] | None) -> float | None:
        return None if e is None else round(e["t"] - t0, 2)

    start, end, step = first("attempt_start", nxt), first("attempt_end", attempt), first("step", nxt)
    ranks_up = [e for e in evs if e.get("kind") == "rank_start" and e.get("attempt", 1) == nxt]
    ranks_then = [e for e in evs if e.get("kind") == "rank_start" and e.get("attempt", 1) == attempt]
    saved = [e for e in evs if e.get("kind") == "checkpoint" and e.get("reason") == "oom"]
    resume = (start or {}).get("resume_step")
    recovery_s = rel(step)
    until = step["t"] if step else float("inf")
    timeline = [{"s": rel(e), "kind": e["kind"], **{k: e[k] for k in ("rank", "phase", "progress") if k in e}}
                for e in evs if e.get("attempt") == nxt and e["t"] <= until
                and e["kind"] in ("attempt_start", "rank_start", "phase", "data", "model", "step")]
    missing = [kind for kind, e in (("attempt_end", end), ("attempt_start", start), ("rank_start", ranks_up or None),
                                    ("step", step)) if e is None]
    return {"oom_attempt": attempt, "oom_step": oom.get("step"), "oom_rank": oom.get("rank"),
            "injected": oom.get("injected"), "where": oom.get("where"),
            "emergency_checkpoint": oom.get("emergency_checkpoint"),
            "batch_from": oom.get("batch_size"), "batch_to": (start or {}).get("batch_size"), "resume_step": resume,
            "steps_lost": oom["step"] - 1 - (resume or 0) if start and oom.get("step") is not None else None,
            "emergency_checkpoint_s": saved[0].get("seconds") if saved else None,
            "teardown_s": rel(end), "attempt_end_outcome": (end or {}).get("outcome"),
            "warm": (start or {}).get("warm"),
            "oom_after_rank_start_s": round(t0 - ranks_then[0]["t"], 2) if ranks_then else None,
            "oom_to_attempt_start_s": rel(start),
            "oom_to_rank_start_s": rel(max(ranks_up, key=lambda e: e["t"])) if ranks_up else None,
            "recovery_s": recovery_s, "recovery_goal_met": recovery_s is not None and recovery_s <= goal_s,
            "first_step_after": step["step"] if step else None, "missing": missing, "timeline": timeline}


def recovery_line(fig: dict[str, Any]) -> str:
    """One line for a summary: recovery, its parts, warm or cold, and the standby's head start."""
    if "recovery_s" not in fig:
        return str(fig.get("failed") or fig.get("recovery") or "no recovery figures")
    w = fig.get("warm")
    warm = "warm" if w is True else "cold" if w is False else "warm n/a"
    return (f"{fig['recovery_s']} s oom->step ({warm}; ranks up {fig.get('oom_to_rank_start_s')} s, "
            f"attempt_start {fig.get('oom_to_attempt_start_s')} s, teardown {fig.get('teardown_s')} s; "
            f"oom {fig.get('oom_after_rank_start_s')} s after rank_start); {fig.get('steps_lost')} steps lost")
