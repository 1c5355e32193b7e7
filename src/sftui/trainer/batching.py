"""A step's micro-batch of sample ids → the tensors the model takes: padded rows (``data.collate``,
one row per sample) or, for a causal LM, the samples packed end to end in one row (``Packing``);
for an encoder-decoder model, in rows of ``--max-len`` (``RowPacking``).

Packed, no FLOP and no byte goes to padding: a micro-batch of rows of 40 to 500 tokens padded to
the longest (or to ``--max-len`` with ``--compile``) spends about half its positions on padding.
The row is ``input_ids`` of shape (1, T), T the samples' total length; ``position_ids`` restart at
0 at each sample, so every sample sees the positions (rotary angles) it has alone; ``labels`` are
the padded path's, laid end to end. Attention must not cross samples: with no ``attention_mask``,
transformers' mask builders (sdpa, eager, flex_attention; 5.17 and later) find the samples where
the position ids restart (``masking_utils.find_packed_sequence_indices``) and make the mask block
diagonal; variable-length kernels (FlashAttention's, torch's ``varlen_attn``: ``VARLEN``) take the
boundaries as ``cu_seqlens``. The loss needs nothing new: the first token of every sample is
labelled -100 (nothing before it in that sample predicts it), so the causal shift by one across
the whole row never trains a token from the sample before it.

The sample plan does not change: a packed micro-batch holds exactly the sample ids the padded one
would, so resume, switch and the sample ledger stay exact.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from sftui.trainer.data import Tokenized

# --compile: packed widths come from a few buckets, 2^k × {1, 1.25, 1.5, 1.75}: at most a fifth of
# a row is padding, four widths per doubling (a batch's total length varies little around its
# mean, so a run meets a handful), each a multiple of 64.
BUCKET_QUARTERS = (4, 5, 6, 7)
MIN_BUCKET = 256


def token_bucket(tokens: int, cap: int) -> int:
    """The packed row's width under ``--compile``: the smallest bucket (``BUCKET_QUARTERS`` of a
    power of two, at least ``MIN_BUCKET``) that holds ``tokens``, but never more than ``cap`` —
    the micro-batch's samples × ``--max-len``, what its padded form would take — so the memory
    probe's worst case (batch × max-len) stays the worst case."""
    if tokens > cap:
        raise ValueError(f"{tokens} tokens do not fit the cap of {cap}")
    octave = max(MIN_BUCKET, 1 << max(0, (tokens - 1).bit_length() - 1))  # the power of two below
    bucket = next((q * octave // 4 for q in BUCKET_QUARTERS if q * octave // 4 >= tokens), 2 * octave)
    return min(bucket, cap)


@dataclass(frozen=True)
class Packing:
    """How a micro-batch is packed: ``pad_id`` fills the tail, ``max_len`` (``--max-len``) bounds
    every document, the tail's pieces too; ``buckets`` (``--compile``) rounds the row up to
    ``token_bucket``, else it is rounded up to a ``multiple`` (8 on a GPU, as padded widths are).

    The tail is padding, laid out as documents of its own (position ids from 0, at most
    ``max_len`` each): each attends to itself only and trains nothing, so a real sample never
    sees it and the loss never counts it. With ``buckets`` the tail is always
    ``tail_documents`` documents long for a given sample count (see there).
    """

    pad_id: int
    max_len: int
    buckets: bool = False
    multiple: int = 1

    def tail_documents(self, samples: int) -> int:
        """Under ``buckets``, the count of documents every tail of a micro-batch of ``samples``
        samples is laid out in, so that ``cu_seqlens`` keeps one length: CUDA graphs
        (``compiling.CUDA_GRAPHS``) record a graph per shape, and a tail cut in pieces of
        ``max_len`` comes in several piece counts per bucket, each a shape of its own (a
        Qwen2.5-0.5B run at batch 16 spent its first ~80 steps recording its shapes, H200,
        2026-12-02, docs/BENCHMARKS.md). Enough documents of 1 to
        ``max_len`` tokens for the longest tail: under ``MIN_BUCKET`` or a quarter of the cap
        (``token_bucket``), and under the cap, plus these documents' own tokens (``layout``). With a
        small ``--max-len`` (``MIN_BUCKET`` then sets the count) many micro-batches leave too little
        room for them, and those keep the tail in pieces."""
        cap = samples * self.max_len
        return -(-min(cap, max(MIN_BUCKET, cap // 4)) // (self.max_len - 1))

    def layout(self, tokens: int, samples: int) -> tuple[int, np.ndarray]:
        """The row's width for ``tokens`` tokens of ``samples`` samples, and the lengths of the
        tail's documents. With ``buckets``, ``tail_documents`` near-equal ones (the bucket is
        chosen for the tokens and one token per tail document); when they do not fit, the whole
        cap (so a row never narrows as its tokens grow: the probe's heaviest micro-batch stays the
        widest) in pieces of ``max_len`` and the rest, as without ``buckets``."""
        cap = samples * self.max_len
        if self.buckets:
            documents = self.tail_documents(samples)
            if tokens + documents <= cap:
                tail = token_bucket(tokens + documents, cap) - tokens
                sizes = np.full(documents, tail // documents, np.int64) + (np.arange(documents) < tail % documents)
                return tokens + tail, sizes
            width = cap
        else:
            width = -(-tokens // self.multiple) * self.multiple
        tail = width - tokens
        pieces = np.full(-(-tail // self.max_len), self.max_len, np.int64)
        if tail % self.max_len:
            pieces[-1] = tail % self.max_len
        return width, pieces

    def __call__(self, data: Tokenized, indices: np.ndarray, weight: bool = True) -> dict[str, Any]:
        """The packed micro-batch of the samples ``indices`` (in their order): ``input_ids``,
        ``position_ids`` and ``labels`` of shape (1, T); ``cu_seqlens`` (int32, the documents'
        boundaries: 0, the ends of the samples, then of the tail's pieces) and ``max_seqlen``
        (int, the longest document; ``max_len`` with ``buckets``) for variable-length kernels. ``weight`` False: nothing is
        trained (the zero-weight pass of a short last step, as ``data.collate``)."""
        import torch

        if data.seq2seq:
            raise ValueError("one-row packing is for causal LMs: an encoder-decoder row is two sequences (RowPacking)")
        starts, ends = data.offsets[indices], data.offsets[indices + 1]
        lengths = (ends - starts).astype(np.int64)
        _, pieces = self.layout(int(lengths.sum()), len(indices))
        documents = np.concatenate([lengths, pieces])
        bounds = np.concatenate([[0], np.cumsum(documents)])
        ids = np.full(bounds[-1], self.pad_id, np.int64)
        labels = np.full(bounds[-1], -100, np.int64)
        for start, end, at in zip(starts, ends, bounds):
            row = data.ids[start:end]
            ids[at:at + len(row)] = row
            if weight:
                trained = data.mask[start:end] == 1
                trained[0] = False  # the first token of a sample has nothing of its own before it
                labels[at:at + len(row)] = np.where(trained, row, -100)
        positions = np.arange(bounds[-1]) - np.repeat(bounds[:-1], documents)
        return {
            "input_ids": torch.from_numpy(ids)[None],
            "position_ids": torch.from_numpy(positions)[None],
            "labels": torch.from_numpy(labels)[None],
            "cu_seqlens": torch.from_numpy(bounds.astype(np.int32)),
            # Bucketed (compiled): the bound every document keeps, one value, so one graph.
            "max_seqlen": self.max_len if self.buckets else int(documents.max()),
        }


@dataclass(frozen=True)
class RowPacking:
    """An encoder-decoder micro-batch (the T5 family: ``config.RELATIVE_POSITION_SEQ2SEQ``) packed
    into rows of ``--max-len`` (``--packing``).

    One long row, as for a causal LM, would need T5's relative position bias for every pair of
    its positions: a (heads, T, T) tensor that grows with the square of the micro-batch. So the
    samples go, first fit decreasing, into rows of ``max_len`` columns on both sides: never
    more rows than samples, nor wider than ``--max-len`` (rounded up to ``multiple``). Taking the
    samples longest side first (not in the plan's order) leaves the short ones to fill the gaps:
    on the benchmark's rows (prompt 16–256, response 8–256) a batch of 384 fills 234.2 rows of 256
    where first fit in plan order took 250.0, and every row costs a whole forward and backward. Which
    samples a micro-batch trains does not change, only where each sits. Within a
    row the bias needs nothing new: it depends only on the distance between two positions, which
    is a sample's own wherever the sample sits. ``encoder_sample`` and ``decoder_sample`` (rows ×
    width, int32) say which sample of the micro-batch each position holds (-1: the padding at a
    row's end); ``row_masks`` turns them into the attention masks on the device, so that no
    rows × width² tensor crosses from the host. ``decoder_input_ids`` are each sample's labels
    shifted right behind ``decoder_start``, as ``loop.token_loss_sum`` builds them for padded rows.

    ``width`` (``--compile``: ``max_len``) fixes the columns, and then there are at least two rows
    (a padding row beside a lone one): dynamo specialises a dimension of size 1, and a micro-batch
    of one row would compile a second graph. Else the columns are the fullest row's, rounded up
    to a ``multiple``.
    """

    pad_id: int
    decoder_start: int
    max_len: int
    width: int | None = None
    multiple: int = 1

    def rows(self, data: Tokenized, indices: np.ndarray) -> list[list[int]]:
        """Which of ``indices`` (positions in it) each row holds: first fit decreasing (by a sample's
        longer side; ties in plan order), both sides bounded by ``max_len``."""
        return self._first_fit(*_side_lengths(data, indices))

    def _first_fit(self, enc: np.ndarray, dec: np.ndarray) -> list[list[int]]:
        rows: list[list[int]] = []
        room: list[tuple[int, int]] = []
        for k in np.argsort(-np.maximum(enc, dec), kind="stable").tolist():
            e, d = int(enc[k]), int(dec[k])
            r = next((r for r, (re, rd) in enumerate(room) if e <= re and d <= rd), None)
            if r is None:
                rows.append([])
                room.append((self.max_len, self.max_len))
                r = len(rows) - 1
            rows[r].append(k)
            room[r] = (room[r][0] - e, room[r][1] - d)
        return rows

    def __call__(self, data: Tokenized, indices: np.ndarray, weight: bool = True) -> dict[str, Any]:
        """The packed micro-batch of the samples ``indices``; ``weight`` False: nothing is trained
        (the zero-weight pass of a short last step, as ``data.collate``)."""
        import torch

        if not data.seq2seq:
            raise ValueError("row packing is for encoder-decoder rows; a causal LM's are packed by Packing")
        lengths = _side_lengths(data, indices)
        rows = self._first_fit(*lengths)
        count = max(len(rows), 2) if self.width else len(rows)
        width = [self.width or -(-max(int(side[row].sum()) for row in rows) // self.multiple) * self.multiple
                 for side in lengths]
        enc_ids = np.full((count, width[0]), self.pad_id, np.int64)
        dec_ids = np.full((count, width[1]), self.pad_id, np.int64)
        labels = np.full((count, width[1]), -100, np.int64)
        enc_sample = np.full((count, width[0]), -1, np.int32)
        dec_sample = np.full((count, width[1]), -1, np.int32)
        for r, row in enumerate(rows):
            at_e = at_d = 0
            for k in row:
                i = indices[k]
                src = data.ids[data.offsets[i]:data.offsets[i + 1]]
                tgt = data.labels[data.label_offsets[i]:data.label_offsets[i + 1]]
                enc_ids[r, at_e:at_e + len(src)] = src
                enc_sample[r, at_e:at_e + len(src)] = k
                dec_ids[r, at_d] = self.decoder_start
                dec_ids[r, at_d + 1:at_d + len(tgt)] = tgt[:-1]
                if weight:
                    labels[r, at_d:at_d + len(tgt)] = tgt
                dec_sample[r, at_d:at_d + len(tgt)] = k
                at_e, at_d = at_e + len(src), at_d + len(tgt)
        return {"input_ids": torch.from_numpy(enc_ids), "decoder_input_ids": torch.from_numpy(dec_ids),
                "labels": torch.from_numpy(labels), "encoder_sample": torch.from_numpy(enc_sample),
                "decoder_sample": torch.from_numpy(dec_sample)}


def _side_lengths(data: Tokenized, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The encoder-input and label lengths of the samples ``indices``."""
    return (data.offsets[indices + 1] - data.offsets[indices],
            data.label_offsets[indices + 1] - data.label_offsets[indices])


def row_masks(encoder_sample: torch.Tensor, decoder_sample: torch.Tensor) -> dict[str, torch.Tensor]:
    """The attention masks of packed encoder-decoder rows (``RowPacking``), as transformers takes
    4-D boolean masks (rows × 1 × query × key, True where attention goes) for sdpa: the encoder's
    within a sample, the decoder's within a sample and causal, the cross-attention's from a decoder
    position to its own sample's encoder positions. The padding at a row's end is a sample of its
    own on each side; a decoder padding position in a row without encoder padding sees every
    encoder position (a row of nothing to attend would be NaN), and nothing it computes is trained
    or seen by a sample."""
    import torch

    enc, dec = encoder_sample[:, None, :, None], decoder_sample[:, None, :, None]
    causal = torch.ones(dec.shape[2], dec.shape[2], dtype=torch.bool, device=dec.device).tril()
    cross = dec == encoder_sample[:, None, None, :]
    return {"attention_mask": enc == encoder_sample[:, None, None, :],
            "decoder_attention_mask": (dec == decoder_sample[:, None, None, :]) & causal,
            "cross_attention_mask": cross | ~cross.any(-1, keepdim=True)}


# --- a variable-length attention for transformers' models: torch's own FlashAttention varlen ---------

VARLEN = "sftui_varlen"  # the attn_implementation name it is registered under
BOUNDED = (VARLEN, "flash_attention_2")  # attentions that take a packed row's boundaries (varlen_kwargs)


def varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, *, kernel: Callable[..., torch.Tensor], gqa: bool, gqa_flag: bool,
                     scaling: float | None = None, dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                     max_length_q: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function over a packed row: ``kernel`` is torch's
    ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's variable-length kernel, no
    ``flash_attn`` package), each document causal and alone: no mask is built and no position
    attends across documents. ``gqa``: the kernel takes fewer key/value heads as they are (else
    they are repeated to the query's count), told so by ``enable_gqa=True`` with ``gqa_flag``.
    ``cu_seq_lens_q`` / ``max_length_q`` are transformers' names for the packed micro-batch's
    ``cu_seqlens`` / ``max_seqlen``, handed to the model's forward as keyword arguments."""
    import torch

    if cu_seq_lens_q is None or max_length_q is None or query.shape[0] != 1:
        raise ValueError(f"{VARLEN} attention takes a packed row: cu_seq_lens_q and max_length_q")
    if dropout:
        raise ValueError(f"{VARLEN} attention has no dropout")
    # Under autocast the rotary embedding leaves queries and keys in float32; the kernel takes
    # bf16/fp16 alone, and unlike SDPA it is no autocast op: cast as autocast would.
    kind = query.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else value.dtype
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (1, heads, T, dim) → (T, heads, dim)
    if not gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                 window_size=(-1, 0), **({"enable_gqa": True} if gqa_flag else {}))  # (-1, 0): causal
    return out[None], None


def register_varlen(device: Any) -> None:
    """Makes ``attn_implementation=VARLEN`` (``model.set_attn_implementation(VARLEN)``) mean
    ``varlen_attention`` over this torch's ``varlen_attn``, its signature read here, once, not
    in the traced forward; where it has no ``enable_gqa``, whether it takes fewer key/value
    heads all the same is tried on ``device`` (``takes_fewer_kv_heads``). No mask is built for
    it (transformers skips mask creation for a name it has no mask builder for)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface

    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params:  # torch 2.9's first form: is_causal, no scale
        raise ValueError(f"{VARLEN} attention needs torch.nn.attention.varlen of torch 2.10 or later "
                         f"(torch {torch.__version__} here)")
    flag = "enable_gqa" in params
    AttentionInterface.register(VARLEN, partial(varlen_attention, kernel=varlen_attn, gqa_flag=flag,
                                                gqa=flag or takes_fewer_kv_heads(varlen_attn, device)))


def takes_fewer_kv_heads(kernel: Callable[..., Any], device: Any) -> bool:
    """Whether a varlen kernel without ``enable_gqa`` (torch 2.10 and 2.11) takes fewer key/value
    heads than query heads and gives, forward and backward, what repeating them gives.
    FlashAttention's varlen kernel does so natively (each key head serves a group of query
    heads), and torch's Python wrapper of 2.11 passes them on unchecked; the repeat costs two
    copies of the keys and values per layer and the sum of their gradients. Tried once, on a
    few tokens: a kernel that refuses them or computes something else keeps the repeat."""
    import torch

    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    results = []
    try:
        q, k, v = (torch.randn(8, heads, 64, generator=gen).to(device, dtype) for heads in (4, 2, 2))
        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
        for repeat in (1, 2):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            qq, kk, vv = leaves[0], *(t.repeat_interleave(repeat, dim=1) for t in leaves[1:])
            out = kernel(qq, kk, vv, cu, cu, 5, 5, window_size=(-1, 0))
            out.float().square().sum().backward()
            results.append([out, *(t.grad for t in leaves)])
        same = all(torch.allclose(a.float(), b.float(), rtol=0.02, atol=0.02) for a, b in zip(*results))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)  # a kernel fault surfaces here, not later in training
    except Exception:  # noqa: BLE001 - a refusal is the answer
        return False
    return same


def varlen_kwargs(micro: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that carry a packed micro-batch's boundaries to the attention:
    transformers' FlashAttention names, read by its flash_attention_2 path and by ``VARLEN``."""
    return {"cu_seq_lens_q": micro["cu_seqlens"], "cu_seq_lens_k": micro["cu_seqlens"],
            "max_length_q": micro["max_seqlen"], "max_length_k": micro["max_seqlen"]}


def packs(choice: bool | None, seq2seq: bool, device: torch.device) -> bool:
    """Whether this run's micro-batches are packed: ``--packing`` / ``--no-packing`` as given; by
    default (None) for a causal LM where packed rows take ``VARLEN`` (a GPU whose torch has
    ``varlen_attn``): the worker on an H200 ran 1.22× padded at batch 32, even within noise at 16,
    296.7 samples/s at its best rung against padded's 195.4, in less memory at every batch
    (docs/BENCHMARKS.md). Elsewhere padded: packed rows under sdpa get a dense T × T mask and ran
    slower than padded (0.73× at batch 16)."""
    if choice is not None:
        return choice
    return not seq2seq and packed_attention(device) == VARLEN


@cache
def packed_attention(device: torch.device) -> str | None:
    """The attention a packed run sets (None: the model's own, sdpa, whose mask transformers
    makes block-diagonal from the position ids): ``VARLEN`` on a GPU where this torch has
    ``varlen_attn``, no padding and no T² mask (the fastest packed path measured: flex
    attention ran 0.89× of it eager after an 80 s kernel compile, sdpa 0.52×); sdpa on the CPU.
    Once per device and process: ``packs`` and ``loop.new_model`` both ask, and the registration's
    trial of the kernel runs on the GPU."""
    if device.type != "cuda":
        return None
    try:
        register_varlen(device)
    except (ImportError, ValueError):
        return None
    return VARLEN
