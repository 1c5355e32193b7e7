"""Data preparation at scale: 1M synthetic prompt/response rows through sftui's own path (the
CLI's one pass that validates and hashes, the worker's hash check, the character tokenizer,
tokenizing into the memory-mapped cache, batches from the plan), with the time of each phase
and the peak RSS.

    .venv/bin/python scripts/bench_data_prep.py [--rows 1000000] [--max-len 256] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

from sftui import rows
from sftui.trainer import data, model


def rss_mib() -> float:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_now_mib() -> str:
    """Resident memory now, split into anonymous (the process's own) and file-backed pages
    (the memory-mapped cache: page cache, shared and reclaimable, yet counted in RSS)."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    anon, file = (int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))
    return f"anon {anon:.0f} + file {file:.0f}"


def write_rows(path: Path, n: int) -> None:
    """Mixed English/Chinese rows of varied length, written as they are made (bounded memory)."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "模型", "数据", "训练", "批次", "内存", "检查点"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
            response = " ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))
            f.write(json.dumps({"prompt": f"{i}: {prompt}", "response": response}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sftui-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "rows.jsonl"
    figures: dict[str, float | int | str] = {"rows": args.rows, "max_len": args.max_len}
    try:
        t = time.perf_counter()
        write_rows(path, args.rows)
        figures["generate_s"] = round(time.perf_counter() - t, 1)
        figures["file_mib"] = round(path.stat().st_size / 2**20, 1)
        base_rss = rss_mib()

        t = time.perf_counter()
        usable = rows.scan(str(path), skip_bad_rows=False).usable
        figures["scan_s"] = round(time.perf_counter() - t, 1)
        figures["rss_after_scan_mib"] = rss_now_mib()
        t = time.perf_counter()
        rows.fingerprint(str(path))
        figures["fingerprint_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        model.build_char_tokenizer(rows.char_counts(str(path), False), work / "tokenizer")
        tok = model.load_tokenizer(work / "tokenizer")
        figures["char_tokenizer_s"] = round(time.perf_counter() - t, 1)
        figures["rss_after_char_tokenizer_mib"] = rss_now_mib()
        t = time.perf_counter()
        cache = data.tokenize_to_cache(str(path), tok, args.max_len, False, False, work / "cache", lambda f: None)
        seconds = time.perf_counter() - t
        figures["tokenize_s"] = round(seconds, 1)
        figures["rss_after_tokenize_mib"] = rss_now_mib()
        figures["tokenize_rows_per_s"] = round(usable / seconds)
        figures["tokens"] = int(cache.offsets[-1])
        figures["cache_mib"] = round(sum(p.stat().st_size for p in (work / "cache").iterdir()) / 2**20, 1)

        t = time.perf_counter()
        plan = data.Plan(cache.n, 42, cache.n)
        steps = plan.steps(0, 16)
        batches = data.StepBatches(cache, plan, steps, rank=0, batch=16, grad_accum=1, pad_id=tok.pad_token_id)
        for j in range(1000):
            batches[j]
        figures["plan_and_1000_batches_s"] = round(time.perf_counter() - t, 2)
        figures["rss_after_batches_mib"] = rss_now_mib()
        figures["peak_rss_mib"] = round(rss_mib(), 1)
        figures["peak_rss_before_prep_mib"] = round(base_rss, 1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
