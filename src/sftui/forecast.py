"""Peak memory per batch size: ``fixed + per_sample × batch``, fitted from measured points.

What decides an out-of-memory is the memory the caching allocator *reserves* (plus what other
processes hold), so the points are peak reserved bytes per GPU at the worst-case sequence
length: the probe's (``sftui probe``, ``--batch auto``) and the run's own ``rank_stats``
(RunState.rung_peaks). A prediction comes with an upper bound; a rung "fits" when its upper
bound stays under ``target × budget``, the budget being the smallest free memory among the
run's GPUs (capped by ``--mem-fraction``).

Pure Python: the supervisor, the TUI and ``status`` use it without torch or numpy.
``RUN_DIR/forecast.json`` (written after ``--batch auto``'s probe) is read here too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

DEFAULT_TARGET = 0.85
# Relative uncertainty of a prediction inside the measured range: the allocator rounds and
# caches, so even a perfect line misses a reserved peak by a little.
REL_FLOOR = 0.03
# One measured point plus a model-state estimate for ``fixed``: a rough slope.
REL_ONE_POINT = 0.20
# Prediction interval of a fit over 3+ points: this many residual standard errors.
K_SIGMA = 2.0
FORECAST_FILE = "forecast.json"


@dataclass(frozen=True)
class Point:
    """One measurement: the peak reserved bytes per GPU at a per-GPU batch size, or None when
    that batch ran out of memory."""

    batch: int
    peak: int | None
    samples_per_s: float | None = None

    @property
    def oom(self) -> bool:
        return self.peak is None


@dataclass(frozen=True)
class Forecast:
    """``fixed + per_sample × batch`` and how far to trust it."""

    fixed: float
    per_sample: float
    rel: float                 # relative uncertainty inside the measured range
    n: int                     # points fitted
    max_batch: int             # largest batch measured; beyond it the band widens
    oom_batch: int | None = None  # smallest batch that ran out of memory: it and larger never fit
    sigma: float = 0.0         # residual standard error (3+ points), bytes
    mean_batch: float = 0.0
    sxx: float = 0.0           # sum of squared batch deviations (3+ points)

    def predict(self, batch: int) -> float:
        return self.fixed + self.per_sample * batch

    def band(self, batch: int) -> float:
        """Half-width of the prediction's band, in bytes: relative, stretched by how far past
        the largest measured batch it extrapolates, or the fit's prediction interval."""
        stretch = max(1.0, batch / self.max_batch)
        band = self.rel * stretch * self.predict(batch)
        if self.n >= 3 and self.sxx > 0:
            se = self.sigma * math.sqrt(1 + 1 / self.n + (batch - self.mean_batch) ** 2 / self.sxx)
            band = max(band, K_SIGMA * se)
        return band

    def upper(self, batch: int) -> float:
        return self.predict(batch) + self.band(batch)

    def fits(self, batch: int, budget: float, target: float = DEFAULT_TARGET) -> bool:
        if self.oom_batch is not None and batch >= self.oom_batch:
            return False
        return self.upper(batch) <= target * budget


def merge(points: Iterable[Point]) -> list[Point]:
    """One point per batch: the highest peak seen (any OOM at a batch wins), sorted by batch."""
    best: dict[int, Point] = {}
    for p in points:
        old = best.get(p.batch)
        if old is None or p.oom or (not old.oom and p.peak > old.peak):  # type: ignore[operator]
            speed = p.samples_per_s if p.samples_per_s is not None else (old.samples_per_s if old else None)
            best[p.batch] = Point(p.batch, p.peak, speed)
    return [best[b] for b in sorted(best)]


def fit(points: Iterable[Point], fixed_hint: float | None = None) -> Forecast | None:
    """Least squares over the points that fitted; None when they do not pin a line down.

    With a single point, ``fixed_hint`` (the model's weights, gradients and optimizer state:
    a lower bound of ``fixed``) stands in for the intercept, with a wide band. A line whose
    slope is not positive is no forecast (the points disagree, e.g. shorter rows at the
    larger batch)."""
    merged = merge(points)
    ooms = [p.batch for p in merged if p.oom]
    oom_batch = min(ooms) if ooms else None
    ok = [p for p in merged if not p.oom and (oom_batch is None or p.batch < oom_batch)]
    if not ok:
        return None
    xs = [float(p.batch) for p in ok]
    ys = [float(p.peak) for p in ok]  # type: ignore[arg-type]
    n = len(ok)
    if n == 1:
        if fixed_hint is None or fixed_hint >= ys[0]:
            return None
        slope = (ys[0] - fixed_hint) / xs[0]
        return Forecast(fixed_hint, slope, REL_ONE_POINT, 1, ok[0].batch, oom_batch)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if slope <= 0:
        return None
    fixed = my - slope * mx
    residuals = [y - (fixed + slope * x) for x, y in zip(xs, ys)]
    rel = max([REL_FLOOR] + [abs(r) / y for r, y in zip(residuals, ys)])
    sigma = math.sqrt(sum(r * r for r in residuals) / (n - 2)) if n >= 3 else 0.0
    return Forecast(fixed, slope, rel, n, int(max(xs)), oom_batch, sigma, mx, sxx if n >= 3 else 0.0)


