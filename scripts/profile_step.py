"""Where the worker's optimizer step spends its time: variants timed in one process, and a profile.

    PYTHONPATH=src python3 scripts/profile_step.py --out OUT_DIR [--variants eager-max:16,regional-grouped:192]
        [--profile regional-grouped:192] [--steps 43] [--warmup 3] [--budget-s 420]
    .venv/bin/python scripts/profile_step.py --smoke --out OUT_DIR      # CPU, tiny model: the script works

Each variant is MODE:BATCH. MODE is how the step runs and what it is fed:

    eager-max           eager, every batch padded to --max-len (256)
    eager-dyn           eager, each batch padded to its longest row (rounded up to 8)
    eager-grouped       eager-dyn on the --group-by-length order
    compiled-max        the worker's --compile (the whole model, the batch dimension dynamic), padded to 256
    compiled-grouped    the same on the --group-by-length order, each batch padded to its longest row
    regional-max        the worker's --compile --compile-layers (each repeated layer, dynamic shapes), padded
    regional-max-static the same with static shapes (torch.compile's default)
    regional-dyn        regional-max, each batch padded to its longest row
    regional-grouped    regional-dyn on the --group-by-length order
    eager-packed        eager, each micro-batch packed as the worker packs it (--packing: a causal LM's
                        samples end to end in one row, the varlen attention on a GPU; a T5's rows of
                        --max-len)
    compiled-packed     the worker's --compile on packed micro-batches (a causal LM's rows in token
                        buckets on a GPU)

A MODE may end in ``-stockbias``: T5's relative position bias as transformers makes it (float32,
heads as the last memory dimension), without ``model.fused_attention_bias`` (its before);
and in ``-fused``: SDPA's math backend disabled, so every attention must take a fused kernel
(or the variant fails, and the log's warnings say why each kernel refused); and in ``-nographs``: a
compiled variant in torch.compile's default mode, without the worker's CUDA graphs (``--compile-mode
default``; regional variants, a T5's packed rows and rows padded to their longest have none, as in the worker
by default). CUDA graphs record
a graph per shape after a warm-up run of it: a short window of a compiled packed variant is mostly
recording (on an H200 a 48-step window ran 185.8 samples/s, the worker's steady state ~330).
On a GPU the report also says which fused SDPA kernels accept a T5 self-attention's inputs
(bf16 query, the bias as a float32 or a bf16 mask needing its gradient, dropout 0.1) and why not.

Every variant uses the worker's own pieces: loop.setup_device, loop.new_model, accelerate's
prepare, compiling.compile_regions, data.Plan / StepBatches through a DataLoader as the worker
builds it, and loop.train_step. It reports samples/s, real tokens/s, the share of padded
positions that are real tokens, MFU by DESIGN.md's definition (real tokens only), peak
memory, for compiled variants the first step's time (the compile) and the recompiles after
it (their count and first reasons: a recompile inside the timed window inflates it). Variants named in
--profile get a torch.profiler pass over a few steps: GPU kernel time by category (matrix
products, attention, fused Triton kernels, other element-wise work, the optimizer, copies) and
how much of the wall time the GPU was busy.

``--model DIR`` profiles a local causal LM (bench_causal.py builds a Qwen2.5-0.5B-shaped one) on
``--data ROWS`` through its own chat template, as the worker renders rows; the default is the
chatlm-mini preset on the synthetic rows.

The synthetic data is bench_throughput's (prompt 16–256, response 8–256 characters = tokens);
with the default 3 × 8,192 rows a timed window of 43 steps at batch 192 spans one whole
--group-by-length chunk, so a grouped variant is not timed on its long or its short rows only.
Writes OUT/profile_step.json after every variant and OUT/profile-*.txt (the profiler tables, by GPU
time and, in *-host.txt, by the host's own time; with --trace the timeline too).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from bench_throughput import write_data  # noqa: E402  (scripts/ is this script's own directory)

SEED = 42
MODES = ("eager-max", "eager-dyn", "eager-grouped", "compiled-max", "compiled-grouped", "regional-max",
         "regional-max-static", "regional-dyn", "regional-grouped", "eager-packed", "compiled-packed")
# GPU kernel names by what they do, first match wins.
CATEGORIES = (
    ("attention", r"fmha|flash|attention|efficient|cudnn.*sdpa"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|matmul|sm90_|sm80_"),
    ("optimizer", r"adam|multi_tensor|foreach|clip|norm_kernel|_amp_"),
    ("loss", r"log_softmax|nll_loss|cross_entropy|softmax_warp"),
    ("fused (Triton)", r"^triton_"),
    ("copies", r"memcpy|memset|copy|cat|fill|index"),
    ("element-wise", r"elementwise|vectorized|reduce|dropout|where|mul|add"),
)
SUFFIXES = ("-stockbias", "-fused", "-nographs")
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", flush=True)


def prepare(args: argparse.Namespace) -> tuple[Any, Any]:
    """The tokenizer and the tokenized rows (--data, else the synthetic ones), through sftui's own
    cache: a preset's character tokenizer, or a local model's tokenizer and chat template as the
    worker resolves them (loop.chat_format)."""
    from sftui.config import RunConfig, is_seq2seq
    from sftui.rows import char_counts
    from sftui.trainer import data, loop, model as models

    rows = args.data or args.out / "data.jsonl"
    if not rows.exists():
        write_data(rows, args.rows)
    preset = models.is_preset(args.model)
    tok_dir = args.out / "tokenizer" if preset else Path(args.model)
    if preset:
        models.build_char_tokenizer(char_counts(str(rows), False), tok_dir, models.max_vocab(args.model))
    tok = models.load_tokenizer(tok_dir, preset=preset)
    fmt = loop.chat_format(RunConfig(model=args.model), tok)
    cache = args.out / f"cache-{Path(args.model).name}-{rows.stem}-{args.max_len}"
    tokenized = data.Tokenized.open(cache) if cache.exists() else data.tokenize_to_cache(
        str(rows), tok, args.max_len, is_seq2seq(args.model), False, cache, lambda f: None,
        fmt.template if fmt.kind == "template" else None)
    return tok, tokenized


def split_mode(mode: str) -> tuple[str, list[str]]:
    """MODE-SUFFIX... into the MODE and its suffixes."""
    suffixes = [s for s in SUFFIXES if s in mode]
    for s in suffixes:
        mode = mode.replace(s, "")
    return mode, suffixes


def run_variant(args: argparse.Namespace, name: str, tok: Any, tokenized: Any, accelerator: Any,
                profile: bool) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from sftui.config import RunConfig, default_lr
    from sftui.trainer import compiling, data, flops, loop, loss

    mode, batch = name.split(":")
    batch = int(batch)
    mode, suffixes = split_mode(mode)
    cuda = torch.cuda.is_available()
    device = accelerator.device
    grouped, padded = mode.endswith("grouped"), mode.endswith("max") or mode.endswith("max-static")
    packed = mode.endswith("packed")
    cfg = RunConfig(model=args.model, max_len=args.max_len, seed=SEED, batch=batch, ladder=[batch], packing=packed,
                    compile=mode.startswith("compiled"),
                    pad_to_max_len=None if packed else padded)  # packed: the worker's own width (pad_width)
    net, opt = loop.new_model(cfg, tok, device, default_lr(args.model), batch)
    if "-stockbias" in suffixes:
        for module_name, module in net.named_modules():
            if module_name.endswith("relative_attention_bias"):
                module._forward_hooks.clear()
    fpt = flops.flops_per_token(net, tokenized.seq2seq)
    decoder_start = net.config.decoder_start_token_id if tokenized.seq2seq else None
    model, optimizer = accelerator.prepare(loss.TrainingModel(net), opt)
    compiled = None
    compile_mode = "default" if "-nographs" in suffixes else compiling.resolve_mode(
        None, world=1, cuda=cuda, layers=mode.startswith("regional"), accumulates=False,
        shapes_vary=loop.shapes_vary(cfg, tokenized.seq2seq, cuda))
    if mode.startswith(("regional", "compiled")):
        torch._dynamo.reset()
        compiling.no_size_guards()  # as compiling.compile_for_training
    if mode.startswith("regional"):
        compiled = compiling.compile_regions(model, dynamic=None if mode.endswith("static") else True, mode=compile_mode)
    elif mode.startswith("compiled"):
        model, compiled = compiling.compile_for_training(model, False, compile_mode)
    model.train()

    n_steps = args.warmup + args.steps + (args.profile_steps if profile else 0)
    plan = data.Plan(tokenized.n, SEED, n_steps * batch, data.length_key(tokenized, args.max_len) if grouped else None)
    steps = plan.steps(0, batch)
    packing = loop.packed_layout(cfg, tok.pad_token_id, cuda, decoder_start) if packed else None
    width = loop.batch_width(cfg, tokenized.seq2seq, cuda)  # as the worker's
    loader = DataLoader(data.StepBatches(tokenized, plan, steps, 0, batch, 1, tok.pad_token_id,
                                         width, loop.PAD_MULTIPLE if cuda else 1, packing),
                        batch_size=None, num_workers=2, prefetch_factor=4, pin_memory=cuda)

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    recompiles = Recompiles()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attention() -> Any:
        """A context manager per step (sdpa_kernel's is single-use): with -fused, no math backend."""
        if "-fused" not in suffixes:
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, Any] = {"variant": name, "compiled": compiled, "attn": getattr(net.config, "_attn_implementation", None),
                           "batches": "packed" if packed else "padded"}
    times: list[float] = []
    real = enc = positions = samples = trained = 0
    prof: Any = None
    t = sync()
    for k, item in enumerate(loader, start=1):
        timed = args.warmup < k <= args.warmup + args.steps
        if k == args.warmup + args.steps + 1 and profile:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                          + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
            prof.__enter__()
            t = sync()
        torch.manual_seed(SEED + k)
        with attention():
            loss, _ = loop.train_step(accelerator, model, optimizer, item["micro"], item["n_target"], 1,
                                      decoder_start, loop.StepPhase(), widths_vary=width is None)
        if k == 1:
            recompiles.after_first_step()
            t1 = sync()
            out["first_step_s"] = round(t1 - t, 2)
            out["first_loss"] = round(float(loss), 4)
            say(f"{name}: first step {t1 - t:.1f} s (compile: {compiled or 'no'}), loss {float(loss):.3f}")
        if k == args.warmup:
            t = sync()
        if timed:
            samples += item["size"]
            real += item["n_tokens"]
            trained += item["n_target"]
            enc += item["n_enc"]
            positions += sum(int(m["input_ids"].numel() + (m["labels"].numel() if tokenized.seq2seq else 0))
                             for m in item["micro"])
        if k == args.warmup + args.steps:
            t2 = sync()
            seconds = t2 - t
            times.append(seconds)
            rates = {"samples": samples / seconds, "enc_tokens": enc / seconds, "dec_tokens": (real - enc) / seconds,
                     "trained_tokens": trained / seconds}
            out.update(samples_per_s=round(samples / seconds, 1), real_tokens_per_s=round(real / seconds),
                       ms_per_step=round(seconds / args.steps * 1000, 1), real_share=round(real / max(1, positions), 3),
                       mfu=flops.mfu(rates, fpt, net.config, flops.peak_tflops(cuda), 1),
                       last_loss=round(float(loss), 4))
    out.update(recompiles.report())
    recompiles.close()
    if prof is not None:
        seconds = sync() - t
        prof.__exit__(None, None, None)
        out["profile"] = summarize_profile(prof, seconds, args.profile_steps,
                                           args.out / f"profile-{mode}{''.join(suffixes)}-{batch}.txt", args.trace)
    if cuda:
        out.update(peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                   peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    del loader, model, optimizer, net, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


class Recompiles:
    """The worker's own recompile reporting (compiling.RecompileEvents) into a list instead of
    events.jsonl: after the first step, each recompile is a warning line."""

    def __init__(self) -> None:
        import torch

        from sftui.trainer import compiling

        self.lines: list[dict[str, Any]] = []
        self.handler = compiling.RecompileEvents(self, 0)
        torch._logging.set_logs(recompiles=True)
        logging.getLogger("torch._dynamo").addHandler(self.handler)

    def emit(self, kind: str, **fields: Any) -> None:  # what RecompileEvents calls on an EventLog
        self.lines.append(fields)

    def after_first_step(self) -> None:
        self.handler.settled = True

    def report(self) -> dict[str, Any]:
        later = [f["message"] for f in self.lines if f["level"] == "warning" and "recompiled" in f["message"]]
        return {"recompiles_after_first_step": len(later), "recompile_reasons": later[:3]}

    def close(self) -> None:
        logging.getLogger("torch._dynamo").removeHandler(self.handler)


def sdpa_kernels() -> dict[str, Any]:
    """Which fused SDPA kernels take a T5 self-attention's inputs at batch 192 (bf16 q/k/v
    needing gradients, dropout 0.1, the padding mask merged into the bias as transformers 5.17
    does it), with the bias as transformers makes it and as ``fused_attention_bias`` makes it;
    torch says why a kernel refuses in a warning."""
    import warnings

    import torch
    from torch.backends import cuda as backends

    q = torch.randn(192, 12, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    keep = torch.ones(192, 1, 1, 256, device="cuda", dtype=torch.bool)
    lookup = torch.randn(256, 256, 12, device="cuda", requires_grad=True)  # (query, key, heads)
    biases = {"stock bias": lookup.permute(2, 0, 1).unsqueeze(0),
              "sftui bias": lookup.to(torch.bfloat16).permute(2, 0, 1).contiguous().unsqueeze(0)}
    result: dict[str, Any] = {}
    for label, bias in biases.items():
        mask = torch.where(keep, bias, torch.finfo(torch.bfloat16).min)
        params = backends.SDPAParams(q, q, q, mask, 0.1, False, False)
        for kernel, check in (("flash", backends.can_use_flash_attention), ("efficient", backends.can_use_efficient_attention),
                              ("cudnn", backends.can_use_cudnn_attention)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ok = check(params, True)
            result[f"{kernel}, {label}"] = (
                "yes" if ok else "; ".join(str(w.message).splitlines()[0][:200] for w in caught) or "no")
    return result


def summarize_profile(prof: Any, wall_s: float, n_steps: int, table_path: Path, trace: bool) -> dict[str, Any]:
    """GPU kernel time per category over the profiled steps, and the GPU's busy share of the wall;
    the tables by GPU and by host time, and with ``trace`` the timeline beside them."""
    import torch

    kernels: dict[str, float] = {}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if e.key.startswith(("Optimizer.", "ProfilerStep")):  # annotations spanning kernels, not kernels
            continue
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        kernels[e.key] = kernels.get(e.key, 0.0) + us
    by_cat: dict[str, float] = {}
    for key, us in kernels.items():
        cat = next((c for c, rx in CATEGORIES if re.search(rx, key, re.IGNORECASE)), "other")
        by_cat[cat] = by_cat.get(cat, 0.0) + us
    busy = sum(kernels.values()) / 1e6
    sort_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table_path.write_text(prof.key_averages().table(sort_by=sort_key, row_limit=60, max_name_column_width=90))
    # The host's side: which operations the step's own thread spends its time issuing (a launch-bound step).
    host_path = table_path.with_name(table_path.stem + "-host.txt")
    host_path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=90))
    if trace:  # the timeline (chrome://tracing, Perfetto): where the GPU waits for the host
        prof.export_chrome_trace(str(table_path.with_suffix(".trace.json.gz")))
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"steps": n_steps, "wall_ms_per_step": round(wall_s / n_steps * 1000, 1),
            "gpu_busy_ms_per_step": round(busy / n_steps * 1000, 1), "gpu_busy_share": round(busy / wall_s, 3),
            "ms_per_step_by_category": {c: round(us / 1e3 / n_steps, 2) for c, us in
                                        sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_step": [(k[:100], round(us / 1e3 / n_steps, 2)) for k, us in top]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps: the script works (no claims)")
    p.add_argument("--variants", default=None, help="comma-separated MODE:BATCH (see above)")
    p.add_argument("--profile", default="", help="comma-separated variants to profile after their timed window")
    p.add_argument("--warmup", type=int, default=None, help="steps before the timed window (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 43)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--trace", action="store_true", help="also write each profile's timeline (OUT/profile-*.trace.json.gz)")
    p.add_argument("--model", default=None, help="a preset or a local causal LM directory (default chatlm-mini; "
                                                 "tiny with --smoke)")
    p.add_argument("--data", type=Path, default=None, help="a rows file (default: the synthetic rows)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=None, help="synthetic rows (default 3 × 8,192)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no variant after this many seconds")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend; 'eager' keeps dynamo's guards and recompiles but generates no code, "
                        "so the recompiles of a compiled variant can be counted on the CPU")
    args = p.parse_args()
    args.model = args.model or ("tiny" if args.smoke else "chatlm-mini")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.steps = args.steps if args.steps is not None else (3 if args.smoke else 43)
    args.rows = args.rows or (512 if args.smoke else 3 * 8192)
    variants = (args.variants or ("eager-max:8,eager-grouped:8" if args.smoke else
                                  "eager-max:16,regional-grouped:192")).split(",")
    for v in variants:
        mode, _, batch = v.partition(":")
        if split_mode(mode)[0] not in MODES or not batch.isdigit():
            p.error(f"--variants: {v!r} is not MODE:BATCH with MODE one of {', '.join(MODES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.out / "compile-cache"))

    import torch

    from sftui.config import RunConfig
    from sftui.trainer import loop

    if args.compile_backend != "inductor":  # Module.compile (compiled layers) calls torch.compile too
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)

    accelerator, cuda = loop.setup_device(RunConfig(cpu=args.smoke), loop.Rank(0, 1, 0, 1))
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": shlex.join(sys.argv),
                              "card": torch.cuda.get_device_name() if cuda else "CPU", "torch": torch.__version__,
                              "model": args.model, "max_len": args.max_len, "warmup": args.warmup, "steps": args.steps,
                              "variants": {}, "skipped": []}
    if cuda:
        report["sdpa_kernels"] = sdpa_kernels()
        say("SDPA kernels for a T5 self-attention: " + json.dumps(report["sdpa_kernels"]))
    say(f"{report['card']}, torch {torch.__version__}, {args.model}: preparing {args.rows} rows")
    tok, tokenized = prepare(args)
    profiled = set(filter(None, args.profile.split(",")))
    for v in variants:
        if time.monotonic() - STARTED > args.budget_s:
            say(f"skipped {v}: past --budget-s")
            report["skipped"].append(v)
            continue
        try:
            res = run_variant(args, v, tok, tokenized, accelerator, v in profiled)
        except Exception as e:  # noqa: BLE001 - one failing variant is a result; the others still run
            res = {"variant": v, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}",
                   "oom": loop.is_oom(e)}
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        report["variants"][v] = res
        (args.out / "profile_step.json").write_text(json.dumps(report, indent=2))
        say(f"{v}: " + json.dumps({k: res.get(k) for k in ("samples_per_s", "real_tokens_per_s", "ms_per_step",
                                                            "real_share", "mfu", "peak_reserved_gib",
                                                            "recompiles_after_first_step", "error")}))
        if "profile" in res:
            say(f"{v} profile: " + json.dumps(res["profile"]))
    print("\n| variant | samples/s | ms/step | real share | MFU | first step s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for v, r in report["variants"].items():
        mfu = f"{r['mfu'] * 100:.1f} %" if r.get("mfu") is not None else "n/a"
        print(f"| {v} | {r.get('samples_per_s', r.get('error'))} | {r.get('ms_per_step')} | {r.get('real_share')} "
              f"| {mfu} | {r.get('first_step_s')} | {r.get('peak_reserved_gib')} |")
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
