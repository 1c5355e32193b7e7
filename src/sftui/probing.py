"""``sftui probe`` and ``--batch auto``: run the memory probe's ranks, relay their progress,
fit the forecast, and say which rung to train at.

The ranks (trainer/probe.py) run through the supervisor's launcher, one per GPU of the run, in
a process group of their own that is torn down on any failure or interruption: when this
returns or raises, nothing of the probe is running and nothing of it is on a GPU. No torch here.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sftui import events as ev
from sftui import forecast
from sftui.config import ConfigError, RunConfig, ladder_below
from sftui.launch import start_attempt
from sftui.rundir import RunDir, read_json, write_json_atomic
from sftui.units import fmt_gib

TRIAL_STEPS = 3          # optimizer steps per trial: one to warm up, two timed
TRIAL_SECONDS = 30.0     # no new trial starts after this long of trials
TICK_S = 0.1
AFTER_OOM_EXIT_S = 2.0   # a rank left after an OOM: the others wait in a collective, end them


class ProbeFailed(Exception):
    """The probe did not finish (a crash or a hang); the message says where its log is."""


def require_gpu(cfg: RunConfig, what: str) -> None:
    """Exit-2 territory before anything is written: the probe measures GPU memory."""
    if cfg.cpu:
        raise ConfigError(f"{what}: measures GPU memory, not with --cpu")
    from sftui.telemetry import visible_gpus

    visible, why = visible_gpus()
    if not visible:
        raise ConfigError(f"{what}: {why} (it measures GPU memory)")


@dataclass
class ProbeResult:
    """What the probe measured and what follows from it."""

    ladder: list[int]
    target: float
    world_size: int
    gpus: list[dict[str, Any]]
    budget: int
    model_state: int | None
    points: list[forecast.Point]
    seconds: float
    beyond: list[int] = field(default_factory=list)  # the batches past the ladder's top it searched
    fit: forecast.Forecast | None = field(init=False)
    recommended: int | None = field(init=False)      # the largest rung of the ladder that fits
    largest: int | None = field(init=False)          # the largest batch that fits, ladder or beyond

    def __post_init__(self) -> None:
        self.fit = forecast.fit(self.points, self.model_state)
        self.recommended = forecast.recommend(self.ladder, self.fit, self.budget, self.target)
        self.largest = forecast.recommend(self.ladder + self.beyond, self.fit, self.budget, self.target)

    def rows(self) -> list[dict[str, Any]]:
        """One row per rung, per batch measured, and for the largest batch that fits:
        forecast, band, fits, what was measured there."""
        measured = {p.batch: p for p in forecast.merge(self.points)}
        shown = set(self.ladder) | set(measured) | ({self.largest} - {None})
        out = []
        for b in sorted(shown, reverse=True):
            m = measured.get(b)
            out.append({
                "batch": b,
                "predicted": None if self.fit is None else round(self.fit.predict(b)),
                "band": None if self.fit is None else round(self.fit.band(b)),
                "fits": False if self.fit is None else self.fit.fits(b, self.budget, self.target),
                "measured": None if m is None else m.peak,
                "oom": m is not None and m.oom,
                "samples_per_s": None if m is None else m.samples_per_s,
            })
        return out

    def to_json(self, cfg: RunConfig) -> dict[str, Any]:
        """RUN_DIR/forecast.json (docs/DESIGN.md "As built")."""
        fit = None if self.fit is None else {"fixed": round(self.fit.fixed), "per_sample": round(self.fit.per_sample),
                                             "rel": round(self.fit.rel, 4), "n": self.fit.n}
        return {
            "v": 1, "t": round(time.time(), 3), "model": cfg.model, "data": cfg.data, "max_len": cfg.max_len,
            "mem_fraction": cfg.mem_fraction, "world_size": self.world_size, "target": self.target,
            "gpus": self.gpus, "budget_bytes": self.budget, "model_state_bytes": self.model_state,
            "points": forecast.points_to_json(self.points), "fit": fit, "ladder": self.ladder,
            "recommended": self.recommended, "largest_fitting": self.largest, "rows": self.rows(),
            "seconds": round(self.seconds, 2),
        }

    def auto_start(self) -> tuple[int, list[int]] | None:
        """``--batch auto``'s first batch and ladder: the largest batch that fits, with the
        ladder built below it where that lies past the given ladder's top; None if none fits."""
        if self.largest is None:
            return None
        if self.largest > max(self.ladder):
            return self.largest, ladder_below(self.largest, self.ladder)
        return self.largest, list(self.ladder)


