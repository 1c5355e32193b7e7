"""forecast.py: the fit, its band, the recommendation and the probe's choice of trials, on
recorded points (no GPU needed)."""

from __future__ import annotations

import json
import random

import pytest

from sftui.forecast import (
    DEFAULT_TARGET,
    REL_FLOOR,
    Point,
    fit,
    for_run,
    merge,
    next_trial,
    points_from_json,
    points_to_json,
    read_probe,
    recommend,
    rungs_above,
)

GIB = 1024**3
LADDER = [128, 96, 64, 48, 32, 24, 16, 12, 8]


def chatlm(batch: int) -> int:
    """The issue's measurement (chatlm-mini, max-len 256, one H200): 2.6 GiB + 0.5 GiB × batch."""
    return int((2.6 + 0.5 * batch) * GIB)


def test_exact_line_is_recovered_with_the_floor_band():
    fc = fit([Point(1, chatlm(1)), Point(64, chatlm(64))])
    assert fc.fixed / GIB == pytest.approx(2.6, abs=1e-6)
    assert fc.per_sample / GIB == pytest.approx(0.5, abs=1e-6)
    assert fc.predict(16) == pytest.approx(chatlm(16), rel=1e-6)
    assert fc.band(16) == pytest.approx(REL_FLOOR * chatlm(16), rel=1e-6)
    # past the largest measured batch the band widens with the extrapolation
    assert fc.band(128) == pytest.approx(REL_FLOOR * 2 * fc.predict(128), rel=1e-6)


