"""The memory probe on a GPU: its time, its accuracy per rung, and runs at what it recommends.

    PYTHONPATH=src python3 scripts/bench_probe.py --out OUT_DIR [--gpu 0] [--budget-s 540]

On one GPU, with chatlm-mini at --max-len 256 on generated rows that are all longer than 256
tokens on both sides (every batch is the worst case), and the ladder LADDER below:

1. `sftui probe --json`, timed (wall clock, the command line's start included): done when <= 60 s.
2. `sftui run --headless --batch B --max-steps 200` at the recommended rung B with --on-oom stop:
   must finish without an out-of-memory; its measured peak against the forecast.
3. `sftui run --headless --batch auto --mem-fraction F --max-steps 200`, F chosen from step 1's
   forecast so that the recommendation drops one rung: the run's own probe (which honours
   --mem-fraction) must pick the rung below B, emit batch_change by probe, and finish without OOM.
4. For every rung up to the recommendation, from B down while time is left: a few real training
   steps (`sftui run --headless --max-steps 3`) and their peak reserved memory (rank_stats),
   against the forecast: done when every error is within ±5 %.

Writes OUT/bench_probe.json (after every stage), OUT/bench_probe.txt (the report) and
OUT/bench_probe.md (a section for docs/BENCHMARKS.md), plus each command's log. Nothing here
imports textual or torch: everything goes through the real command line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sftui import forecast  # noqa: E402
from sftui.probing import ProbeResult, table  # noqa: E402
from sftui.rundir import read_all  # noqa: E402

GIB = 1024**3
LADDER = "256,192,160,128,96,64,48,32,16,8"
ROWS = 2048
BASE = ["--model", "chatlm-mini", "--max-len", "256", "--seed", "42"]
COMMON = [*BASE, "--ladder", LADDER]
RUN_FLAGS = ["--checkpoint-every", "0", "--keep-checkpoints", "1", "--on-oom", "stop", "--log-every", "1"]
ALPHABET = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么"
            "心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样")
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", flush=True)


def write_data(path: Path) -> None:
    """Rows whose prompt and response both pass 256 characters (= tokens: a character tokenizer)."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(ROWS):
            prompt = "".join(rng.choice(ALPHABET) for _ in range(300))
            response = "".join(rng.choice(ALPHABET) for _ in range(300))
            f.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")


