"""GPU benchmark of trainer/t5attention.py's kernels against torch SDPA (memory-efficient backend).

    PYTHONPATH=src python3 scripts/bench_t5attention.py --out results.json

Setting: H=12 (chatlm-mini's heads), L=256, D=64, bf16, dropout 0.1, T5 relative-position bias
(1, H, L, L) requiring grad; B in (16, 256); masks: (i) key padding
(B, 1, 1, L), (ii) packed documents (B, 1, L, L), block diagonal, documents of
16..256 tokens laid end to end.  Times forward+backward (and forward alone)
with CUDA events: warmup, then the median of --iters runs; reports the peak
memory of one forward+backward above what was allocated before it.  At B=16
also checks bf16 outputs/gradients against an fp32 eager reference that uses
the kernel's exact dropout keep-mask (max error relative to max |reference|).
"""

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F
import triton

from sftui.trainer import t5attention as T

H, L, D, P = 12, 256, 64, 0.1
DTYPE = torch.bfloat16
STRATEGIES = ("atomic", "store", "store_bf16")


# ----------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------
def make_inputs(B, mask_kind, gen, device):
    def qkv():  # (B, L, H, D) storage viewed as (B, H, L, D), as T5 produces it
        x = torch.randn(B, L, H, D, generator=gen, device=device) / D ** 0.25
        return x.to(DTYPE).transpose(1, 2)
    q, k, v = qkv(), qkv(), qkv()
    bias = torch.randn(1, H, L, L, generator=gen, device=device).to(DTYPE)
    if mask_kind == "padding":
        lengths = torch.randint(L // 2, L + 1, (B,), generator=gen, device=device)
        mask = (torch.arange(L, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    elif mask_kind == "packed":
        doc = torch.empty(B, L, dtype=torch.long)
        cpu_gen = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=gen, device=device)))
        for b in range(B):
            pos, d = 0, 0
            while pos < L:
                n = int(torch.randint(16, 257, (1,), generator=cpu_gen))
                doc[b, pos:pos + n] = d
                pos, d = pos + n, d + 1
        doc = doc.to(device)
        mask = (doc[:, :, None] == doc[:, None, :])[:, None]
    else:
        raise ValueError(mask_kind)
    return q, k, v, bias, mask


def leafs(q, k, v, bias):
    return [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]


# ----------------------------------------------------------------------------
# implementations: each returns the output of a forward
# ----------------------------------------------------------------------------
def run_triton(strategy, seed=None):
    def f(q, k, v, bias, mask, p=P):
        return T.attention(q, k, v, bias, mask, p, 1.0, seed=seed, dbias_strategy=strategy)
    return f


