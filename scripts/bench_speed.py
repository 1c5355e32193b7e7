"""Issue 17's figures from one script: both models on one GPU, and each goal met or not.

    PYTHONPATH=src python3 scripts/bench_speed.py --out OUT_DIR [--parts qwen,t5] [--gpu 0]
    .venv/bin/python scripts/bench_speed.py --smoke --out OUT_DIR     # CPU, small shapes: the script works

Parts, each the script that measures its model (same rows, model and card for every trainer in it):

    qwen  scripts/bench_causal.py → OUT/qwen: the Qwen2.5-0.5B shape at max-len 512; the HF Trainer padded
          and padding-free (DataCollatorWithFlattening), sftui eager packed and padded and compiled at batch 16,
          the probe, and sftui eager and compiled at the probe's recommended rung
    t5    scripts/bench_throughput.py → OUT/t5: chatlm-mini at max-len 256; the HF Seq2SeqTrainer, sftui eager
          and compiled, padded and packed, at batch 16 and at the card's largest rung; with --t5-stages
          also OOM recovery (oom-eager, oom-compiled)

A GPU call of 10 minutes holds about half the qwen part: split it with --qwen-stages (bench_causal adds
each call's stages to the report in OUT/qwen, and takes the probe's rung from an earlier call's). The t5
part writes its report anew each call: give one call all of its stages, or each call its own OUT. Then
OUT/bench_speed.json and OUT/bench_speed.md hold every goal of issue 17 with the figure measured for it
(or "not run") and whether it is met, from the reports under OUT; --summary-only just judges them
(reports carried back from several calls and put under OUT/qwen and OUT/t5, say).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
QWEN_STAGES = "build,hf,hf-flat,eager,padded,compiled,probe,recommended,compiled-recommended"
T5_STAGES = "hf,speed"
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", flush=True)


def report_path(out: Path, part: str) -> Path:
    return out / part / ("bench_causal.json" if part == "qwen" else "bench_throughput.json")


def part_command(args: argparse.Namespace, part: str) -> list[str]:
    out = str(args.out / part)
    if part == "qwen":
        stages = "build,hf,hf-flat,eager,padded" if args.smoke else args.qwen_stages
        return [sys.executable, str(ROOT / "scripts/bench_causal.py"), "--out", out, "--stages", stages,
                *(["--smoke"] if args.smoke else ["--gpu", args.gpu]), *shlex.split(args.qwen_extra)]
    smoke = ["--smoke"] if args.smoke else ["--compile", "--batches", args.t5_batches, "--gpu", args.gpu]
    return [sys.executable, str(ROOT / "scripts/bench_throughput.py"), "--out", out, "--packing", "both",
            "--stages", args.t5_stages, "--budget-s", str(args.budget_s), *smoke, *shlex.split(args.t5_extra)]


def named(report: dict[str, Any], *names: str) -> list[dict[str, Any]]:
    """The runs of a bench_causal report with these names (eager-16, compiled-128, ...) that have a rate."""
    return [report[n] for n in names if isinstance(report.get(n), dict) and report[n].get("samples_per_s")]


def best(values: list[float | None]) -> float | None:
    found = [v for v in values if v]
    return max(found) if found else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return round(ours / theirs, 2) if ours and theirs else None


Goal = tuple[str, "float | None", str, float]  # what, the figure measured (None: not run), "≥" or "≤", the bound


def qwen_goals(rep: dict[str, Any]) -> list[Goal]:
    """The Qwen2.5-0.5B shape's goals: at batch 16 the runs named so; the best rung's are those at
    the probe's recommended rung (the `recommended` and `compiled-recommended` stages)."""
    at16 = named(rep, "eager-16", "padded-16", "compiled-16")
    rung = (rep.get("probe") or {}).get("recommended")
    at_best = named(rep, f"eager-{rung}", f"compiled-{rung}") if rung else []
    flat = best([v.get("samples_per_s") for k, v in rep.items() if k.startswith("hf-flat-") and isinstance(v, dict)])
    fastest16 = best([v["samples_per_s"] for v in at16])
    # The window says how much of the CUDA graphs' recording (the first tens of steps) the rate carries
    # (a report from before bench_causal named it: steps W+11..N, the interval after the warm-up dropped).
    window = ", ".join(sorted({v.get("window") or f"steps {v.get('warmup', 0) + 11}–{v.get('steps')}"
                               for v in at16})) or "not run"
    return [(f"tokens/s at batch 16 ({window})", best([v.get("tokens_per_s") for v in at16]), "≥", 100_000),
            (f"tokens/s at the best rung ({rung or 'no probe'})", best([v.get("tokens_per_s") for v in at_best]),
             "≥", 120_000),
            ("samples/s at batch 16 ÷ the HF Trainer's", ratio(fastest16, (rep.get("hf") or {}).get("samples_per_s")),
             "≥", 6),
            ("samples/s at batch 16 ÷ the padding-free HF Trainer's", ratio(fastest16, flat), "≥", 2)]