def sftui(args: list[str], log: Path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "sftui", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    say("$ " + shlex.join(["sftui", *args]))
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        r = subprocess.CompletedProcess(cmd, 124, e.stdout or "", (e.stderr or "") + f"\ntimed out after {timeout} s")
        r.stdout = r.stdout.decode() if isinstance(r.stdout, bytes) else r.stdout
        r.stderr = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    seconds = time.monotonic() - t0
    log.write_text(f"$ {shlex.join(['sftui', *args])}\nexit {r.returncode} after {seconds:.1f} s\n"
                   f"--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r, seconds


def run_peaks(run_dir: Path) -> dict:
    """What a run's events say: peak reserved/allocated (max over rank_stats), OOMs, the
    probe's batch_change, how the run ended."""
    evs = read_all(run_dir / "events.jsonl")
    stats = [e for e in evs if e.get("kind") == "rank_stats"]
    end = [e for e in evs if e.get("kind") == "run_end"]
    return {
        "peak_reserved": max((e.get("mem_reserved_bytes") or 0 for e in stats), default=None),
        "peak_allocated": max((e.get("mem_peak_bytes") or 0 for e in stats), default=None),
        "ooms": [e for e in evs if e.get("kind") == "oom"],
        "batch_changes": [{k: e.get(k) for k in ("from", "to", "by")} for e in evs if e.get("kind") == "batch_change"],
        "steps": max((e.get("step", 0) for e in evs if e.get("kind") == "step"), default=0),
        "end": end[-1] if end else None,
        "samples_per_s": next((e.get("samples_per_s") for e in reversed(evs) if e.get("kind") == "step"), None),
    }


def result_from_json(data: dict) -> ProbeResult:
    return ProbeResult(data["ladder"], data["target"], data["world_size"], data["gpus"], data["budget_bytes"],
                       data["model_state_bytes"], forecast.points_from_json(data["points"]), data["seconds"])


def lower_fraction(res: ProbeResult) -> tuple[float, int] | None:
    """A --mem-fraction whose budget lies halfway between what the rung below the
    recommendation needs and what the recommendation needs; (fraction, the rung below)."""
    ladder = sorted(res.ladder, reverse=True)
    i = ladder.index(res.recommended)
    if i + 1 >= len(ladder):
        return None
    below = ladder[i + 1]
    need = (res.fit.upper(below) + res.fit.upper(res.recommended)) / 2 / res.target
    return round(need / res.gpus[0]["total"], 4), below


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--gpu", default="0", help="the GPU index (default: 0)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new rung checks after this")
    p.add_argument("--skip-runs", action="store_true", help="skip steps 2 and 3 (the 200-step runs)")
    p.add_argument("--rungs", default=None, help="step 4 on these rungs only (comma-separated; default: every rung "
                                                  "up to the recommendation)")
    args = p.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "long-rows.jsonl"
    write_data(data)
    gpu = ["--gpus", args.gpu, "--data", str(data)]
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": shlex.join(sys.argv),
                    "ladder": LADDER, "rows": ROWS}

    def save() -> None:
        (out / "bench_probe.json").write_text(json.dumps(report, indent=2, default=str))

    # 1. the probe, timed
    r, seconds = sftui(["probe", *COMMON, *gpu, "--json"], out / "1-probe.log", timeout=300)
    if r.returncode != 0:
        say(f"probe failed (exit {r.returncode}); see {out / '1-probe.log'}")
        report["probe"] = {"exit": r.returncode, "stderr": r.stderr[-3000:]}
        save()
        return 1
    probe = json.loads(r.stdout)
    res = result_from_json(probe)
    card = probe["gpus"][0]["name"]
    report["card"] = card
    report["probe"] = {"seconds": round(seconds, 1), "within_60_s": seconds <= 60, "json": probe}
    save()
    say(f"probe: {seconds:.1f} s on {card}; recommended batch {res.recommended}")
    print(table(res), flush=True)
    if res.recommended is None or res.fit is None:
        say("no recommendation: nothing more to check")
        return 1
    rec = res.recommended

    if args.skip_runs:
        say("steps 2 and 3 skipped (--skip-runs)")
    else:
        runs_at(rec, res, out, gpu, report, save)
    check_rungs(args, rec, res, out, gpu, report, save)
    write_reports(out, report, res)
    return 0


def runs_at(rec: int, res: ProbeResult, out: Path, gpu: list[str], report: dict, save: Any) -> None:
    """Steps 2 and 3: 200 steps at the recommendation, then under a --mem-fraction one rung lower."""
    # 2. 200 steps at the recommendation
    run_dir = out / "run-rec"
    r, seconds = sftui(["run", "--headless", "--run-dir", str(run_dir), *COMMON, *gpu, *RUN_FLAGS,
                        "--batch", str(rec), "--max-steps", "200"], out / "2-run-rec.log", timeout=420)
    peaks = run_peaks(run_dir)
    report["run_rec"] = {"batch": rec, "exit": r.returncode, "seconds": round(seconds, 1), "ooms": len(peaks["ooms"]),
                         "steps": peaks["steps"], "peak_reserved": peaks["peak_reserved"],
                         "predicted": round(res.fit.predict(rec)), "samples_per_s": peaks["samples_per_s"],
                         "held": r.returncode == 0 and not peaks["ooms"]}
    save()
    say(f"200 steps at batch {rec}: exit {r.returncode}, {len(peaks['ooms'])} OOM, peak reserved "
        f"{(peaks['peak_reserved'] or 0) / GIB:.2f} GiB (forecast {res.fit.predict(rec) / GIB:.2f})")
    shutil.rmtree(run_dir, ignore_errors=True)

    # 3. --batch auto under a --mem-fraction that moves the recommendation one rung down
    lower = lower_fraction(res)
    if lower is None:
        say("the recommendation is the bottom rung: no rung below to check")
    else:
        fraction, below = lower
        run_dir = out / "run-fraction"
        r, seconds = sftui(["run", "--headless", "--run-dir", str(run_dir), *COMMON, *gpu, *RUN_FLAGS,
                            "--batch", "auto", "--mem-fraction", str(fraction), "--max-steps", "200"],
                           out / "3-run-fraction.log", timeout=480)
        peaks = run_peaks(run_dir)
        reprobe = forecast.read_probe(run_dir) or {}
        started_at = next((c["to"] for c in peaks["batch_changes"] if c["by"] == "probe"), None)
        report["run_fraction"] = {
            "mem_fraction": fraction, "expected_batch": below, "probe_recommended": reprobe.get("recommended"),
            "started_at": started_at, "batch_changes": peaks["batch_changes"], "exit": r.returncode,
            "seconds": round(seconds, 1), "probe_seconds": reprobe.get("seconds"), "ooms": len(peaks["ooms"]),
            "steps": peaks["steps"], "peak_reserved": peaks["peak_reserved"],
            "cap_bytes": int(fraction * res.gpus[0]["total"]), "reprobe_rows": reprobe.get("rows"),
            "held": r.returncode == 0 and not peaks["ooms"] and started_at == below,
        }
        save()
        say(f"--mem-fraction {fraction}: the probe picked {started_at} (expected {below}); exit {r.returncode}, "
            f"{len(peaks['ooms'])} OOM, peak reserved {(peaks['peak_reserved'] or 0) / GIB:.2f} GiB "
            f"under a cap of {fraction * res.gpus[0]['total'] / GIB:.2f} GiB")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "final", ignore_errors=True)


