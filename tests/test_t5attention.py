"""trainer/t5attention.py on the CPU, through Triton's interpreter (float32 inputs): the kernels
against an eager float64 reference built with their exact dropout mask, and a T5's packed rows
through them against sdpa. TRITON_INTERPRET is set by conftest.py, before any test module imports
triton."""

import pytest
import torch

from sftui.trainer import t5attention as T

BLOCK = T._INTERP_BLOCK


# ----------------------------------------------------------------------------
# reference and input builders
# ----------------------------------------------------------------------------
def reference(q, k, v, bias, mask, p, scale, keep):
    """Eager float64 reference; rows without an allowed key give 0 (and 0 grads)."""
    s = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        s = s + bias
    if mask is not None:
        m = mask.expand(q.shape[0], 1, q.shape[2], k.shape[2])
        s = s.masked_fill(~m, -1e30)  # finite: fully masked rows stay NaN-free
        probs = torch.softmax(s, -1) * m.any(-1, keepdim=True)
    else:
        probs = torch.softmax(s, -1)
    if p > 0:
        probs = probs * keep / (1.0 - p)
    return probs @ v


def qkv(B, H, Lq, Lk, D, gen):
    """q, k, v as non-contiguous (B, H, L, D) views of (B, L, H, D) storage."""
    def one(L):
        return torch.randn(B, L, H, D, generator=gen).transpose(1, 2)
    return one(Lq), one(Lk), one(Lk)


def padding_mask(B, Lk, lengths):
    m = torch.zeros(B, 1, 1, Lk, dtype=torch.bool)
    for b, n in enumerate(lengths):
        m[b, ..., :n] = True
    return m


def causal_padding_mask(B, L, lengths):
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return causal[None, None] & padding_mask(B, L, lengths)


def packed_doc_mask(B, L, docs):
    """Block-diagonal (per document) mask; positions after the last document are
    padding, i.e. query rows with no allowed key."""
    m = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b, lens in enumerate(docs):
        start = 0
        for n in lens:
            m[b, 0, start:start + n, start:start + n] = True
            start += n
    return m


