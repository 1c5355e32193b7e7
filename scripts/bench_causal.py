"""A causal LM as people fine-tune it, on one GPU: the HF Trainer and sftui on the same rows.

    PYTHONPATH=src python3 scripts/bench_causal.py --out OUT_DIR [--gpu 0] [--steps 200]
    .venv/bin/python scripts/bench_causal.py --smoke --out OUT_DIR     # CPU, a small shape: the script works

1. Builds a Qwen2.5-0.5B-shaped local directory: the published config (vocab 151,936, hidden 896,
   24 layers, 14 heads / 2 KV heads, tied embeddings), random weights in bf16, a byte-level BPE
   tokenizer trained with `tokenizers` on the bench rows, and a ChatML chat template (Qwen's form).
2. Rows: prompt 16–256 and response 8–256 words of a fixed word list (about a token each).
3. hf: `Trainer` (bf16, fused AdamW, clip 1.0) at batch 16 on sftui's own tokenization of the
   rows (the chat template applied, prompt masked), padded, the allocator as the user has it.
4. hf-flat: the same `Trainer` with transformers' `DataCollatorWithFlattening` (padding-free: the batch's
   rows end to end in one row, position ids restarting at each) and the model loaded with each
   attention of --hf-flat-attn (default flex_attention; "flex_attention,sdpa" runs both), one process
   each: `hf-flat-flex_attention`, `hf-flat-sdpa`. A run that fails records its error and the script
   goes on. tokens/s counts tokens that are not padding, for hf and hf-flat alike.
5. sftui: `sftui run --headless` eager at batch 16 for --steps steps (rates after the warm-up, peak
   allocated and reserved from `rank_stats`; packed or padded as sftui decides by default, the
   `padded` stage with --no-packing); `sftui probe` (with the runs' --max-steps: packed, the worst
   case is the plan's heaviest micro-batch) over a ladder that reaches past the default one; a run
   of --steps steps at the probe's recommended rung, its peak reserved against the forecast; with
   `compiled` and `compiled-recommended`, `--compile` at batch 16 and at that rung (CUDA graphs, the
   default on one GPU); `compiled-nographs`, `--compile --compile-mode default` at batch 16. MFU is the
   worker's own (DESIGN.md's definition), over the same steps as the rates; each run's `second_half` gives
   them over its second half too (CUDA graphs are recorded as a compiled run meets its shapes).
6. ratios: sftui's samples/s at the HF batch (eager, and compiled with the `compiled` stage) over the
   HF Trainer's, padded and each padding-free run's (issue 17's goals at batch 16: ≥ 6× and ≥ 2×).

Writes OUT/bench_causal.json after every stage.
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

from sftui import rundir  # noqa: E402

GIB = 1024**3
MAX_LEN = 512
SEED = 42
STARTED = time.monotonic()
CHATML = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=True)
SMOKE = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", flush=True)


def write_rows(path: Path, n: int, smoke: bool) -> None:
    rng = random.Random(SEED)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(1500)]
    top_p, top_r = (32, 16) if smoke else (256, 256)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(16, top_p)))
            response = " ".join(rng.choice(words) for _ in range(rng.randint(8, top_r)))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def build_model_dir(directory: Path, rows: Path, smoke: bool) -> None:
    """The local directory a user would point --model at."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    build_tokenizer(directory, rows, smoke)
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(Qwen2Config(**(SMOKE if smoke else QWEN_05B), torch_dtype="bfloat16"))
    model.to(torch.bfloat16).save_pretrained(directory)


