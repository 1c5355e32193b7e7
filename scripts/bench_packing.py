"""Which attention path packed micro-batches should take on a GPU: padded against packed, one process.

    PYTHONPATH=src PYTHONUNBUFFERED=1 python3 scripts/bench_packing.py --out OUT_DIR --work /tmp/bench-packing \
        [--batches 16,64] [--steps 15,8] [--budget-s 240] [--variants padded-eager,packed-varlen-compiled,...]
    .venv/bin/python scripts/bench_packing.py --smoke --out OUT_DIR    # CPU, a tiny shape: the script works

The Qwen2.5-0.5B-shaped directory and rows of bench_causal.py (prompt 16–256, response 8–256 words;
its builder, imported), tokenized by sftui with the ChatML template at --max-len 512, under --work
(the model is 1 GB: keep it out of an OUT that is copied back). Variants, each VARIANT-eager or
VARIANT-compiled, run in --variants' order (default ``ORDER``):

    padded          today's path: data.collate rows (each micro-batch's longest row rounded up to 8;
                    compiled: padded to --max-len, as loop.pad_width has it), loss.TrainingModel
    packed-sdpa     batching.Packing rows, attn_implementation "sdpa": transformers finds the samples
                    from the restarting position ids and builds a block-diagonal mask (dense T × T)
    packed-flex     the same with "flex_attention": a BlockMask with the document mask
    packed-varlen   batching.VARLEN: torch's FlashAttention varlen kernel (torch.nn.attention.varlen)
    packed-flash    "flash_attention_2" with the boundaries, only where the flash_attn package imports

Compiled: torch.compile of the transformer body, the batch (padded) or token (packed) dimension
marked dynamic as the worker marks it, packed widths in batching.token_bucket's buckets, padded ones
at --max-len; ``graphs`` counts what dynamo compiled. The chunked head and loss stay eager: compiled,
their loop over the trained positions (``range(0, h.shape[0], step)`` in loss.head_loss_sum)
specialises the trained-token count, a recompile at every step (seen with torch 2.13 on the CPU; the
worker's whole-model --compile compiles them too).

Every variant starts from the same weights and trains the same steps of the same sample plan (sftui's
Plan and StepBatches through a DataLoader, as the worker), one step as loop.train_step does it: bf16
autocast, the loss sum over the step's trained-token count, clip 1.0, fused AdamW. Reported per
variant and batch: the first step's seconds (compiles), step time, samples/s and tokens/s
(non-padding tokens, as the worker counts them), the share of positions that are real tokens, peak
allocated and reserved memory, and the loss curve against padded eager's at the same batch (equal
within bf16 noise when the packing is right). No variant starts past --budget-s (they are listed as
skipped). Writes OUT/bench_packing.json after every variant and OUT/bench_packing.log.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from bench_causal import build_model_dir, write_rows  # noqa: E402  (scripts/ is this script's own directory)
from sftui import chat  # noqa: E402
from sftui.trainer import batching, data, loss  # noqa: E402

MAX_LEN = 512
SEED = 42
STARTED = time.monotonic()
# Run in this order, the most telling first: a run cut short by --budget-s keeps them. flex_attention
# compiles its kernels even eager (80 s on an H200), a compiled variant its graphs (minutes).
ORDER = ("padded-eager", "packed-varlen-eager", "packed-varlen-compiled", "packed-flex-eager", "packed-sdpa-eager",
         "padded-compiled", "packed-flex-compiled", "packed-sdpa-compiled", "packed-flash-eager",
         "packed-flash-compiled")
ATTENTION = {"padded": "sdpa", "packed-sdpa": "sdpa", "packed-flex": "flex_attention",
             "packed-flash": "flash_attention_2"}


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, text: str) -> None:
        line = f"[{time.monotonic() - STARTED:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def unavailable(variant: str, cuda: bool) -> str | None:
    """Why a variant cannot run here, or None."""
    if variant == "packed-flex" and not cuda:
        return "GPU only here: flex_attention runs on the CPU only compiled by inductor (minutes), forward only"
    if variant in ("packed-varlen", "packed-flash") and not cuda:
        return "FlashAttention's varlen kernels are CUDA only"
    if variant == "packed-varlen":
        try:
            import torch.nn.attention.varlen  # noqa: F401
        except ImportError as e:
            return f"torch has no varlen_attn: {e}"
    if variant == "packed-flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            return f"flash_attn is not importable: {e}"
    return None


def run_variant(args: argparse.Namespace, variant: str, compiled: bool, tok: Any, tokenized: Any,
                log: Log) -> dict[str, Any]:
    """One variant at every batch of --batches, on one model instance (compiled once: the shapes
    are dynamic), from the seed's weights."""
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    packed = variant != "padded"
    attn = batching.VARLEN if variant == "packed-varlen" else ATTENTION[variant]
    if attn == batching.VARLEN:
        batching.register_varlen(device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(SEED)
    net = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation=attn).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=cuda)
    form = loss.TrainingModel(net)  # the worker's form: it passes the boundaries to a kernel that takes them
    if compiled:  # the transformer body (see the module docstring); the CPU smoke: dynamo alone
        prefix = net.base_model_prefix
        setattr(net, prefix, torch.compile(getattr(net, prefix), backend="inductor" if cuda else "eager"))
    net.train()
    width = MAX_LEN if compiled and not packed else None  # loop.pad_width: --compile pads to --max-len
    packing = batching.Packing(tok.pad_token_id, MAX_LEN, buckets=compiled, multiple=8 if cuda else 1) \
        if packed else None
    out: dict[str, Any] = {"attn": attn, "compiled": compiled}
    seen = 0
    for batch, steps in zip(args.batches, args.steps):
        plan = data.Plan(tokenized.n, SEED, tokenized.n)
        plan_steps = plan.steps(seen, batch)[:args.warmup + steps]
        seen = plan_steps[-1][0] + plan_steps[-1][1]
        loader = DataLoader(data.StepBatches(tokenized, plan, plan_steps, 0, batch, 1, tok.pad_token_id, width,
                                             8 if cuda else 1, packing),
                            batch_size=None, num_workers=2, prefetch_factor=4, pin_memory=cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        losses: list[Any] = []
        widths: set[int] = set()
        tokens = positions = samples = 0
        first = t0 = 0.0
        start = sync(cuda)
        for k, item in enumerate(loader, start=1):
            if k == args.warmup + 1:
                t0 = sync(cuda)
            losses.append(train_step(form, optimizer, params, item, device, packed, compiled))
            widths.update(int(m["input_ids"].shape[1]) for m in item["micro"])
            if k == 1:
                first = sync(cuda) - start
            if k > args.warmup:
                tokens += item["n_tokens"]
                samples += item["size"]
                positions += sum(int(m["input_ids"].numel()) for m in item["micro"])
        seconds = sync(cuda) - t0
        res = {"first_step_s": round(first, 2), "step_ms": round(1000 * seconds / steps, 1),
               "samples_per_s": round(samples / seconds, 1), "tokens_per_s": round(tokens / seconds),
               "real_share": round(tokens / max(1, positions), 3), "distinct_widths": len(widths),
               "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
               "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
               "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
               "losses": [round(float(x), 5) for x in losses]}
        out[str(batch)] = res
        log(f"{name_of(variant, compiled)} batch {batch}: " + ", ".join(f"{k} {v}" for k, v in res.items() if k != "losses"))
    del form, net, optimizer, params
    return out


def train_step(form: Any, optimizer: Any, params: list[Any], item: dict[str, Any], device: Any, packed: bool,
               compiled: bool) -> Any:
    """One optimizer step as loop.train_step takes it (one rank): per micro-batch the loss sum
    under bf16 autocast, backward of it over the step's trained-token count; clip; AdamW."""
    cuda = device.type == "cuda"
    total = torch.zeros((), device=device)
    for micro in item["micro"]:
        trained = loss.trained_positions(micro["labels"], shifted=True)
        tensors = {k: v.to(device, non_blocking=True) for k, v in micro.items() if isinstance(v, torch.Tensor)}
        trained = trained.to(device, non_blocking=True)
        if packed:
            inputs = {k: tensors[k] for k in ("input_ids", "position_ids", "labels")}
            for t in inputs.values():
                torch._dynamo.maybe_mark_dynamic(t, 1)  # the row's width: one graph for every bucket
            # compiled: one max_seqlen (an upper bound is valid), or each new value recompiles
            inputs.update(cu_seqlens=tensors["cu_seqlens"], max_seqlen=MAX_LEN if compiled else micro["max_seqlen"])
            torch._dynamo.maybe_mark_dynamic(inputs["cu_seqlens"], 0)
        else:
            inputs = {k: tensors[k] for k in ("input_ids", "attention_mask", "labels")}
            for t in inputs.values():
                torch._dynamo.maybe_mark_dynamic(t, 0 if compiled else [0, 1])
        torch._dynamo.maybe_mark_dynamic(trained, 0)
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            loss_sum = form(**inputs, trained=trained)
        (loss_sum / max(1, item["n_target"])).backward()
        total += loss_sum.detach() / max(1, item["n_target"])
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def sync(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def name_of(variant: str, compiled: bool) -> str:
    return f"{variant}-{'compiled' if compiled else 'eager'}"


def compare_losses(report: dict[str, Any], batches: list[int]) -> None:
    """Each variant's loss curve against padded eager's at the same batch: the largest relative
    difference over the steps (the same samples from the same weights: bf16 noise only)."""
    reference = report["variants"].get("padded-eager")
    if not reference:
        return
    for res in report["variants"].values():
        for batch in map(str, batches):
            if batch in res and batch in reference:
                want, got = reference[batch]["losses"], res[batch]["losses"]
                res[batch]["loss_vs_padded_eager"] = round(max(abs(a - b) / max(1e-9, abs(b)) for a, b in zip(got, want)), 5)
                res[batch]["first_loss_vs_padded_eager"] = round(abs(got[0] - want[0]) / max(1e-9, abs(want[0])), 5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batches", default="16,64")
    p.add_argument("--steps", default="15,8", help="timed steps at each batch of --batches")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--variants", default=",".join(ORDER), help="VARIANT-eager or VARIANT-compiled, run in this order")
    p.add_argument("--budget-s", type=float, default=240.0, help="no new variant after this many seconds")
    p.add_argument("--work", type=Path, help="where the model directory, the token cache and inductor's cache go "
                                              "(default --out)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.batches, args.steps, args.warmup, args.rows = "4,8", "3,2", 1, 120
    args.batches = [int(b) for b in args.batches.split(",")]
    args.steps = [int(s) for s in args.steps.split(",")]
    work = (args.work or args.out).absolute()
    work.mkdir(parents=True, exist_ok=True)
    args.model_dir, args.data = work / "qwen2.5-0.5b-shape", work / "rows.jsonl"
    log = Log(args.out / "bench_packing.log")

    import transformers

    cuda = torch.cuda.is_available()
    if cuda:
        torch.set_float32_matmul_precision("high")  # as loop.setup_device
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "compile-cache"))
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": shlex.join(sys.argv), "max_len": MAX_LEN,
        "batches": args.batches, "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
        "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name() if cuda else None,
        "variants": {}, "skipped": {}}

    def save() -> None:
        (args.out / "bench_packing.json").write_text(json.dumps(report, indent=2))

    if not args.model_dir.exists():
        write_rows(args.data, args.rows, args.smoke)
        build_model_dir(args.model_dir, args.data, args.smoke)
        log(f"built {args.model_dir} and {args.rows} rows")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    cache = work / "cache"
    tokenized = data.Tokenized.open(cache) if cache.exists() else data.tokenize_to_cache(
        str(args.data), tok, MAX_LEN, False, False, cache, lambda f: None, chat.resolve("auto", tok).template)
    report["rows"] = tokenized.n
    report["mean_tokens"] = round(float(tokenized.n_tokens.mean()), 1)
    for name in args.variants.split(","):
        variant, _, mode = name.rpartition("-")
        compiled = mode == "compiled"
        why = unavailable(variant, cuda)
        if why is None and time.monotonic() - STARTED > args.budget_s:
            why = f"past --budget-s {args.budget_s:.0f}"
        if why:
            report["skipped"][name] = why
            log(f"{name}: skipped ({why})")
            save()
            continue
        log(f"{name}: starting")
        try:
            report["variants"][name] = run_variant(args, variant, compiled, tok, tokenized, log)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result; the others still run
            report["variants"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"}
            log(f"{name}: failed: {report['variants'][name]['error']}")
        compare_losses(report, args.batches)
        save()
    log("done: " + json.dumps({n: {b: {k: r[b].get(k) for k in ("tokens_per_s", "loss_vs_padded_eager")}
                                     for b in map(str, args.batches) if b in r}
                                 for n, r in report["variants"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