def run_case(B=2, H=2, Lq=40, Lk=None, D=16, bias_mode=None, mask=None, p=0.0, scale=1.0,
             strategy="atomic", seed=1234, nan=None, atol=2e-5, rtol=1e-4, db_atol=None):
    """Compare out and all grads with the float64 reference.  bias_mode: None,
    "grad", "nograd", "batch" ((B, H, Lq, Lk) with grad).  nan: ("k" | "q", b,
    slice): those keys' k and v (or queries' q) are set to NaN; they must only
    occur in fully masked tiles."""
    Lk = Lq if Lk is None else Lk
    gen = torch.Generator().manual_seed(0)
    q, k, v = qkv(B, H, Lq, Lk, D, gen)
    bias = None
    if bias_mode is not None:
        bias = torch.randn(B if bias_mode == "batch" else 1, H, Lq, Lk, generator=gen)
    q_in, k_in, v_in = q.clone(), k.clone(), v.clone()
    if nan is not None:
        which, b, sl = nan
        for x in ((k_in, v_in) if which == "k" else (q_in,)):
            x[b, :, sl] = float("nan")
    q_t, k_t, v_t = (x.detach().clone().requires_grad_(True) for x in (q_in, k_in, v_in))
    bias_t = None
    if bias is not None:
        bias_t = bias.clone().requires_grad_(bias_mode != "nograd")
    out = T.attention(q_t, k_t, v_t, bias_t, mask, p, scale, seed=seed, dbias_strategy=strategy)
    do = torch.randn(out.shape, generator=gen)
    inputs = [q_t, k_t, v_t] + ([bias_t] if bias_t is not None and bias_t.requires_grad else [])
    grads = torch.autograd.grad(out, inputs, do)

    keep = T.dropout_keep_mask(seed, B, H, Lq, Lk, p) if p > 0 else None
    r_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    r_bias = None
    if bias is not None:
        r_bias = bias.double().requires_grad_(bias_mode != "nograd")
    r_out = reference(*r_in, r_bias, mask, p, scale, keep)
    r_inputs = r_in + ([r_bias] if r_bias is not None and r_bias.requires_grad else [])
    r_grads = torch.autograd.grad(r_out, r_inputs, do.double())

    assert out.shape == (B, H, Lq, D)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), r_out, atol=atol, rtol=rtol)
    names = ["dq", "dk", "dv", "dbias"]
    for name, g, rg in zip(names, grads, r_grads):
        assert g.shape == rg.shape, name
        assert g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        # fp32 kernels vs a float64 reference: absolute tolerance scaled by the
        # tensor's magnitude (scores reach |s| ~ 10 here, exp() amplifies rounding)
        tol = db_atol if (name == "dbias" and db_atol is not None) else atol * max(1.0, rg.abs().max().item())
        torch.testing.assert_close(g.double(), rg, atol=tol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return out, grads


# ----------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("L,D", [(16, 16), (40, 32), (64, 16)])
def test_no_bias(L, D):
    run_case(Lq=L, D=D)


@pytest.mark.parametrize("L", [16, 40, 64])
def test_bias_grad(L):
    run_case(Lq=L, bias_mode="grad")


def test_bias_nograd():
    run_case(Lq=40, bias_mode="nograd", mask=padding_mask(2, 40, [40, 23]))


def test_bias_per_batch():
    run_case(Lq=40, bias_mode="batch", mask=causal_padding_mask(2, 40, [40, 29]), p=0.1)


def test_scale():
    run_case(Lq=40, D=32, bias_mode="grad", scale=0.125)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_key_padding(p):
    run_case(Lq=40, bias_mode="grad", mask=padding_mask(2, 40, [40, 17]), p=p)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_causal_padding(p):
    run_case(Lq=64, bias_mode="grad", mask=causal_padding_mask(2, 64, [64, 45]), p=p)


@pytest.mark.parametrize("strategy", ["atomic", "store", "store_bf16"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_packed_documents(strategy, p):
    """Block-diagonal documents: many tiles entirely False (skipped); rows after
    the last document (and one explicitly emptied row) have no allowed key."""
    L = 64
    mask = packed_doc_mask(2, L, [[10, 30, 20], [40, 24]])
    mask[1, 0, 5, :] = False  # a query row with no allowed key inside a document
    assert not mask[0, 0, 60].any() and not mask[1, 0, 5].any()
    db_atol = 2e-2 if strategy == "store_bf16" else None
    out, grads = run_case(Lq=L, bias_mode="grad", mask=mask, p=p, strategy=strategy, db_atol=db_atol)
    assert (out[0, :, 60:] == 0).all() and (out[1, :, 5] == 0).all()
    dq, dk, dv, dbias = grads
    assert (dq[0, :, 60:] == 0).all() and (dq[1, :, 5] == 0).all()
    never = ~mask.any(0)[0]  # (L, L): pairs masked in every batch row
    assert (dbias[0][:, never] == 0).all()
    # keys 60..63 of batch 0 are not attended by anybody
    assert (dk[0, :, 60:] == 0).all() and (dv[0, :, 60:] == 0).all()


def test_skipped_tiles_are_not_read():
    """Keys of batch 1 in fully padded blocks hold NaN; skipping their tiles is the
    only way for outputs and gradients to stay finite and correct."""
    L = 64
    assert 32 % BLOCK == 0
    mask = padding_mask(2, L, [L, 30])  # keys 32..63 of batch 1: whole blocks masked
    run_case(Lq=L, bias_mode="grad", mask=mask, p=0.1, nan=("k", 1, slice(32, L)))
    # packed rows: queries 48..63 of batch 1 are padding (no allowed key at all)
    mask = packed_doc_mask(2, L, [[32, 32], [16, 32]])
    run_case(Lq=L, bias_mode="grad", mask=mask, p=0.1, nan=("q", 1, slice(48, L)))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cross_attention(p):
    """Lq != Lk (neither a multiple of the block), no bias, key padding."""
    run_case(Lq=24, Lk=40, D=32, mask=padding_mask(2, 40, [40, 33]), p=p)
    run_case(Lq=40, Lk=24, D=16, p=p)


@pytest.mark.parametrize("strategy", ["atomic", "store"])
def test_dropout_bias_strategies(strategy):
    run_case(Lq=40, D=32, bias_mode="grad", p=0.1, strategy=strategy)


def test_mask_full_shape_1():
    """A mask shared by the batch: shape (1, 1, Lq, Lk)."""
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
    run_case(Lq=40, bias_mode="grad", mask=mask, p=0.1)


# ----------------------------------------------------------------------------
# dropout RNG
# ----------------------------------------------------------------------------
def test_keep_fraction():
    p = 0.1
    keep = T.dropout_keep_mask(7, 2, 4, 128, 128, p)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.005, frac  # 131072 samples: sd ~ 0.0008
    # per-head streams differ
    assert (keep[0, 0] != keep[0, 1]).any() and (keep[0, 0] != keep[1, 0]).any()
    # and a different seed gives a different mask
    assert (T.dropout_keep_mask(8, 2, 4, 128, 128, p) != keep).any()


def test_keep_mask_independent_of_blocks():
    """The mask depends on (seed, b, h, i, j) only, not on the tiling."""
    full = T.dropout_keep_mask(3, 1, 2, 40, 72, 0.3)
    sub = T.dropout_keep_mask(3, 1, 2, 24, 40, 0.3)  # a smaller problem = a corner of the bigger one
    assert torch.equal(full[..., :24, :40], sub)


def test_seed_none_differs_and_fwd_bwd_consistent():
    """Two calls with seed=None use different masks; within a call the backward
    regenerates the forward's mask: out is linear in v (out = A v), so
    <out, dO> == <v, dV> holds only if dV = A^T dO uses the same A."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(2, 2, 40, 40, 16, gen)
    v = v.detach().clone().requires_grad_(True)
    outs = []
    for _ in range(2):
        out = T.attention(q, k, v, None, None, 0.5, 1.0)
        do = torch.randn(out.shape, generator=gen)
        (dv,) = torch.autograd.grad(out, v, do)
        torch.testing.assert_close((out * do).sum(), (v * dv).sum(), atol=1e-4, rtol=1e-5)
        outs.append(out.detach())
    assert not torch.allclose(outs[0], outs[1])
    # seed=None draws from the CPU generator: torch.manual_seed reproduces it
    torch.manual_seed(123)
    a = T.attention(q, k, v, None, None, 0.5, 1.0)
    torch.manual_seed(123)
    b = T.attention(q, k, v, None, None, 0.5, 1.0)
    assert torch.equal(a, b)
    torch.manual_seed(123)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    assert torch.equal(a, T.attention(q, k, v, None, None, 0.5, 1.0, seed=seed))


# ----------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------
def test_bad_shapes():
    q = torch.randn(2, 2, 16, 16)
    with pytest.raises(ValueError):
        T.attention(q, q, q, torch.randn(2, 2, 16))  # wrong rank
    with pytest.raises(ValueError):
        T.attention(q, q, q, None, torch.ones(2, 2, 16, 16, dtype=torch.bool))  # head dim in mask
    with pytest.raises(ValueError):
        T.attention(q, q, q, None, torch.ones(2, 1, 1, 16))  # not bool
    with pytest.raises(ValueError):
        T.attention(torch.randn(2, 2, 16, 24), torch.randn(2, 2, 16, 24), torch.randn(2, 2, 16, 24))


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through the custom ops (no graph
    break), forward and backward, with the aot_eager backend on the CPU."""
    B, H, L, D = 2, 2, 40, 16
    gen = torch.Generator().manual_seed(2)
    q, k, v = (x.detach().clone().requires_grad_(True) for x in qkv(B, H, L, L, D, gen))
    bias = torch.randn(1, H, L, L, generator=gen, requires_grad=True)
    mask = padding_mask(B, L, [L, 21])

    def f(q, k, v, bias, mask):
        o = T.attention(q, k, v, bias, mask, 0.1, 1.0, seed=11)
        return o.transpose(1, 2).reshape(B, L, H * D)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(q, k, v, bias, mask)
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias))
    e_out = f(q, k, v, bias, mask)
    e_grads = torch.autograd.grad(e_out.sum(), (q, k, v, bias))
    torch.testing.assert_close(out, e_out)
    for g, e in zip(grads, e_grads):
        torch.testing.assert_close(g, e)

    # seed=None inside a compiled graph: still a fresh seed each call
    def g(q, k, v):
        return T.attention(q, k, v, None, None, 0.5, 1.0)

    cg = torch.compile(g, fullgraph=True, backend="aot_eager")
    assert not torch.allclose(cg(q, k, v), cg(q, k, v))


def test_inductor_makes_no_kernel_of_the_dropout_seed() -> None:
    """The seed is drawn by sftui's own op, which inductor calls as it is: a torch.randint on the
    CPU in the compiled graph became a C++ kernel, and loading it, even from the compile cache,
    made inductor probe the C++ compiler in every new process (44 s of a rank's first step on an
    H200 machine). Here the attention is all the graph holds, so inductor writes no kernel."""
    from torch._inductor.utils import run_and_get_code

    q = torch.randn(2, 2, 32, 16)
    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(lambda q: T.attention(q, q, q, None, None, 0.3, 1.0)), q)
    code = "\n".join(codes)
    assert "sftui_t5attn.seed" in code and "randint" not in code and "cpp_pybinding" not in code, code
    torch._dynamo.reset()


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_a_compiled_attention_draws_its_seed_once_for_forward_and_backward(checkpointed: bool) -> None:
    """Dropout with the seed drawn in the graph, compiled, inside an activation checkpoint or not,
    with the CPU generator moved on before the backward: the loss and gradients of eager. A
    checkpoint's recompute draws again, so it must restore the CPU generator's state: the seed op
    takes a CPU tensor to name that generator (without one the compiled checkpoint failed:
    "Backend not supported for None")."""
    from torch.utils.checkpoint import checkpoint

    B, H, L, D = 2, 2, 32, 16
    gen = torch.Generator().manual_seed(3)
    inputs = [*qkv(B, H, L, L, D, gen), torch.randn(1, H, L, L, generator=gen)]

    def inner(q, k, v, bias):
        out = T.attention(q, k, v, bias, None, 0.3, 1.0)
        return (out * out).sum()

    def f(q, k, v, bias):
        return checkpoint(inner, q, k, v, bias, use_reentrant=False) if checkpointed else inner(q, k, v, bias)

    results = []
    for fn in (inner, torch.compile(f, backend="aot_eager")):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        torch.manual_seed(7)
        loss = fn(*leaves)
        torch.manual_seed(123)  # the CPU generator moves on before the backward
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    torch._dynamo.reset()
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b)


