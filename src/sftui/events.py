"""Event kinds, their fields, and every exit code sftui uses, in one place.

Events are JSON objects, one per line of ``events.jsonl``. Every event has ``v`` (schema version),
``t`` (unix time) and ``kind``; ``attempt`` where one applies. Writing and tailing the file lives in
``rundir.py``; this module only knows what an event is.
"""

from __future__ import annotations

import json
import time
from typing import Any

SCHEMA_VERSION = 1

# kind -> the fields it carries beyond v, t, kind, attempt (DESIGN.md "Events").
KINDS: dict[str, tuple[str, ...]] = {
    "run_start": ("config",),
    "phase": ("phase", "progress"),
    "attempt_start": ("batch_size", "grad_accum", "world_size", "effective_batch", "resume_step", "warm"),
    "rank_start": ("rank", "pid", "host", "gpu_uuid"),
    "data": ("rows", "skipped", "eval_rows", "target_samples", "chat_format", "batches"),
    "model": ("trainable_params", "total_params", "lora"),
    "step": (
        "step", "total_steps", "epoch", "epochs", "samples_seen", "loss", "lr", "grad_norm",
        "samples_per_s", "tokens_per_s", "batch_size", "grad_accum", "mfu",
    ),
    "rank_stats": ("step", "rank", "gpu_uuid", "mem_peak_bytes", "mem_reserved_bytes", "alloc_retries"),
    "checkpoint": ("step", "path", "seconds", "bytes", "reason"),
    "eval": ("step", "loss", "samples"),
    "oom": ("step", "batch_size", "rank", "gpu_uuid", "where", "message", "emergency_checkpoint", "injected"),
    "worker_exit": ("rank", "reason", "step"),
    "decision_needed": ("reason", "proposed_batch", "deadline"),
    "decision": ("by", "action", "batch_size"),
    "batch_change": ("from", "to", "by"),
    "attempt_end": ("exit_codes", "outcome", "last_step", "log_tail"),
    "log": ("level", "message"),
    "run_end": ("status", "reason", "exit_code"),
}

# --- exit codes of `sftui` itself (DESIGN.md "Command line") ---
EXIT_FINISHED = 0
EXIT_USAGE = 2          # bad usage, config or input: one line on stderr, nothing written
EXIT_FAILED = 3         # crash, hang, OOM at the bottom of the ladder, refused restart, restart limit
EXIT_STOPPED = 4        # `sftui stop`, `s` in the TUI, SIGTERM: resumable
EXIT_INTERRUPTED = 130  # SIGINT, after a checkpoint: resumable

# --- exit codes of one worker rank; the supervisor reads events first, these second ---
WORKER_OK = 0           # finished, or left at a request (switch/stop) after its checkpoint
WORKER_ERROR = 1        # an unexpected exception (traceback in attempt-N.log)
WORKER_BAD_INPUT = 2    # the worker found the inputs unusable (a bad row, a changed fingerprint)
WORKER_OOM = 75         # CUDA out of memory, after the emergency checkpoint (or none)


def make(kind: str, attempt: int | None = None, **fields: Any) -> dict[str, Any]:
    """Build an event dict with the common fields first (so lines read well by eye)."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    event: dict[str, Any] = {"v": SCHEMA_VERSION, "t": round(time.time(), 3), "kind": kind}
    if attempt is not None:
        event["attempt"] = attempt
    event.update(fields)
    return event


def encode(event: dict[str, Any]) -> bytes:
    """One event as one line of UTF-8 JSON ending in a newline."""
    return (json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()


def decode(line: bytes | str) -> dict[str, Any] | None:
    """Parse one line; None for anything that is not a complete event (torn or foreign lines)."""
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
        return None
    return event