def build_tokenizer(directory: Path, rows: Path, smoke: bool) -> None:
    """A byte-level BPE trained on the bench rows, with Qwen's ChatML template, saved in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [" ".join(json.loads(line).values()) for line in rows.read_text().splitlines()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024 if smoke else 8192, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    tok.save_pretrained(directory)


def hf_worker(args: argparse.Namespace) -> int:
    """HF Trainer at ``args.batch`` (16) on sftui's tokenization of the rows; one line "HF {...}".
    With ``args.lora_r``: LoRA through peft on a bf16 base, on the linear layers sftui adapts
    (alpha 2 × r), gradient checkpointing with ``args.gradient_checkpointing`` (bench_lora.py).
    With ``args.flatten``: padding-free, through ``DataCollatorWithFlattening``; ``args.attn`` is the
    model's ``attn_implementation`` (transformers' default without it). ``label_tokens`` counts the
    trained labels of the timed steps: the same rows padded or flattened give the same count."""
    import numpy as np
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening, Trainer, TrainerCallback,
                              TrainingArguments)

    from sftui import chat
    from sftui.trainer import data

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    batch, lora_r = getattr(args, "batch", None) or 16, getattr(args, "lora_r", None)
    flatten, attn = bool(getattr(args, "flatten", False)), getattr(args, "attn", None)
    rows = data.tokenize_to_cache(str(args.data), tok, args.max_len, False, False, args.out / "hf-cache", lambda f: None,
                                  chat.resolve("auto", tok).template)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return rows.n

        def __getitem__(self, i: int) -> dict[str, Any]:
            # one row alone: its own length, no padding (what DataCollatorWithFlattening needs)
            return {k: v[0] for k, v in data.collate(rows, np.array([i]), tok.pad_token_id).items()}

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(int(x["input_ids"].shape[0]) for x in items)
        fill = {"input_ids": tok.pad_token_id, "attention_mask": 0, "labels": -100}
        return {k: torch.stack([torch.nn.functional.pad(x[k], (0, width - x[k].shape[0]), value=v) for x in items])
                for k, v in fill.items()}

    marks: dict[int, float] = {}
    tokens: list[Any] = []
    labels: list[Any] = []
    losses: list[float] = []
    first, last = args.warmup, args.warmup + args.hf_steps

    class Clock(TrainerCallback):
        def on_step_end(self, targs: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step in (first, last):
                if cuda:
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    class Counting(Trainer):
        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            if first <= self.state.global_step < last:  # flattened: no attention mask, and no padding
                tokens.append(inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel())
                labels.append((inputs["labels"] != -100).sum())
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not losses:
                losses.append(float(loss))
            return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gradient_checkpointing = bool(getattr(args, "gradient_checkpointing", False))
    targs = TrainingArguments(output_dir=str(args.out / "hf-out"), per_device_train_batch_size=batch, max_steps=last,
                              gradient_checkpointing=gradient_checkpointing,
                              learning_rate=2e-5, max_grad_norm=1.0, bf16=cuda, use_cpu=not cuda,
                              optim="adamw_torch_fused" if cuda else "adamw_torch", logging_strategy="no",
                              save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                              remove_unused_columns=False, dataloader_num_workers=1, seed=SEED)
    out: dict[str, Any] = {"batch": batch, "collator": "flattening" if flatten else "padded"}
    try:  # the load too: an attention that cannot run here is a result
        net = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if lora_r and cuda else torch.float32,
                                                   **({"attn_implementation": attn} if attn else {}))
        out["attn_implementation"] = net.config._attn_implementation
        net = net.to("cuda" if cuda else "cpu")
        if lora_r:
            from peft import LoraConfig, get_peft_model

            from sftui.trainer.adapters import target_modules

            if gradient_checkpointing:
                net.enable_input_require_grads()
            net = get_peft_model(net, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, bias="none",
                                                 target_modules=target_modules(net, None), task_type="CAUSAL_LM"))
        Counting(model=net, args=targs, train_dataset=Rows(), callbacks=[Clock()],
                 data_collator=DataCollatorWithFlattening() if flatten else collate).train()
        seconds = marks[last] - marks[first]
        out.update(samples_per_s=round(batch * args.hf_steps / seconds, 1),
                   tokens_per_s=round(float(sum(int(t) for t in tokens)) / seconds),
                   label_tokens=sum(int(n) for n in labels), first_loss=round(losses[0], 4),
                   peak_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                   peak_reserved=torch.cuda.max_memory_reserved() if cuda else None)
    except Exception as e:  # noqa: BLE001 - an OOM is a result
        out["error"] = str(e).splitlines()[0][:300]
    print("HF " + json.dumps(out), flush=True)
    return 0


def window(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """samples/s, tokens/s and MFU (DESIGN.md's, as the worker reports it) over the intervals
    between these step events: each one's rates cover the steps since the one before it, so the
    window is the first event's step + 1 to the last's (``window``)."""
    pairs = list(zip(steps, steps[1:]))
    seconds = sum((b["samples_seen"] - a["samples_seen"]) / b["samples_per_s"] for a, b in pairs)
    if not seconds:
        return {"samples_per_s": None, "tokens_per_s": None, "mfu": None, "window": None}
    samples = steps[-1]["samples_seen"] - steps[0]["samples_seen"]
    tokens = sum((b["samples_seen"] - a["samples_seen"]) / b["samples_per_s"] * b["tokens_per_s"] for a, b in pairs)
    flop_s = sum((b["samples_seen"] - a["samples_seen"]) / b["samples_per_s"] * (b.get("mfu") or 0.0) for a, b in pairs)
    return {"samples_per_s": round(samples / seconds, 1), "tokens_per_s": round(tokens / seconds),
            "mfu": round(flop_s / seconds, 4) if flop_s else None,
            "window": f"steps {steps[0]['step'] + 1}–{steps[-1]['step']}"}


class Bench:
    """The stages' runs, into OUT/bench_causal.json. A report already there is added to (its stages
    stay unless run again, and each invocation's command is kept), so that the stages can be split
    over GPU calls of 10 minutes into one --out."""

    name = "bench_causal"  # OUT/NAME.json

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out
        path = self.out / f"{self.name}.json"
        self.report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.report.update(date=time.strftime("%Y-%m-%d %H:%M:%S %z"), max_len=args.max_len)
        self.report["commands"] = [*self.report.get("commands", []), shlex.join(sys.argv)]
        self.ran: set[str] = set()  # this invocation's runs: a rung the probe recommends may be one already run
        self.device = ["--cpu"] if args.smoke else ["--gpus", args.gpu]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}

    def save(self) -> None:
        (self.out / f"{self.name}.json").write_text(json.dumps(self.report, indent=2, default=str))

    def sftui(self, *args: str, log: str, timeout: float = 900, env: dict[str, str] | None = None) -> tuple[int, str]:
        say("$ sftui " + shlex.join(args) + "".join(f"  [{k}={v}]" for k, v in (env or {}).items()))
        r = subprocess.run([sys.executable, "-m", "sftui", *args], cwd=ROOT, env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=timeout)
        (self.out / f"{log}.log").write_text(r.stdout + r.stderr)
        return r.returncode, r.stdout + r.stderr

    def run(self, name: str, batch: int | str, *extra: str, env: dict[str, str] | None = None,
            steps: int | None = None) -> dict[str, Any]:
        """One headless run (a ladder of its batch alone unless ``extra`` gives one); its rates
        after the warm-up and its peaks from ``rank_stats``."""
        if name in self.ran:
            say(f"{name}: ran already in this invocation")
            return self.report[name]
        self.ran.add(name)
        run_dir = self.out / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        ladder = () if batch == "auto" or "--ladder" in extra else ("--ladder", str(batch))
        code, _ = self.sftui("run", "--headless", "--run-dir", str(run_dir), "--model", str(self.args.model_dir),
                             "--data", str(self.args.data), "--max-len", str(self.args.max_len), "--batch", str(batch), *ladder,
                             "--max-steps", str(steps or self.args.steps), "--log-every", "10",
                             "--checkpoint-every", "0", "--keep-checkpoints", "1", "--on-oom", "stop", *self.device,
                             *extra, log=name, env=env)
        evs = rundir.read_all(run_dir / "events.jsonl")
        steps = [e for e in evs if e["kind"] == "step" and e["step"] >= self.args.warmup]  # from the warm-up's last event: steps W+1..
        stats = [e for e in evs if e["kind"] == "rank_stats"]
        last = max((e["step"] for e in evs if e["kind"] == "step"), default=0)
        batches = [e["to"] for e in evs if e["kind"] == "batch_change"]
        res = {"batch": batches[-1] if batch == "auto" and batches else batch, "exit": code, "steps": last,
               "warmup": self.args.warmup, **window(steps),
               # CUDA graphs are recorded as a run meets its shapes: the second half is nearer the steady state
               "second_half": window([e for e in steps if e["step"] >= last // 2]),
               "peak_allocated": max((e["mem_peak_bytes"] or 0 for e in stats), default=None),
               "peak_reserved": max((e["mem_reserved_bytes"] or 0 for e in stats), default=None),
               "alloc_retries": sum(e.get("alloc_retries") or 0 for e in stats),
               "oom": any(e["kind"] == "oom" for e in evs),
               "allocator": next((e["message"] for e in evs if e["kind"] == "log" and "allocator" in e["message"]), None),
               "chat_format": next((e.get("chat_format") for e in evs if e["kind"] == "data"), None),
               "batches": next((e.get("batches") for e in evs if e["kind"] == "data"), None),
               "last_loss": steps[-1]["loss"] if steps else None}
        self.report[name] = res
        self.save()
        say(f"{name}: {res}")
        return res

    def against_forecast(self, probe: dict[str, Any], res: dict[str, Any], rung: int) -> None:
        """A run's peak reserved next to the probe's forecast at its rung (``forecast_error``)."""
        row = next((r for r in probe["rows"] if r["batch"] == rung), {})
        if row.get("predicted") and res.get("peak_reserved"):
            res["forecast"] = row["predicted"]
            res["forecast_error"] = round(res["peak_reserved"] / row["predicted"] - 1, 4)
            self.save()
            say(f"forecast {row['predicted'] / GIB:.2f} GiB, measured {res['peak_reserved'] / GIB:.2f} GiB "
                f"({res['forecast_error']:+.1%})")

    def probe(self, *extra: str) -> dict[str, Any] | None:
        code, text = self.sftui("probe", "--model", str(self.args.model_dir), "--data", str(self.args.data),
                                "--max-len", str(self.args.max_len), "--ladder", self.args.probe_ladder, "--json",
                                "--max-steps", str(self.args.steps),  # the runs' plan: packed, its heaviest micro-batch
                                *self.device, *extra, log="probe")
        if code != 0:
            self.report["probe"] = {"exit": code, "tail": text[-2000:]}
            self.save()
            return None
        result = json.loads(text[text.index("{"):text.rindex("}") + 1])
        self.report["probe"] = {k: result.get(k) for k in ("recommended", "rows", "points", "budget_bytes", "seconds")}
        self.save()
        say(f"probe: recommended {result.get('recommended')}")
        return result


def batch_list(text: str) -> list[int]:
    """A comma list of batch sizes (``--eager-batches``, ``--compiled-batches``)."""
    return [int(b) for b in text.split(",")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gpu", default="0")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--hf-steps", type=int, default=30)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--probe-ladder", default="128,96,64,48,32,24,16")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--max-len", type=int, default=MAX_LEN, help=argparse.SUPPRESS)
    p.add_argument("--stages", default="build,hf,hf-flat,eager,probe,recommended",
                   help="hf-flat: the HF Trainer padding-free (DataCollatorWithFlattening), once per --hf-flat-attn; "
                        "also: padded (eager batch 16 with --no-packing), alternate (eager batch 16 with "
                        "expandable segments on, off, off, on), auto (--batch auto on the default ladder), "
                        "compiled (--compile at each --compiled-batches), compiled-nographs (the same without CUDA graphs), "
                        "compiled-recommended (--compile at the probe's recommended rung; needs probe)")
    p.add_argument("--alternate-steps", type=int, default=120)
    p.add_argument("--eager-batches", type=batch_list, default=[16],
                   help="the batches of the eager and padded stages (default: 16)")
    p.add_argument("--compiled-batches", type=batch_list, default=[16],
                   help="the batches of the compiled stage (default: 16; the best rung, e.g. 16,128)")
    p.add_argument("--hf-flat-attn", default="flex_attention",
                   help="the attn_implementation of the hf-flat stage, a comma list runs each (e.g. flex_attention,sdpa)")
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--flatten", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--attn", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = args.model_dir or args.out / "qwen2.5-0.5b-shape"
    args.data = args.data or args.out / "rows.jsonl"
    if args.smoke:
        args.steps, args.warmup, args.hf_steps, args.rows, args.probe_ladder = 12, 2, 4, 200, "8,4"
        args.alternate_steps = 6
        args.eager_batches = args.compiled_batches = [4]
    if args.hf_worker:
        return hf_worker(args)
    stages = args.stages.split(",")
    bench = Bench(args)
    if "build" in stages or not args.model_dir.exists():
        write_rows(args.data, args.rows, args.smoke)
        build_model_dir(args.model_dir, args.data, args.smoke)
        say(f"built {args.model_dir} and {args.rows} rows")
    if "hf" in stages:
        hf(bench, "hf")
    if "hf-flat" in stages:
        for attn in args.hf_flat_attn.split(","):
            hf(bench, f"hf-flat-{attn}", "--flatten", "--attn", attn)
    for batch in args.eager_batches:
        if "eager" in stages:
            bench.run(f"eager-{batch}", batch)
        if "padded" in stages:
            bench.run(f"padded-{batch}", batch, "--no-packing")
    result = bench.probe() if "probe" in stages else bench.report.get("probe")  # or an earlier call's, merged
    rung = int(result["recommended"]) if result and result.get("recommended") else None
    if rung is None and {"recommended", "compiled-recommended"} & set(stages):
        say("skipped recommended, compiled-recommended: no probe recommendation (run the probe stage)")
    if rung and "recommended" in stages:
        bench.against_forecast(result, bench.run(f"eager-{rung}", rung), rung)
    if rung and "compiled-recommended" in stages:  # compiled takes less memory than the eager probe measured
        bench.run(f"compiled-{rung}", rung, "--compile")
    if "alternate" in stages:
        alternate(bench, 16 if not args.smoke else 4)
    if "auto" in stages:
        auto(bench)
    if "compiled" in stages:
        for batch in args.compiled_batches:
            bench.run(f"compiled-{batch}", batch, "--compile")
    if "compiled-nographs" in stages:  # the same without CUDA graphs: what they are worth, in one run
        bench.run("compiled-nographs-16", 16 if not args.smoke else 4, "--compile", "--compile-mode", "default")
    bench.report["ratios"] = ratios(bench.report)
    bench.save()
    say(f"ratios: {bench.report['ratios']}")
    say("done")
    return 0


def hf(bench: Bench, name: str, *extra: str) -> None:
    """``hf_worker`` in a process of its own (a fresh CUDA context, its own peak memory), at batch 16
    (4 in the smoke, the eager stage's); its line of figures as report[NAME], its output as OUT/NAME.log."""
    args = bench.args
    cmd = [sys.executable, __file__, "--hf-worker", "--out", str(args.out), "--model-dir", str(args.model_dir),
           "--data", str(args.data), "--max-len", str(args.max_len), "--warmup", str(args.warmup),
           "--hf-steps", str(args.hf_steps), "--batch", "4" if args.smoke else "16", *extra]
    env = {k: v for k, v in bench.env.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if not args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = args.gpu
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    (args.out / f"{name}.log").write_text(r.stdout + r.stderr)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("HF ")), None)
    bench.report[name] = json.loads(line[3:]) if line else {"exit": r.returncode, "tail": (r.stdout + r.stderr)[-2000:]}
    bench.save()
    say(f"{name}: {bench.report[name]}")


def ratios(report: dict[str, Any]) -> dict[str, float]:
    """sftui's samples/s, eager and compiled, over each HF stage's at the same batch
    ("compiled-16/hf-flat-sdpa"), where both ran: issue 17's goals are ≥ 6× the HF Trainer and
    ≥ 2× the padding-free HF Trainer at batch 16."""
    out = {}
    for name, hf_res in report.items():
        if name == "hf" or name.startswith("hf-flat-"):
            for ours in (f"{mode}-{hf_res.get('batch')}" for mode in ("eager", "compiled")):
                rate, theirs = (report.get(ours) or {}).get("samples_per_s"), hf_res.get("samples_per_s")
                if rate and theirs:
                    out[f"{ours}/{name}"] = round(rate / theirs, 2)
    return out


def alternate(bench: Bench, batch: int) -> None:
    """Eager at one batch with the allocator's expandable segments on (sftui's default) and off,
    in the order on, off, off, on: a drift of the card over the stage falls on both alike."""
    off = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for i, mode in enumerate(("on", "off", "off", "on")):
        res = bench.run(f"alt{i}-{mode}-{batch}", batch, env=off if mode == "off" else None,
                        steps=bench.args.alternate_steps)
        rates[mode].append(res["samples_per_s"] or 0.0)
    bench.report["alternate"] = {mode: {"runs": r, "mean": round(sum(r) / len(r), 1)} for mode, r in rates.items()}
    bench.save()
    say(f"alternate: {bench.report['alternate']}")


def auto(bench: Bench) -> None:
    """``--batch auto`` on the default ladder (16,12,8): where it starts, and the forecast there
    against the run's own peak reserved."""
    res = bench.run("auto", "auto")
    probe = json.loads((bench.out / "run-auto" / "forecast.json").read_text())
    row = next((r for r in probe["rows"] if r["batch"] == res["batch"]), {})
    res.update(largest_fitting=probe.get("largest_fitting"), ladder_recommended=probe.get("recommended"),
               points=probe.get("points"), forecast=row.get("predicted"), band=row.get("band"))
    if row.get("predicted") and res.get("peak_reserved"):
        res["forecast_error"] = round(res["peak_reserved"] / row["predicted"] - 1, 4)
    bench.save()
    say(f"auto: started at {res['batch']}, forecast {res.get('forecast')}, measured {res.get('peak_reserved')}, "
        f"error {res.get('forecast_error')}")


if __name__ == "__main__":
    sys.exit(main())