def run_sdpa(q, k, v, bias, mask, p=P):
    # what transformers does: bias and mask combined into one float mask
    attn_mask = torch.where(mask, bias, torch.finfo(bias.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=1.0)


def reference(q, k, v, bias, mask, p, keep):
    """fp32 eager reference (rows without an allowed key give 0)."""
    s = q.float() @ k.float().transpose(-1, -2) + bias.float()
    m = mask.expand(q.shape[0], 1, q.shape[2], k.shape[2])
    probs = torch.softmax(s.masked_fill(~m, -1e30), -1) * m.any(-1, keepdim=True)
    if p > 0:
        probs = probs * keep / (1 - p)
    return probs @ v.float()


# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------
def time_it(fn, inputs, mask, do, iters, warmup, backward=True):
    def step():
        for x in inputs:
            x.grad = None
        out = fn(*inputs, mask)
        if backward:
            out.backward(do)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    # peak memory of one step above what is allocated before it
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak / 2**20


def max_rel_err(a, r):
    r = r.float()
    return ((a.float() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


def accuracy(B, mask_kind, gen, device):
    """bf16 kernel (and SDPA at p=0) vs fp32 eager reference; per-tensor errors."""
    q, k, v, bias, mask = make_inputs(B, mask_kind, gen, device)
    do = torch.randn(B, H, L, D, generator=gen, device=device).to(DTYPE)
    rows = []
    for p in (0.0, P):
        seed = 1234
        keep = T.dropout_keep_mask(seed, B, H, L, L, p, device) if p > 0 else None
        r_in = [x.detach().float().requires_grad_(True) for x in (q, k, v, bias)]
        r_out = reference(*r_in, mask, p, keep)
        r_grads = torch.autograd.grad(r_out, r_in, do.float())
        impls = [(f"triton[{s}]", run_triton(s, seed)) for s in STRATEGIES]
        if p == 0:
            impls.append(("sdpa", run_sdpa))
        for name, fn in impls:
            x = leafs(q, k, v, bias)
            out = fn(*x, mask, p=p)
            grads = torch.autograd.grad(out, x, do)
            errs = {"out": max_rel_err(out, r_out)}
            errs.update({n: max_rel_err(g, rg) for n, g, rg in zip(("dq", "dk", "dv", "dbias"), grads, r_grads)})
            errs["finite"] = bool(torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads))
            rows.append({"B": B, "mask": mask_kind, "impl": name, "dropout_p": p, **errs})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="path of the JSON results")
    ap.add_argument("--batch", default="16,256")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "H": H, "L": L, "D": D, "dtype": str(DTYPE), "dropout_p": P, "iters": args.iters}
    print(json.dumps(info))

    timings = []
    for B in [int(b) for b in args.batch.split(",")]:
        for mask_kind in ("padding", "packed"):
            q, k, v, bias, mask = make_inputs(B, mask_kind, gen, device)
            density = mask.expand(B, 1, L, L).float().mean().item()
            do = torch.randn(B, H, L, D, generator=gen, device=device).to(DTYPE)
            impls = [(f"triton[{s}]", run_triton(s)) for s in STRATEGIES] + [("sdpa", run_sdpa)]
            for name, fn in impls:
                x = leafs(q, k, v, bias)
                try:
                    ms, mb = time_it(fn, x, mask, do, args.iters, args.warmup)
                    ms_fwd, _ = time_it(fn, x, mask, do, args.iters, args.warmup, backward=False)
                    err = None
                except Exception as e:  # noqa: BLE001 (report and go on)
                    ms = mb = ms_fwd = math.nan
                    err = f"{type(e).__name__}: {e}"[:500]
                row = {"B": B, "mask": mask_kind, "mask_density": round(density, 4), "impl": name,
                       "fwd_bwd_ms": ms, "fwd_ms": ms_fwd, "peak_mem_MiB": mb, "error": err}
                timings.append(row)
                print(f"B={B:4d} {mask_kind:8s} {name:18s} fwd+bwd {ms:8.3f} ms  fwd {ms_fwd:7.3f} ms  "
                      f"peak {mb:9.1f} MiB" + (f"  ERROR {err}" if err else ""), flush=True)
            del q, k, v, bias, mask, do
            torch.cuda.empty_cache()

    tuned = {}
    for kname in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        cache = getattr(getattr(T, kname), "cache", {})
        tuned[kname] = {str(key): str(cfg) for key, cfg in cache.items()}

    acc = []
    for mask_kind in ("padding", "packed"):
        acc += accuracy(16, mask_kind, gen, device)

    print("\n=== forward+backward (median of %d), B x H=%d x L=%d x D=%d, %s, dropout %.1f, bias grad ==="
          % (args.iters, H, L, D, DTYPE, P))
    print(f"{'B':>5} {'mask':8} {'impl':18} {'fwd+bwd ms':>11} {'fwd ms':>8} {'peak MiB':>10} {'vs sdpa':>8}")
    for row in timings:
        sd = next(r for r in timings if r["B"] == row["B"] and r["mask"] == row["mask"] and r["impl"] == "sdpa")
        speed = sd["fwd_bwd_ms"] / row["fwd_bwd_ms"] if row["fwd_bwd_ms"] == row["fwd_bwd_ms"] else math.nan
        print(f"{row['B']:>5} {row['mask']:8} {row['impl']:18} {row['fwd_bwd_ms']:>11.3f} {row['fwd_ms']:>8.3f} "
              f"{row['peak_mem_MiB']:>10.1f} {speed:>7.2f}x")
    print("\n=== accuracy at B=16: max |x - ref| / max |ref| against the fp32 eager reference ===")
    print(f"{'mask':8} {'impl':18} {'p':>4} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9} {'dbias':>9} finite")
    for r in acc:
        print(f"{r['mask']:8} {r['impl']:18} {r['dropout_p']:>4} {r['out']:9.2e} {r['dq']:9.2e} {r['dk']:9.2e} "
              f"{r['dv']:9.2e} {r['dbias']:9.2e} {r['finite']}")
    print("\nautotuned configs:")
    for kname, d in tuned.items():
        for key, cfg in d.items():
            print(f"  {kname} {key}: {cfg}")

    with open(args.out, "w") as f:
        json.dump({"info": info, "timings": timings, "accuracy": acc, "autotune": tuned}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