def run_probe(cfg: RunConfig, fingerprint: str, rows: int, target: float, work_dir: Path | None = None,
              say: Callable[[str], None] | None = None) -> ProbeResult:
    """Probe on the run's GPUs (``cfg.gpus``, resolved) at its world size, over the ladder and
    the batches past its top up to ``rows`` (the data's). ``work_dir`` keeps the tokenizer and
    the tokenized data for the run that follows (its run directory); without one they go with
    the probe's temporary directory."""
    say = say or (lambda line: print(f"sftui: {line}", file=sys.stderr, flush=True))
    started = time.monotonic()
    beyond = forecast.rungs_above(cfg.ladder, rows)
    tmp = Path(tempfile.mkdtemp(prefix="sftui-probe-"))
    try:
        write_json_atomic(tmp / "spec.json", {
            "config": cfg.to_dict(), "data_fingerprint": fingerprint, "work_dir": str(work_dir or tmp),
            "ladder": cfg.ladder + beyond, "target": target, "steps": TRIAL_STEPS, "max_seconds": TRIAL_SECONDS,
        })
        codes = _run_ranks(RunDir(tmp), cfg, say)
        return _collect(tmp, cfg, target, codes, time.monotonic() - started, beyond)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_ranks(run: RunDir, cfg: RunConfig, say: Callable[[str], None]) -> list[int | None]:
    """Start the ranks, relay rank 0's ``probe:`` lines, and end them all, whatever happens."""
    attempt = start_attempt(run, 0, cfg.world_size, cfg.gpus, module="sftui.trainer.probe")
    log = run.attempt_log(0)
    offset = 0
    last_output = time.monotonic()
    first_exit: float | None = None
    try:
        while attempt.running():
            offset, new = _relay(log, offset, say)
            now = time.monotonic()
            last_output = now if new else last_output
            codes = attempt.poll()
            if any(c is not None for c in codes):
                first_exit = first_exit or now
            if first_exit and now - first_exit > AFTER_OOM_EXIT_S:
                break  # one rank left (an OOM, a crash): the rest wait in a collective for ever
            if now - last_output > cfg.hang_timeout:
                raise ProbeFailed(f"no progress for {cfg.hang_timeout:g} s; the probe's log: " + _tail(log))
            time.sleep(TICK_S)
    finally:
        attempt.terminate()
        attempt.wait_logs()
    _relay(log, offset, say)
    return attempt.poll()