def recommend(ladder: Iterable[int], forecast: Forecast | None, budget: float,
              target: float = DEFAULT_TARGET) -> int | None:
    """The largest rung whose upper prediction fits ``target × budget``; None if none does."""
    if forecast is None:
        return None
    fitting = [b for b in ladder if forecast.fits(b, budget, target)]
    return max(fitting) if fitting else None


def rungs_above(ladder: Iterable[int], cap: int) -> list[int]:
    """Candidate batches past the ladder's top, up to ``cap`` (the data's rows: a batch larger
    than the data is no batch): steps of about an eighth, multiples of 8. The probe searches
    them too, so that a ladder that stops short (16,12,8 on a card where 300 fits) is not the
    limit of what it reports."""
    b = max(ladder)
    out = []
    while True:
        b = -(-(b + max(8, b // 8)) // 8) * 8
        if b > cap:
            return out
        out.append(b)


def next_trial(ladder: list[int], points: list[Point], budget: float, target: float = DEFAULT_TARGET,
               fixed_hint: float | None = None) -> int | None:
    """The probe's next batch to measure, or None when it is done: the smallest rung first,
    then the rung the forecast so far recommends, until that rung has been measured (each
    measurement near the recommendation narrows the band, which may lift it a rung)."""
    measured = {p.batch for p in points}
    if not points:
        return min(ladder)
    rec = recommend(ladder, fit(points, fixed_hint), budget, target)
    if rec is None or rec in measured:
        return None
    return rec


# --- RUN_DIR/forecast.json ----------------------------------------------------------------------


def points_from_json(items: Iterable[dict[str, Any]]) -> list[Point]:
    out = []
    for item in items:
        try:
            batch = int(item["batch"])
            peak = item.get("peak_reserved")
            out.append(Point(batch, None if peak is None else int(peak), item.get("samples_per_s")))
        except (KeyError, TypeError, ValueError):
            continue  # a point that does not parse is no evidence
    return out


def points_to_json(points: Iterable[Point]) -> list[dict[str, Any]]:
    return [{"batch": p.batch, "peak_reserved": p.peak, "samples_per_s": p.samples_per_s} for p in points]


def read_probe(run_dir: Path) -> dict[str, Any] | None:
    """RUN_DIR/forecast.json, or None when absent or unreadable."""
    try:
        data = json.loads((Path(run_dir) / FORECAST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class RunForecast:
    """What the TUI shows for a run: the fit, the budget it is held against, the target."""

    forecast: Forecast | None
    budget: float | None
    target: float

    def peak(self, batch: int) -> float | None:
        return None if self.forecast is None else self.forecast.predict(batch)

    def fits(self, batch: int) -> bool | None:
        """True/False by the forecast, None when there is no forecast or no budget."""
        if self.forecast is None or self.budget is None:
            return None
        return self.forecast.fits(batch, self.budget, self.target)


def for_run(probe: dict[str, Any] | None, rung_peaks: dict[int, int], oom_rungs: Iterable[int],
            gpu_budget: float | None) -> RunForecast:
    """Refit from the probe's points (forecast.json) and the run's measured rung peaks; the run's
    OOM rungs count as points that did not fit. The budget is the probe's when there was one
    (free memory at the start, before this run took any), else ``gpu_budget`` (the run GPUs'
    smallest total memory, as the caller knows it)."""
    probe = probe or {}
    points = points_from_json(probe.get("points") or [])
    points += [Point(int(b), int(p)) for b, p in rung_peaks.items()]
    points += [Point(int(b), None) for b in oom_rungs]
    hint = probe.get("model_state_bytes")
    forecast = fit(points, hint if isinstance(hint, (int, float)) else None)
    budget = probe.get("budget_bytes")
    target = probe.get("target")
    return RunForecast(forecast, budget if isinstance(budget, (int, float)) else gpu_budget,
                       target if isinstance(target, (int, float)) else DEFAULT_TARGET)