def test_a_t5s_packed_rows_take_the_kernels_with_sdpa_s_loss_and_gradients() -> None:
    """The attention a T5's packed rows take (``NAME``, registered by ``packed_attention``) gives
    the loss and every gradient sdpa gives, through the training form, over rows of several
    samples and a padding tail (dropout 0: the same computation); its self- and cross-attentions
    run the kernels (counted). A run whose batch × heads is under ``MIN_SAMPLES_X_HEADS`` keeps
    sdpa: decided once, so that no micro-batch's size is a compiled graph's guard."""
    from transformers import T5Config, T5ForConditionalGeneration

    from sftui.trainer import model as models
    from sftui.trainer.loss import TrainingModel

    heads = 12
    bar = T.MIN_SAMPLES_X_HEADS // heads
    assert T.packed_attention(torch.device("cpu"), 512, heads) is None
    assert T.packed_attention(torch.device("cuda"), bar, heads) == T.NAME  # registration only: no GPU is touched
    assert T.packed_attention(torch.device("cuda"), bar - 1, heads) is None
    torch.manual_seed(0)
    config = T5Config(vocab_size=40, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0,
                      feed_forward_proj="relu", pad_token_id=0, decoder_start_token_id=0)
    enc_sample = torch.tensor([[0] * 9 + [1] * 11 + [2] * 4, [3] * 17 + [-1] * 7])
    dec_sample = torch.tensor([[0] * 5 + [1] * 8 + [2] * 3 + [-2] * 4, [3] * 12 + [-2] * 8])
    ids = torch.randint(2, 40, enc_sample.shape)
    labels = torch.randint(2, 40, dec_sample.shape).masked_fill(dec_sample < 0, -100)
    decoder_ids = torch.randint(2, 40, dec_sample.shape)
    calls = []
    results = []
    for name in ("sdpa", T.NAME):
        net = T5ForConditionalGeneration(config)
        net.load_state_dict(results[0][2] if results else net.state_dict())
        models.set_attention(net, name)
        assert {m.config._attn_implementation for m in net.modules() if hasattr(m, "config")} == {name}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss = TrainingModel(net)(ids, labels, decoder_input_ids=decoder_ids, encoder_sample=enc_sample,
                                      decoder_sample=dec_sample)
            loss.backward()
        calls.append(sum(e.count for e in prof.key_averages() if e.key == "sftui_t5attn::fwd"))
        results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()},
                        {k: v.clone() for k, v in net.state_dict().items()}))
    # two encoder and two decoder self-attentions and two cross-attentions
    assert calls == [0, 6]
    loss0, grads0, _ = results[0]
    for loss1, grads1, _ in results[1:]:
        torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
        for n, g in grads0.items():
            torch.testing.assert_close(grads1[n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_compiled_packed_rows_of_any_count_share_one_graph() -> None:
    """Packed micro-batches of 2, 5 and 3 rows through ``sftui_t5``, compiled: every one runs the
    kernels, in one graph. The attention's choice depends on nothing of the micro-batch's size (a
    size test was a guard: the short last step of a packed run on an H200 compiled a second graph,
    and a size test put back fails this, small rows going to sdpa)."""
    from torch._dynamo.testing import CompileCounter
    from transformers import T5Config, T5ForConditionalGeneration

    from sftui.trainer import loop, model as models
    from sftui.trainer.loss import TrainingModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=40, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, dropout_rate=0.1,
                      feed_forward_proj="relu", pad_token_id=0, decoder_start_token_id=0)
    net = T5ForConditionalGeneration(config)
    assert T.packed_attention(torch.device("cuda"), T.MIN_SAMPLES_X_HEADS, 1) == T.NAME  # registers it; no GPU
    models.set_attention(net, T.NAME)
    form = TrainingModel(net)
    torch._dynamo.reset()
    graphs = CompileCounter()
    form.compile(backend=graphs)
    enc_row, dec_row = [0] * 9 + [1] * 7, [0] * 5 + [1] * 6 + [-2] * 5
    for rows in (2, 5, 3):
        enc_sample = torch.tensor([[s + 2 * r if s >= 0 else s for s in enc_row] for r in range(rows)])
        dec_sample = torch.tensor([[s + 2 * r if s >= 0 else s for s in dec_row] for r in range(rows)])
        micro = {"input_ids": torch.randint(2, 40, enc_sample.shape),
                 "labels": torch.randint(2, 40, dec_sample.shape).masked_fill(dec_sample < 0, -100),
                 "decoder_input_ids": torch.randint(2, 40, dec_sample.shape),
                 "encoder_sample": enc_sample, "decoder_sample": dec_sample}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loop.token_loss_sum(form, micro, 0).backward()
        assert any(e.key == "sftui_t5attn::fwd" for e in prof.key_averages())  # every count ran the kernels
    assert graphs.frame_count == 1
    torch._dynamo.reset()