def _relay(log: Path, offset: int, say: Callable[[str], None]) -> tuple[int, bool]:
    """Pass on rank 0's progress lines written since ``offset``; (new offset, any new output)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return offset, False
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].decode(errors="replace").splitlines():
        if line.startswith("[rank 0] probe: "):
            say(line[len("[rank 0] "):])
    return offset + end, end > 0


def _tail(log: Path, n: int = 12) -> str:
    from sftui.rundir import tail_lines

    return " | ".join(line.rstrip() for line in tail_lines(log, n))


def _collect(tmp: Path, cfg: RunConfig, target: float, codes: list[int | None], seconds: float,
             beyond: list[int]) -> ProbeResult:
    """The result from the ranks' files and exit codes; a rank's OOM is a point that did not fit."""
    log = RunDir(tmp).attempt_log(0)
    if ev.WORKER_BAD_INPUT in codes:
        lines = [line for line in _tail(log, 40).split(" | ") if "probe: error: " in line]
        raise ConfigError("probe: " + (lines[-1].split("probe: error: ", 1)[1] if lines else "bad input; " + _tail(log)))
    try:
        result = read_json(tmp / "result.json")
    except (OSError, ValueError):
        raise ProbeFailed(f"the probe ended before measuring anything (exit codes {codes}): {_tail(log)}") from None
    points = forecast.points_from_json(result.get("points") or [])
    for oom_file in tmp.glob("oom-rank-*.json"):
        points.append(forecast.Point(int(read_json(oom_file)["batch"]), None))
    crashed = [c for c in codes if c not in (ev.WORKER_OK, ev.WORKER_OOM, None, -15, -9)]
    if crashed or (not result.get("done") and not any(p.oom for p in points)):
        raise ProbeFailed(f"the probe failed (exit codes {codes}): {_tail(log)}")
    return ProbeResult(list(cfg.ladder), target, cfg.world_size, result["gpus"], int(result["budget_bytes"]),
                       result.get("model_state_bytes"), points, seconds, beyond)


def write_forecast(run_dir: Path, result: ProbeResult, cfg: RunConfig) -> None:
    write_json_atomic(Path(run_dir) / forecast.FORECAST_FILE, result.to_json(cfg))


# --- the table ----------------------------------------------------------------------------------


def table(result: ProbeResult) -> str:
    """What ``sftui probe`` prints: the cards and the budget, the fit, a row per rung."""
    lines = []
    for g in result.gpus:
        lines.append(f"GPU rank {g['rank']}: {g['name']}  {fmt_gib(g['total'])} GiB total, {fmt_gib(g['free'])} GiB free"
                     + (f", {fmt_gib(g['budget'])} GiB under --mem-fraction" if g["budget"] < g["free"] else ""))
    limit = result.target * result.budget
    lines.append(f"budget: {result.target:g} × {fmt_gib(result.budget)} GiB = {fmt_gib(limit)} GiB per GPU "
                 f"(world size {result.world_size}); probed in {result.seconds:.0f} s")
    fc = result.fit
    if fc is not None:
        lines.append(f"fit: peak reserved ≈ {fmt_gib(fc.fixed, 2)} GiB + {fmt_gib(fc.per_sample, 3)} GiB × batch "
                     f"({fc.n} point{'s' if fc.n != 1 else ''}, ±{fc.rel * 100:.0f}%)")
    lines.append("")
    lines.append(f"{'rung':>5}  {'predicted peak':>17}  {'fits':>4}  {'measured':>10}  {'samples/s':>9}")
    for row in result.rows():
        pred = "?" if row["predicted"] is None else f"{fmt_gib(row['predicted'])} ±{fmt_gib(row['band'])} GiB"
        measured = "OOM" if row["oom"] else (f"{fmt_gib(row['measured'])} GiB" if row["measured"] is not None else "")
        speed = "" if row["samples_per_s"] is None else f"{row['samples_per_s']:.1f}"
        mark = "  ← recommended" if row["batch"] == result.recommended else ""
        lines.append(f"{row['batch']:>5}  {pred:>17}  {'yes' if row['fits'] else 'no':>4}  {measured:>10}  {speed:>9}{mark}")
    lines.append("")
    if result.recommended is None:
        lines.append(f"no rung fits under {result.target:g} × the free memory; lower --max-len, add "
                     "--gradient-checkpointing, or add smaller rungs to --ladder")
    else:
        lines.append(f"recommended: --batch {result.recommended}")
        if result.largest is not None and result.largest > result.recommended:
            lines.append(f"the ladder stops short: batch {result.largest} fits too; --batch auto starts there "
                         f"(ladder {','.join(map(str, ladder_below(result.largest, result.ladder)))})")
    return "\n".join(lines)
