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
each call's stages to the report in OUT/qwen). Then OUT/bench_speed.json and OUT/bench_speed.md hold
every goal of issue 17 with the figure measured for it and whether it is met, from whatever reports
OUT holds; --summary-only just judges them (reports carried back from several calls, say).
"""

from __future__ import annotations

import argparse
import json
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
                *(["--smoke"] if args.smoke else ["--gpu", args.gpu])]
    smoke = ["--smoke"] if args.smoke else ["--compile", "--batches", args.t5_batches, "--gpu", args.gpu]
    return [sys.executable, str(ROOT / "scripts/bench_throughput.py"), "--out", out, "--packing", "both",
            "--stages", args.t5_stages, "--budget-s", str(args.budget_s), *smoke]


def runs(report: dict[str, Any], *prefixes: str) -> dict[str, dict[str, Any]]:
    """sftui's runs in a bench_causal report (eager-16, compiled-128, ...), by name."""
    return {k: v for k, v in report.items() if isinstance(v, dict) and k.startswith(prefixes) and "samples_per_s" in v}


def best(values: list[float | None]) -> float | None:
    found = [v for v in values if v]
    return max(found) if found else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return round(ours / theirs, 2) if ours and theirs else None


Goal = tuple[str, "float | None", str, float]  # what, the figure measured, "≥" or "≤", the bound


def qwen_goals(rep: dict[str, Any]) -> list[Goal]:
    """The Qwen2.5-0.5B shape's goals."""
    at16 = runs(rep, "eager-16", "padded-16", "compiled-16")
    every = runs(rep, "eager-", "padded-", "compiled-")
    flat = best([v.get("samples_per_s") for k, v in rep.items() if k.startswith("hf-flat-") and isinstance(v, dict)])
    fastest16 = best([v["samples_per_s"] for v in at16.values()])
    return [("tokens/s at batch 16", best([v.get("tokens_per_s") for v in at16.values()]), "≥", 100_000),
            ("tokens/s at the best rung", best([v.get("tokens_per_s") for v in every.values()]), "≥", 120_000),
            ("samples/s at batch 16 ÷ the HF Trainer's", ratio(fastest16, (rep.get("hf") or {}).get("samples_per_s")),
             "≥", 6),
            ("samples/s at batch 16 ÷ the padding-free HF Trainer's", ratio(fastest16, flat), "≥", 2)]


def t5_goals(rep: dict[str, Any]) -> list[Goal]:
    """chatlm-mini's goals."""
    ours = rep.get("sftui") or {}
    hf16 = ((rep.get("hf") or {}).get("16") or {}).get("samples_per_s")
    fastest16 = best([v.get("samples_per_s") for k, v in ours.items() if v.get("batch") == 16 and not k.startswith("bare")])
    gaps = [((c.get("loss") or {}).get("max_rel_gap")) for c in ((rep.get("packing") or {}).get("vs_padded") or {}).values()]
    return [("MFU at the best rung", best([v.get("mfu") for v in ours.values()]), "≥", 0.25),
            ("samples/s at batch 16 ÷ the HF Seq2SeqTrainer's", ratio(fastest16, hf16), "≥", 8),
            ("largest packed-vs-padded loss gap, relative (bf16 and dropout noise)",
             max((g for g in gaps if g is not None), default=None), "≤", 0.03)]


GOALS: dict[str, Callable[[dict[str, Any]], list[Goal]]] = {"qwen": qwen_goals, "t5": t5_goals}


def summary(out: Path) -> dict[str, Any]:
    """Every goal of the parts whose reports exist, with its figure and verdict."""
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "parts": {}}
    for part, goals in GOALS.items():
        path = report_path(out, part)
        if not path.exists():
            continue
        rep = json.loads(path.read_text())
        result["parts"][part] = {"report": str(path), "card": rep.get("card"), "date": rep.get("date"),
                                 "goals": [{"goal": g, "measured": m, "bound": f"{op} {b}",
                                            "met": m is not None and (m >= b if op == "≥" else m <= b)}
                                           for g, m, op, b in goals(rep)]}
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"## Issue 17's goals ({result['date']})", "", "| part | goal | measured | goal | met |",
             "|---|---|---|---|---|"]
    for part, res in result["parts"].items():
        for g in res["goals"]:
            lines.append(f"| {part} | {g['goal']} | {g['measured'] if g['measured'] is not None else 'not run'} "
                         f"| {g['bound']} | {'yes' if g['met'] else 'no'} |")
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
    p.add_argument("--budget-s", type=float, default=540, help="bench_throughput.py's --budget-s")
    args = p.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(GOALS):
        p.error(f"--parts: {args.parts!r} names a part other than {', '.join(GOALS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for part in [] if args.summary_only else parts:
        cmd = part_command(args, part)
        say("$ " + " ".join(cmd))
        code = subprocess.run(cmd, cwd=ROOT).returncode
        say(f"{part}: exit {code}")
    result = summary(args.out)
    (args.out / "bench_speed.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / "bench_speed.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
