"""The chunked head loss (trainer/loss.py) alone: forward and backward time and peak memory of
one micro-batch's trained positions, against another version of loss.py in the same process.

    PYTHONPATH=src python3 scripts/bench_head_loss.py [--rows 2100] [--vocab 151936] [--hidden 896]
        [--against OLD_loss.py] [--out OUT.json]

The defaults are a Qwen2.5-0.5B shape at batch 16 of bench_causal's rows (about 2,100 trained
positions a step). Weights float32 as the worker keeps them, under bf16 autocast on a GPU; the
time is the median of --repeat timed calls after --warmup, each synchronised. With --against, the
two versions' gradients (hidden states, head weight) are compared: their largest difference over
their largest magnitude (``grad_rel_gap``). The current version runs first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sftui.trainer import loss  # noqa: E402


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"loss_{path.stem}_{abs(hash(path))}", path)
    if spec is None or not path.is_file():
        sys.exit(f"bench_head_loss.py: --against {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(module: ModuleType, args: argparse.Namespace,
            device: torch.device) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the head's initialisation too: both versions see the same weights
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(device)
    hidden = (torch.randn(1, args.rows + 1, args.hidden) * 0.5).to(device).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.rows + 1)).to(device)
    times, value = [], 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.repeat):
        head.weight.grad = hidden.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = module.head_loss_sum(hidden[:, :-1], labels[:, 1:], head)
        out.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        value = out.item()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return ({"ms": round(statistics.median(times) * 1000, 3), "loss": value,
             "grad_w_norm": head.weight.grad.norm().item(), "peak_allocated": peak},
            # on the host: the next version's peak must not count this one's gradients
            {"hidden": hidden.grad.float().cpu(), "weight": head.weight.grad.float().cpu()})


def largest_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per gradient, the largest absolute difference over the largest magnitude: bf16 rounding, or a bug."""
    return {name: (a[name] - b[name]).abs().max().item() / a[name].abs().max().clamp_min(1e-30).item() for name in a}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2100)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--against", type=Path, help="another loss.py (an earlier commit's) to time beside this one")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat: at least 1; --warmup: at least 0")
    older = load(args.against) if args.against else None  # a bad path fails before anything is timed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    current, grads = measure(loss, args, device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": args.rows, "vocab": args.vocab, "hidden": args.hidden,
              "current": current}
    if older is not None:
        theirs, their_grads = measure(older, args, device)
        result["against"] = {"file": str(args.against), **theirs,
                             "grad_rel_gap": largest_gap(their_grads, grads)}
    print(json.dumps(result, indent=2), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