# Peak reserved bytes recorded from noisy allocator behaviour: the line rounded up to
# 20 MiB segments plus up to ±1.5 % scatter (fixed seed).
def recorded_points() -> list[Point]:
    rng = random.Random(7)
    out = []
    for b in (1, 8, 16, 24, 32, 48, 64):
        noisy = chatlm(b) * (1 + rng.uniform(-0.015, 0.015)) + 300 * 2**20  # reserved > allocated
        out.append(Point(b, int(-(-noisy // (20 * 2**20)) * 20 * 2**20)))
    return out


def test_noisy_points_predict_within_five_percent_and_the_band_covers_them():
    pts = recorded_points()
    fc = fit(pts)
    assert fc.n == len(pts) and fc.sigma > 0
    for p in pts:
        assert abs(fc.predict(p.batch) - p.peak) / p.peak < 0.05
        assert fc.upper(p.batch) >= p.peak
    # the slope is the 0.5 GiB per sample, within the noise
    assert fc.per_sample / GIB == pytest.approx(0.5, rel=0.03)


def test_two_points_of_the_noisy_record_still_forecast_the_others():
    pts = recorded_points()
    fc = fit([pts[1], pts[-1]])  # batches 8 and 64
    for p in pts[1:]:
        assert abs(fc.predict(p.batch) - p.peak) / p.peak < 0.05


def test_one_point_needs_a_model_state_estimate():
    assert fit([Point(8, chatlm(8))]) is None
    fc = fit([Point(8, chatlm(8))], fixed_hint=2.8 * GIB)
    assert fc.n == 1 and fc.per_sample < 0.5 * GIB  # a hint above the true intercept: a lower slope
    assert fc.upper(64) > chatlm(64)  # ... but the wide band still covers the truth
    assert fit([Point(8, 2 * GIB)], fixed_hint=3 * GIB) is None  # a hint above the point: no line


def test_points_that_disagree_are_no_forecast():
    assert fit([Point(8, 20 * GIB), Point(16, 10 * GIB)]) is None
    assert fit([]) is None


def test_an_oom_caps_the_forecast_and_drops_points_at_or_above_it():
    pts = [Point(8, chatlm(8)), Point(32, chatlm(32)), Point(64, None), Point(96, chatlm(96))]
    fc = fit(pts)
    assert fc.oom_batch == 64 and fc.n == 2
    assert not fc.fits(64, 1000 * GIB) and not fc.fits(128, 1000 * GIB)
    assert fc.fits(48, 1000 * GIB)
    assert recommend(LADDER, fc, 1000 * GIB) == 48


def test_merge_keeps_the_highest_peak_and_any_oom():
    merged = merge([Point(8, 5 * GIB, 100.0), Point(8, 6 * GIB), Point(16, 9 * GIB), Point(16, None)])
    assert merged == [Point(8, 6 * GIB, 100.0), Point(16, None)]


def test_recommend_is_the_largest_rung_whose_upper_bound_fits_the_target():
    fc = fit([Point(8, chatlm(8)), Point(64, chatlm(64))])
    budget = 79 * GIB  # an H100's free memory
    rec = recommend(LADDER, fc, budget)
    assert fc.upper(rec) <= DEFAULT_TARGET * budget
    above = min(b for b in LADDER if b > rec)
    assert fc.upper(above) > DEFAULT_TARGET * budget
    assert rec == 96  # 2.6 + 48 = 50.6 GiB (+ band) fits 67 GiB; 128 (66.6 GiB + band) does not
    assert recommend(LADDER, fc, 7 * GIB) is None  # 8: 6.6 GiB + band > 0.85 × 7
    assert recommend(LADDER, None, budget) is None


def simulate_probe(truth, budget: float, ladder: list[int], hint: float | None) -> tuple[list[int], int | None]:
    """The probe's loop on a simulated GPU: measure what next_trial asks until it is done."""
    points: list[Point] = []
    while (b := next_trial(ladder, points, budget, DEFAULT_TARGET, hint)) is not None:
        assert b not in [p.batch for p in points], "a rung measured twice"
        peak = truth(b)
        points.append(Point(b, peak if peak <= budget else None))
    return [p.batch for p in points], recommend(ladder, fit(points, hint), budget)


def test_the_probe_starts_small_then_measures_the_recommendation():
    trials, rec = simulate_probe(chatlm, 79 * GIB, LADDER, hint=2.8 * GIB)
    assert trials[0] == 8
    assert rec == 96 and trials[-1] == 96  # the recommendation itself was measured
    assert len(trials) <= 4


def test_the_probe_on_a_small_card_and_when_nothing_fits():
    trials, rec = simulate_probe(chatlm, 15 * GIB, LADDER, hint=2.8 * GIB)
    assert rec == 16 and 16 in trials
    trials, rec = simulate_probe(chatlm, 5 * GIB, LADDER, hint=2.8 * GIB)
    assert trials == [8] and rec is None  # 8 fits the card (6.6 GiB > 5: OOM) -> nothing


def test_the_probe_survives_an_oom_at_a_trial():
    # a card whose real peaks grow faster than the first point suggests
    steep = lambda b: int((2.6 + 0.5 * b + 0.004 * b * b) * GIB)  # noqa: E731
    trials, rec = simulate_probe(steep, 60 * GIB, LADDER, hint=2.8 * GIB)
    assert rec is not None and steep(rec) <= 60 * GIB


def test_points_json_round_trip_and_for_run(tmp_path):
    pts = [Point(8, chatlm(8), 120.5), Point(64, chatlm(64), 410.0), Point(128, None)]
    assert points_from_json(points_to_json(pts)) == pts
    assert points_from_json([{"batch": "x"}, {"peak_reserved": 1}]) == []
    probe = {"points": points_to_json(pts), "budget_bytes": 79 * GIB, "target": 0.8, "model_state_bytes": 2.8 * GIB}
    (tmp_path / "forecast.json").write_text(json.dumps(probe))
    assert read_probe(tmp_path) == json.loads(json.dumps(probe))
    assert read_probe(tmp_path / "nowhere") is None

    rf = for_run(read_probe(tmp_path), {16: chatlm(16)}, [96], gpu_budget=None)
    assert rf.budget == 79 * GIB and rf.target == 0.8
    assert rf.forecast.n == 3 and rf.forecast.oom_batch == 96
    assert rf.fits(64) is True and rf.fits(96) is False
    assert rf.peak(32) == pytest.approx(chatlm(32), rel=0.01)


def test_for_run_without_a_probe_needs_two_measured_rungs():
    assert for_run(None, {12: chatlm(12)}, [], 80 * GIB).forecast is None
    rf = for_run(None, {12: chatlm(12), 8: chatlm(8)}, [16], 80 * GIB)
    assert rf.forecast is not None and rf.budget == 80 * GIB and rf.target == DEFAULT_TARGET
    assert rf.fits(16) is False  # ran out of memory there
    assert for_run(None, {}, [], None).fits(8) is None


def test_the_search_past_a_short_ladder_finds_the_largest_batch_that_fits():
    """The default ladder on an H200 with chatlm-mini: 16 fits with room to spare. The probe also
    searches the batches past 16 (up to the data's rows) and measures near the largest that fits."""
    beyond = rungs_above([16, 12, 8], 5000)
    assert beyond[:4] == [24, 32, 40, 48] and beyond[-1] <= 5000
    assert all(b % 8 == 0 for b in beyond) and beyond == sorted(set(beyond))
    assert all(later / earlier <= 4 / 3 for earlier, later in zip(beyond, beyond[1:]))
    budget = 139 * GIB
    trials, rec = simulate_probe(chatlm, budget, [16, 12, 8], hint=2.8 * GIB)
    assert rec == 16 and trials == [8, 16]  # the ladder alone stops at its top
    trials, largest = simulate_probe(chatlm, budget, [16, 12, 8] + beyond, hint=2.8 * GIB)
    assert largest in trials and len(trials) <= 6
    # 2.6 + 0.5 × b (+ the 3 % band) under 0.85 × 139 GiB: b ≤ about 223
    assert 200 <= largest <= 224 and chatlm(largest) * 1.03 <= DEFAULT_TARGET * budget
    assert rungs_above([16, 12, 8], 20) == []  # no batch past the data's rows