def check_rungs(args: argparse.Namespace, rec: int, res: ProbeResult, out: Path, gpu: list[str], report: dict,
                save: Any) -> None:
    """Step 4: every rung up to the recommendation (or --rungs), forecast against a few real steps."""
    report["rungs"] = []
    chosen = [int(b) for b in args.rungs.split(",")] if args.rungs else [b for b in res.ladder if b <= rec]
    for b in sorted(chosen, reverse=True):
        if time.monotonic() - STARTED > args.budget_s:
            say(f"time budget spent: rungs below {b} not checked")
            break
        run_dir = out / f"rung-{b}"
        r, seconds = sftui(["run", "--headless", "--run-dir", str(run_dir), *BASE, "--ladder", str(b), *gpu, *RUN_FLAGS,
                            "--batch", str(b), "--max-steps", "3"], out / f"4-rung-{b}.log", timeout=180)
        peaks = run_peaks(run_dir)
        measured = peaks["peak_reserved"]
        pred = res.fit.predict(b)
        err = None if not measured else (pred - measured) / measured * 100
        report["rungs"].append({"batch": b, "exit": r.returncode, "measured": measured, "predicted": round(pred),
                                "upper": round(res.fit.upper(b)), "error_pct": None if err is None else round(err, 2),
                                "within_5_pct": err is not None and abs(err) <= 5, "seconds": round(seconds, 1)})
        save()
        say(f"batch {b}: measured {(measured or 0) / GIB:.2f} GiB, forecast {pred / GIB:.2f} GiB, "
            + ("no measurement" if err is None else f"error {err:+.1f} %"))
        shutil.rmtree(run_dir, ignore_errors=True)


def write_reports(out: Path, report: dict, res: ProbeResult) -> None:
    rungs = report.get("rungs", [])
    checks = {
        "probe <= 60 s": report["probe"]["within_60_s"],
        "every rung up to the recommendation within ±5 %": bool(rungs) and all(r["within_5_pct"] for r in rungs),
        "200 steps at the recommendation without OOM": report.get("run_rec", {}).get("held", False),
        "one rung lower under --mem-fraction, without OOM": report.get("run_fraction", {}).get("held", False),
    }
    report["checks"] = checks
    (out / "bench_probe.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"## Memory probe (`sftui probe`, `--batch auto`) — {report['card']}", "",
             f"Date: {report['date']}. Command: `{report['command']}` (chatlm-mini, max-len 256, rows longer than "
             f"256 tokens on both sides, ladder {LADDER}, one GPU).", "",
             f"- `sftui probe`: {report['probe']['seconds']} s (wall, command line included); recommended batch "
             f"{res.recommended}.", ""]
    lines += ["```", table(res), "```", "", "| rung | forecast GiB | measured GiB (3 steps) | error |", "|---|---|---|---|"]
    for r in rungs:
        m = "n/a" if not r["measured"] else f"{r['measured'] / GIB:.2f}"
        e = "n/a" if r["error_pct"] is None else f"{r['error_pct']:+.1f} %"
        lines.append(f"| {r['batch']} | {r['predicted'] / GIB:.2f} | {m} | {e} |")
    rr = report.get("run_rec", {})
    if rr:
        lines += ["", f"- 200 steps at batch {rr['batch']}: exit {rr['exit']}, {rr['ooms']} OOM, peak reserved "
                      f"{(rr['peak_reserved'] or 0) / GIB:.2f} GiB (forecast {rr['predicted'] / GIB:.2f}), "
                      f"{rr['samples_per_s']} samples/s, {rr['seconds']} s."]
    rf = report.get("run_fraction", {})
    if rf:
        lines += [f"- `--batch auto --mem-fraction {rf['mem_fraction']}`: the probe ({rf['probe_seconds']} s) picked "
                  f"{rf['started_at']} (expected {rf['expected_batch']}); 200 steps: exit {rf['exit']}, {rf['ooms']} OOM, "
                  f"peak reserved {(rf['peak_reserved'] or 0) / GIB:.2f} GiB under a cap of {rf['cap_bytes'] / GIB:.2f} GiB."]
    lines += ["", *(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items())]
    text = "\n".join(lines) + "\n"
    (out / "bench_probe.md").write_text(text)
    (out / "bench_probe.txt").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