def t5_goals(rep: dict[str, Any]) -> list[Goal]:
    """chatlm-mini's goals. sftui's layout for a T5 is padded by default (packing measured slower
    at batch 16), so its batch-16 figure is the faster of padded and packed; the best rung is the
    largest batch run (``--batches 16,auto``)."""
    ours = {k: v for k, v in (rep.get("sftui") or {}).items() if not k.startswith("bare")}
    hf16 = ((rep.get("hf") or {}).get("16") or {}).get("samples_per_s")
    top = max(rep.get("batches") or [0])
    fastest16 = best([v.get("samples_per_s") for v in ours.values() if v.get("batch") == 16])
    gaps = [((c.get("loss") or {}).get("max_rel_gap")) for c in ((rep.get("packing") or {}).get("vs_padded") or {}).values()]
    oom = rep.get("oom_recovery") or {}
    goals: list[Goal] = [
        (f"MFU at the best rung ({top})",
         best([v.get("mfu") for v in ours.values() if v.get("batch") == top]) if top > 16 else None, "≥", 0.25),
        ("samples/s at batch 16 ÷ the HF Seq2SeqTrainer's", ratio(fastest16, hf16), "≥", 8),
        ("packed against padded: largest relative loss gap (within bf16 and dropout noise)",
         max((g for g in gaps if g is not None), default=None), "≤", 0.03)]
    for name in ("oom-eager", "oom-compiled"):
        goals.append((f"{name}: OOM → the next attempt's first step, s", (oom.get(name) or {}).get("recovery_s"), "≤", 20))
    return goals


GOALS: dict[str, Callable[[dict[str, Any]], list[Goal]]] = {"qwen": qwen_goals, "t5": t5_goals}


def summary(out: Path) -> dict[str, Any]:
    """Every goal of the parts whose reports exist, with its figure and verdict."""
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "parts": {}}
    for part, goals in GOALS.items():
        path = report_path(out, part)
        if not path.exists():
            continue
        rep = json.loads(path.read_text())
        result["parts"][part] = {"report": str(path), "date": rep.get("date"),
                                 "goals": [{"goal": g, "measured": m, "bound": f"{op} {b}",
                                            "met": None if m is None else (m >= b if op == "≥" else m <= b)}
                                           for g, m, op, b in goals(rep)]}
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"## Issue 17's goals ({result['date']})", "", "| part | goal | measured | goal | met |",
             "|---|---|---|---|---|"]
    for part, res in result["parts"].items():
        for g in res["goals"]:
            lines.append(f"| {part} | {g['goal']} | {g['measured'] if g['measured'] is not None else 'not run'} "
                         f"| {g['bound']} | {'—' if g['met'] is None else 'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", default="qwen,t5", help="comma list of qwen, t5 (default both)")
    p.add_argument("--gpu", default="0")
    p.add_argument("--smoke", action="store_true", help="CPU, small shapes, no --compile: the script works (no claims)")
    p.add_argument("--summary-only", action="store_true", help="run nothing: judge the reports under OUT")
    p.add_argument("--qwen-stages", default=QWEN_STAGES, help=f"bench_causal.py's --stages (default {QWEN_STAGES})")
    p.add_argument("--t5-stages", default=T5_STAGES,
                   help=f"bench_throughput.py's --stages (default {T5_STAGES}; add oom-eager,oom-compiled for recovery)")
    p.add_argument("--t5-batches", default="16,auto", help="bench_throughput.py's --batches (default 16,auto)")
    p.add_argument("--budget-s", type=float, default=540, help="bench_throughput.py's --budget-s (default 540)")
    p.add_argument("--qwen-extra", default="", help="more flags for bench_causal.py, e.g. '--steps 400'")
    p.add_argument("--t5-extra", default="",
                   help="more flags for bench_throughput.py, e.g. '--modes compiled --top-packing only --hf-batches 16'")
    args = p.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(GOALS):
        p.error(f"--parts: {args.parts!r} names a part other than {', '.join(GOALS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for part in [] if args.summary_only else parts:
        cmd = part_command(args, part)
        say("$ " + " ".join(cmd))
        code = subprocess.run(cmd, cwd=ROOT).returncode
        say(f"{part}: exit {code}")
        if code:
            failed.append(part)
    result = summary(args.out)
    (args.out / "bench_speed.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / "bench_speed.md").write_text(text)
    print(text, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
