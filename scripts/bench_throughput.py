"""Worker throughput against the HF Seq2SeqTrainer, MFU, packed against padded, supervisor overhead and OOM recovery.

    PYTHONPATH=src python3 scripts/bench_throughput.py --out OUT_DIR [--compile] [--batches 8,16,auto]
        [--packing both|off|only] [--warmup 5] [--steps 30] [--budget-s 330] [--gpu 0]
    .venv/bin/python scripts/bench_throughput.py --smoke --out OUT_DIR   # CPU, a tiny T5: the script works

One GPU, one model (chatlm-mini; with --smoke a tiny T5 written to OUT/smoke-t5, or the `tiny`
causal preset with --smoke-model tiny), one synthetic data file (prompt 16–256 and response 8–256
characters = tokens: a character tokenizer), max-len 256, bf16:

a. HF: `Seq2SeqTrainer` (fused AdamW, clip 1.0, no eval, saving or logging) at each batch, in
   one child process; the same tokenized rows (sftui's own tokenizer and cache), the same model.
b. sftui: the real command line, `sftui run --headless`, eager (`eager-B`) and with --compile
   (`compiled-B`, static shapes), both padded (`--no-packing`); rates from the `step` events after
   the warm-up steps, peak memory from `rank_stats`. MFU for both sides by sftui's own definition
   (flops.mfu: real tokens only, so packed and padded count the same work). With --packing both
   (the default) or only, the same runs with `--packing` (`eager-B-packed`, `compiled-B-packed`: a
   T5 micro-batch in rows of --max-len, first fit decreasing, 4-D masks keeping each sample to itself; issue
   17), each right after its padded twin, with the same figures. `batches` in each run's result is
   its `data` event's ("padded" / "packed": what the worker did, not what was asked). JSON
   `packing.vs_padded` (and the markdown's packing table): per batch and mode, packed ÷ padded
   samples/s, MFU and peak reserved, and the largest relative gap between the two runs' per-step
   losses over their common logged steps (same seed, rows and plan, so the steps align: packing
   changes the layout, not the samples; the compiled-vs-eager gap of the same batch is beside it
   as the bf16 noise reference); `packing.vs_hf`: each sftui variant ÷ HF at each batch HF ran,
   issue 17's packed compiled ÷ HF at batch 16 among them; `packing.best_mfu`: the best rung.
c. Supervisor overhead: the same eager run started as a bare rank (launch.start_attempt on a
   copy of the supervised run's run.json), without the supervisor tailing and sampling (the
   padded eager run; the packed one with --packing only).
d. OOM recovery (OOM event -> the first step of attempt 2), compile off and on, from
   `--inject-oom-at-step` (step --inject-at, default 40, 5 with --smoke: see its help), each also with
   SFTUI_STANDBY=0 in the supervisor's environment (`oom-eager-cold`, `oom-compiled-cold`,
   `oom-layers-cold`: the next attempt's ranks are not started ahead), so that one run shows warm
   against cold. Figures from scripts/recovery.py (as bench_multi_gpu and bench_lora): recovery_s,
   oom_to_attempt_start_s, oom_to_rank_start_s (what the ranks started ahead save), teardown_s,
   warm (attempt 2's attempt_start), oom_after_rank_start_s (the standby's head start), a timeline
   of attempt 2's events; and `standby_saved_s`, cold minus warm recovery per pair. The compiled
   runs share one compile cache, and the worker marks the batch dimension dynamic, so warm and
   cold attempt 2s should load the same graphs (compile_logs shows what each did). These runs take
   the worker's default layout (padded for a T5; --oom-packed: --packing) and the ladder 16,12
   (--oom-ladder).

Timed window: steps W+1..W+K of each run (W = --warmup). Stages run in order of importance (the
speed runs batch by batch, the issue's batch 16 first: compiled padded, compiled packed, eager
padded, eager packed) and a stage is skipped when it would end past --budget-s. Writes
OUT/bench_throughput.json after every stage and OUT/bench_throughput.md (a section for
docs/BENCHMARKS.md) at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recovery import NoRecovery, recovery_figures, recovery_line  # noqa: E402

from sftui import launch, rundir  # noqa: E402
from sftui.config import COMPILE_MODES, is_seq2seq  # noqa: E402
from sftui.runfile import RunFile  # noqa: E402

GIB = 1024**3
MAX_LEN = 256
SEED = 42
ALPHABET = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么"
            "心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样")
# Rough seconds per stage on an H100/H200 (imports, model build, checkpoint at the end included):
# a stage is started only when it fits the budget.
# The oom stages: warm and cold alike (the cold recovery is some 6 s longer); "oom" with the default
# --inject-at 40 (some 40 eager steps at batch 16, ~0.2 s each, before the OOM).
# Packed runs (--packing), not yet measured on a GPU: as their padded twins; the first compiled packed
# run compiles graphs of its own (4-D masks, the row count dynamic), so it is "cold" as well.
COST = {"eager": 35, "compiled_cold": 190, "compiled": 50, "direct": 30, "oom": 60, "oom_compiled": 90,
        "eager_packed": 35, "compiled_packed_cold": 190, "compiled_packed": 50}
# --packing: which layouts the speed runs take (False: padded, True: packed), in the order they run.
LAYOUTS = {"off": (False,), "both": (False, True), "only": (True,)}
# A loss gap above this (relative, any common step) is more than bf16 noise: the report says TOO LARGE.
LOSS_TOLERANCE = 0.03
# The OOM-recovery stages, in order of importance: name -> (--compile, more flags, SFTUI_STANDBY=0).
OOM_STAGES = {"oom-eager": (False, (), False), "oom-eager-cold": (False, (), True),
              "oom-compiled": (True, (), False), "oom-compiled-cold": (True, (), True),
              "oom-layers": (True, ("--compile-layers",), False), "oom-layers-cold": (True, ("--compile-layers",), True)}
OOM_LADDER = {False: "16,12", True: "8,6"}  # the oom stages' default ladder, by --smoke
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", flush=True)


def write_data(path: Path, rows: int) -> None:
    """The issue's synthetic rows: prompt 16–256 and response 8–256 characters."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            prompt = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(16, 256)))
            response = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(8, 256)))
            f.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")


# --- a. the HF Trainer, in a child process ---------------------------------------------------------


def hf_worker(args: argparse.Namespace) -> int:
    """Seq2SeqTrainer at each batch; one JSON line per batch on stdout ("HF {...}")."""
    import numpy as np
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from sftui.config import default_lr
    from sftui.rows import char_counts
    from sftui.trainer import data, flops, loop, model as models

    cuda = torch.cuda.is_available()
    work = args.out / "hf"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if models.is_preset(args.model):
        models.build_char_tokenizer(char_counts(str(args.data), False), work / "tokenizer", models.max_vocab(args.model))
        tok = models.load_tokenizer(work / "tokenizer", preset=True)
    else:  # a local directory (--smoke's T5) brings its own tokenizer, as sftui reads it
        tok = models.load_tokenizer(args.model)
    seq2seq = is_seq2seq(args.model)
    rows = data.tokenize_to_cache(str(args.data), tok, MAX_LEN, seq2seq, False, work / "cache", lambda f: None)

    class Rows(torch.utils.data.Dataset):
        """sftui's tokenized rows, one at a time, through sftui's own collate (same labels)."""

        def __len__(self) -> int:
            return rows.n

        def __getitem__(self, i: int) -> dict[str, list[int]]:
            return {k: v[0].tolist() for k, v in data.collate(rows, np.array([i]), tok.pad_token_id).items()}

    counts: list[tuple[Any, Any]] = []

    class Counting(Seq2SeqTrainer):
        """Counts each step's real tokens on the device (read once, at the end: no sync)."""

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            real = inputs["attention_mask"].sum()
            counts.append((real, (inputs["labels"] != -100).sum()) if seq2seq else (real * 0, real))
            return super().training_step(model, inputs, num_items_in_batch)

    marks: dict[int, tuple[float, int]] = {}
    first, last = args.warmup, args.warmup + args.steps

    class Clock(TrainerCallback):
        def on_step_end(self, targs: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step in (first, last):
                if cuda:
                    torch.cuda.synchronize()
                marks[state.global_step] = (time.perf_counter(), len(counts))

    peak_tflops = flops.peak_tflops(cuda)
    for batch in args.batches:
        counts.clear()
        marks.clear()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        net = models.build_model(args.model, tok, SEED, MAX_LEN, "cuda" if cuda else "cpu")
        fpt = flops.flops_per_token(net, seq2seq)
        targs = Seq2SeqTrainingArguments(
            output_dir=str(work / "out"), per_device_train_batch_size=batch, max_steps=last,
            learning_rate=default_lr(args.model), weight_decay=0.0, max_grad_norm=1.0, bf16=cuda,
            optim="adamw_torch_fused" if cuda else "adamw_torch", logging_strategy="no", save_strategy="no",
            eval_strategy="no", report_to="none", dataloader_num_workers=1, dataloader_pin_memory=cuda,
            remove_unused_columns=False, seed=SEED, disable_tqdm=True, use_cpu=not cuda,
        )
        trainer = Counting(model=net, args=targs, train_dataset=Rows(), callbacks=[Clock()],
                           data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
        out: dict[str, Any] = {"batch": batch}
        try:
            trainer.train()
            seconds = marks[last][0] - marks[first][0]
            window = counts[marks[first][1]:marks[last][1]]
            enc = float(sum(int(e) for e, _ in window))
            dec = float(sum(int(d) for _, d in window))
            # HF runs the LM head on every decoder position: its "trained" tokens are all of them.
            rates = {"samples": batch * args.steps / seconds, "enc_tokens": enc / seconds, "dec_tokens": dec / seconds,
                     "trained_tokens": dec / seconds}
            out.update(samples_per_s=round(rates["samples"], 2), tokens_per_s=round((enc + dec) / seconds, 1),
                       ms_per_step=round(seconds / args.steps * 1000, 1),
                       mfu=flops.mfu(rates, fpt, net.config, peak_tflops, 1),
                       peak_reserved=torch.cuda.max_memory_reserved() if cuda else None,
                       peak_allocated=torch.cuda.max_memory_allocated() if cuda else None)
        except Exception as e:  # noqa: BLE001 - an OOM at a large batch is a result
            out.update(error=str(e).splitlines()[0][:300], oom=loop.is_oom(e))
        print("HF " + json.dumps(out), flush=True)
        del trainer, net
        gc.collect()
    return 0


# --- b.-d. the sftui worker through its command line -------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out
        self.report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": shlex.join(sys.argv),
                                       "model": args.model, "max_len": MAX_LEN, "warmup": args.warmup,
                                       "steps": args.steps, "hf": {}, "sftui": {}, "skipped": []}
        self.device = ["--cpu"] if args.smoke else ["--gpus", args.gpu]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1",
                    # one compile cache for every compiled run of the bench: the first pays for it
                    "SFTUI_COMPILE_CACHE": str(self.out / "compile-cache")}

    def save(self) -> None:
        (self.out / "bench_throughput.json").write_text(json.dumps(self.report, indent=2, default=str))

    def fits(self, name: str, cost: float) -> bool:
        if time.monotonic() - STARTED + cost <= self.args.budget_s:
            return True
        say(f"skipped {name}: ~{cost:.0f} s would pass --budget-s {self.args.budget_s:.0f}")
        self.report["skipped"].append(name)
        self.save()
        return False

    def timeout(self) -> float:
        return max(30.0, self.args.budget_s + 90 - (time.monotonic() - STARTED))

    def hf(self, batches: list[int]) -> None:
        cmd = [sys.executable, __file__, "--hf-worker", "--out", str(self.out), "--data", str(self.args.data),
               "--model", self.args.model, "--batches", ",".join(map(str, batches)), "--warmup", str(self.args.warmup),
               "--steps", str(self.args.steps)] + (["--smoke"] if self.args.smoke else [])
        say(f"HF Seq2SeqTrainer at {batches}")
        env = dict(self.env, CUDA_VISIBLE_DEVICES="" if self.args.smoke else self.args.gpu)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        deadline = time.monotonic() + self.timeout()
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("HF "):
                res = json.loads(line[3:])
                self.report["hf"][str(res["batch"])] = res
                self.save()
                say(f"HF batch {res['batch']}: {res.get('samples_per_s')} samples/s, mfu {res.get('mfu')}, "
                    f"{res.get('error', '')}")
            if time.monotonic() > deadline:
                proc.kill()
                break
        proc.wait()
        (self.out / "hf.log").write_text("".join(lines))
        if proc.returncode:
            say(f"HF worker exit {proc.returncode}; see {self.out / 'hf.log'}:\n" + "".join(lines[-15:]))

    def mode_flags(self, compile_: bool) -> list[str]:
        """A compiled run's --compile-mode as given to this script (none: the worker's own choice)."""
        return ["--compile-mode", self.args.compile_mode] if compile_ and self.args.compile_mode else []

    def flags(self, batch: int, ladder: str, steps: int) -> list[str]:
        return ["--model", self.args.model, "--data", str(self.args.data), "--max-len", str(MAX_LEN), "--seed", str(SEED),
                "--batch", str(batch), "--ladder", ladder, "--max-steps", str(steps), "--log-every",
                str(self.args.log_every), "--checkpoint-every", "0", "--keep-checkpoints", "1", *self.device]

    def sftui(self, name: str, extra: list[str], env: dict[str, str] | None = None) -> tuple[Path, int, float]:
        """`sftui run --headless` into OUT/run-NAME, ``env`` added to the supervisor's environment."""
        run_dir = self.out / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        args = ["run", "--headless", "--run-dir", str(run_dir), *extra]
        say("$ " + "".join(f"{k}={v} " for k, v in (env or {}).items()) + shlex.join(["sftui", *args]))
        t0 = time.monotonic()
        try:
            r = subprocess.run([sys.executable, "-m", "sftui", *args], cwd=ROOT, env={**self.env, **(env or {})},
                               capture_output=True, text=True, timeout=self.timeout())
            code, text = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            code, text = 124, f"{e.stdout or ''}{e.stderr or ''}\ntimed out"
        (self.out / f"{name}.log").write_text(text if isinstance(text, str) else text.decode(errors="replace"))
        return run_dir, code, time.monotonic() - t0

    def throughput(self, name: str, batch: int, compile_: bool, more: tuple[str, ...] = (),
                   packed: bool = False) -> dict[str, Any]:
        """A speed run: ``packed`` adds --packing, else --no-packing (padded, whatever the model's
        default); ``batches`` in the result is what the run's `data` event says it did."""
        extra = self.flags(batch, str(batch), self.args.warmup + self.args.steps) + ["--on-oom", "stop", *more]
        extra += ["--packing" if packed else "--no-packing", *(["--compile"] if compile_ else []), *self.mode_flags(compile_)]
        run_dir, code, seconds = self.sftui(name, extra)
        res = {"batch": batch, "compile": compile_, "packing": packed, "exit": code,
               "flags": [*more, *self.mode_flags(compile_)], "wall_s": round(seconds, 1),
               **summarize(run_dir, self.args.warmup)}
        self.report["sftui"][name] = res
        self.save()
        say(f"sftui {name}: exit {code}, {res.get('batches')} batches, {res.get('samples_per_s')} samples/s, "
            f"mfu {res.get('mfu')}, peak {(res.get('peak_reserved') or 0) / GIB:.2f} GiB, {seconds:.0f} s wall")
        if res.get("batches") != ("packed" if packed else "padded"):
            say(f"WARNING {name}: asked for {'packed' if packed else 'padded'} batches, the data event says "
                f"{res.get('batches')!r}")
        return res

    def direct(self, name: str, supervised: str) -> None:
        """The supervised run's rank again, started bare: run.json as the supervisor wrote it."""
        src = self.out / f"run-{supervised}"
        shutil.rmtree(self.out / f"run-{name}", ignore_errors=True)
        run = rundir.create(self.out / f"run-{name}")
        spec = RunFile.read(rundir.RunDir(src))
        dataclasses.replace(spec, attempt=1, status="running", request_seq=0, supervisor_pid=os.getpid(),
                            socket=None).write(run)
        say(f"bare rank of {supervised} (no supervisor)")
        t0 = time.monotonic()
        att = launch.start_attempt(run, 1, 1, gpus=None if self.args.smoke else [int(self.args.gpu)])
        deadline = time.monotonic() + self.timeout()
        while att.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        if att.running():
            att.terminate()
        att.wait_logs()
        res = {"exit": att.poll(), "wall_s": round(time.monotonic() - t0, 1), **summarize(run.path, self.args.warmup)}
        self.report["sftui"][name] = res
        self.save()
        say(f"bare rank: exit {res['exit']}, {res.get('samples_per_s')} samples/s")

    def oom_recovery(self, name: str, compile_: bool, more: tuple[str, ...] = (), cold: bool = False) -> None:
        """An injected OOM at --inject-at, --on-oom auto one rung down, three steps after it; ``cold``:
        SFTUI_STANDBY=0 in the supervisor's environment (the next attempt's ranks start from nothing).
        Figures: scripts/recovery.py."""
        at, ladder = self.args.inject_at, self.args.oom_ladder
        extra = self.flags(ladder[0], ",".join(map(str, ladder)), at + 3)
        extra += ["--on-oom", "auto", "--inject-oom-at-step", str(at), *more] + (["--compile"] if compile_ else [])
        extra += ["--packing"] if self.args.oom_packed else []
        extra += self.mode_flags(compile_)
        run_dir, code, seconds = self.sftui(name, extra, {"SFTUI_STANDBY": "0"} if cold else None)
        evs = rundir.read_all(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "final", ignore_errors=True)
        res: dict[str, Any] = {"exit": code, "compile": compile_, "standby": "off" if cold else "on", "ladder": ladder,
                               "packing": self.args.oom_packed,
                               "flags": [*more, *self.mode_flags(compile_)],
                               "inject_at": at, "wall_s": round(seconds, 1)}
        try:
            res.update(recovery_figures(evs))
        except NoRecovery as e:
            res.update(recovery_s=None, oom_to_attempt_start_s=None, warm=None, failed=str(e))
        res["compile_logs"] = [e["message"] for e in evs if e["kind"] == "log" and "torch.compile" in e["message"]]
        self.report.setdefault("oom_recovery", {})[name] = res
        self.save()
        say(f"OOM recovery {name}: {recovery_line(res)} (exit {code})")


def summarize(run_dir: Path, warmup: int) -> dict[str, Any]:
    """Rates over the step events after step ``warmup``: each covers the steps since the one
    before it, so seconds = its samples / its samples_per_s."""
    evs = rundir.read_all(run_dir / "events.jsonl")
    steps = sorted((e for e in evs if e["kind"] == "step"), key=lambda e: e["step"])
    seconds = samples = tokens = flops = 0.0
    for prev, cur in zip(steps, steps[1:]):
        if prev["step"] < warmup or not cur.get("samples_per_s"):
            continue
        n = cur["samples_seen"] - prev["samples_seen"]
        s = n / cur["samples_per_s"]
        seconds, samples, tokens = seconds + s, samples + n, tokens + cur["tokens_per_s"] * s
        flops += (cur.get("mfu") or 0.0) * s
    for heavy in ("checkpoints", "final"):  # ~3 GB a run for chatlm-mini: the disk is not the subject
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    stats = [e for e in evs if e["kind"] == "rank_stats"]
    end = next((e for e in reversed(evs) if e["kind"] == "run_end"), None)
    data_ev = next((e for e in evs if e["kind"] == "data"), None)
    out: dict[str, Any] = {
        "batches": data_ev and data_ev.get("batches"),  # "padded" / "packed": what the worker decided
        "loss": {e["step"]: e["loss"] for e in steps},
        "peak_reserved": max((e.get("mem_reserved_bytes") or 0 for e in stats), default=None),
        "peak_allocated": max((e.get("mem_peak_bytes") or 0 for e in stats), default=None),
        "end": end and end.get("status"),
        "logs": [e["message"] for e in evs if e["kind"] == "log"][:20],
    }
    if seconds:
        n_steps = steps[-1]["step"] - warmup
        out.update(samples_per_s=round(samples / seconds, 2), tokens_per_s=round(tokens / seconds, 1),
                   ms_per_step=round(seconds / max(1, n_steps) * 1000, 1),
                   mfu=round(flops / seconds, 4) if any(e.get("mfu") for e in steps) else None)
    return out


def loss_check(ref: dict[str, Any], other: dict[str, Any], after: int = 0) -> dict[str, Any] | None:
    """The largest relative gap between two runs' logged losses at the same steps after step
    ``after`` (same data, same order, same batch): bf16 and dropout noise only (chatlm-mini trains
    with T5's dropout 0.1, and two layouts or two compilers draw other masks), or something is
    wrong. ``worst_step``: where it is."""
    common = sorted(s for s in ref.get("loss", {}) if s in other.get("loss", {}) and s > after)
    if not common:
        return None
    gaps = {s: abs(other["loss"][s] - ref["loss"][s]) / abs(ref["loss"][s]) for s in common}
    worst = max(common, key=gaps.__getitem__)
    return {"steps": common, "max_rel_gap": float(f"{gaps[worst]:.3g}"), "worst_step": worst,
            "ok": gaps[worst] <= LOSS_TOLERANCE}


def variant(mode: str, batch: int, packed: bool) -> str:
    """A speed run's name: eager-16, compiled-192-packed."""
    return f"{mode}-{batch}" + ("-packed" if packed else "")


def packing_summary(rep: dict[str, Any], layouts: tuple[bool, ...]) -> dict[str, Any]:
    """Packed against padded, per batch and mode (samples/s, MFU and peak reserved as packed ÷
    padded; the largest loss gap over the common logged steps, also stored in the packed run's
    result as ``loss_vs_padded``), every variant ÷ HF at each batch HF ran (issue 17: compiled
    at 16 ≥ 8×) and the best MFU of the speed runs (issue 17: ≥ 25 %)."""
    runs, hf = rep["sftui"], rep["hf"]

    def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
        return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None

    vs_padded: dict[str, Any] = {}
    vs_hf: dict[str, Any] = {}
    for b in rep["batches"]:
        for mode in ("compiled", "eager"):
            pad, pk = runs.get(variant(mode, b, False)), runs.get(variant(mode, b, True))
            if not pk:
                continue
            entry: dict[str, Any] = {"batch": b, "mode": mode, "batches": pk.get("batches"),
                                     "padded_batches": pad.get("batches") if pad else None}
            if pad:
                entry.update(samples_per_s=ratio(pk, pad, "samples_per_s"), mfu=ratio(pk, pad, "mfu"),
                             peak_reserved=ratio(pk, pad, "peak_reserved"))
                if chk := loss_check(pad, pk):
                    entry["loss"] = pk["loss_vs_padded"] = chk
            vs_padded[variant(mode, b, False)] = entry
        if (h := hf.get(str(b), {}).get("samples_per_s")):
            vs_hf[str(b)] = {name: round(runs[name]["samples_per_s"] / h, 2)
                             for name in (variant(m, b, packed) for m in ("compiled", "eager") for packed in (False, True))
                             if runs.get(name, {}).get("samples_per_s")}
    speed = {name: r for name, r in runs.items()
             if r.get("mfu") and name.split("-")[0] in ("compiled", "eager") and r.get("exit") == 0}
    best = max(speed, key=lambda n: speed[n]["mfu"], default=None)
    return {"layouts": ["packed" if x else "padded" for x in layouts], "vs_padded": vs_padded, "vs_hf": vs_hf,
            "best_mfu": {"run": best, "mfu": speed[best]["mfu"]} if best else None}


def padding_share(path: Path, seq2seq: bool) -> float:
    """Real tokens over the positions of batches padded to --max-len (on both sides of an
    encoder-decoder; BOS + prompt + response + EOS in one row of a causal LM)."""
    real = rows = 0
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            p, q = len(r["prompt"]), len(r["response"])
            real += min(p + 1, MAX_LEN) + min(q + 1, MAX_LEN) if seq2seq else min(p + q + 2, MAX_LEN)
            rows += 1
    return real / (rows * MAX_LEN * (2 if seq2seq else 1))


def markdown(report: dict[str, Any]) -> str:
    def g(x: Any, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        return "n/a" if x is None else fmt.format(x / scale)

    lines = [f"## Worker throughput against the HF Seq2SeqTrainer (issue 7) — {report.get('card', 'CPU')}", "",
             f"Date: {report['date']}. Command: `{report['command']}`.", "",
             f"{report['model']}, max-len {MAX_LEN}, synthetic rows (prompt 16–256, response 8–256 tokens), "
             f"rates over steps {report['warmup'] + 1}–{report['warmup'] + report['steps']}. Real tokens are "
             f"{report['real_share'] * 100:.0f} % of the positions of batches padded to --max-len (MFU counts real "
             "tokens only).", "",
             "| batch | HF samples/s | HF MFU | HF peak GiB | sftui eager samples/s | MFU | peak GiB | eager/HF | "
             "sftui compiled samples/s | MFU | peak GiB | compiled/HF |", "|" + "---|" * 12]
    for b in report["batches"]:
        hf = report["hf"].get(str(b), {})
        e = report["sftui"].get(f"eager-{b}", {})
        c = report["sftui"].get(f"compiled-{b}", {})
        ratio = (lambda x: g(x.get("samples_per_s") / hf["samples_per_s"], fmt="{:.2f}×")
                 if x.get("samples_per_s") and hf.get("samples_per_s") else "n/a")
        pct = (lambda x: g(x, 0.01, "{:.1f} %"))
        lines.append(f"| {b} | {g(hf.get('samples_per_s'))} | {pct(hf.get('mfu'))} | {g(hf.get('peak_reserved'), GIB, '{:.2f}')} "
                     f"| {g(e.get('samples_per_s'))} | {pct(e.get('mfu'))} | {g(e.get('peak_reserved'), GIB, '{:.2f}')} "
                     f"| {ratio(e)} | {g(c.get('samples_per_s'))} | {pct(c.get('mfu'))} "
                     f"| {g(c.get('peak_reserved'), GIB, '{:.2f}')} | {ratio(c)} |")
    for name, r in report["sftui"].items():
        if name.startswith("grouped-") and r.get("samples_per_s"):
            hf = report["hf"].get(name.split("-")[1], {})
            ratio = f", {r['samples_per_s'] / hf['samples_per_s']:.2f}× HF" if hf.get("samples_per_s") else ""
            lines.append(f"- sftui eager with `--group-by-length` at batch {r['batch']}: {g(r['samples_per_s'])} "
                         f"samples/s, MFU {g(r.get('mfu'), 0.01, '{:.1f} %')}, peak "
                         f"{g(r.get('peak_reserved'), GIB, '{:.2f}')} GiB{ratio}.")
    lines += packing_markdown(report, g)
    over = report.get("overhead")
    if over:
        lines += ["", f"- Supervisor overhead (batch {over['batch']}, {over.get('run', 'eager')}): {over['supervised']} "
                      f"samples/s under `sftui run --headless`, {over['bare']} as a bare rank: "
                      f"{over['overhead_pct']:+.2f} %."]
    for name, r in report.get("oom_recovery", {}).items():
        how = ("on, " + " ".join(r["flags"])) if r.get("flags") else ("on" if r["compile"] else "off")
        warm = {True: "warm: its ranks started ahead", False: "cold: its ranks started after the OOM"}.get(
            r.get("warm"), "warm: not in the events")
        layout = f"ladder {','.join(map(str, r.get('ladder', OOM_LADDER[False].split(','))))}" \
                 f"{', packed' if r.get('packing') else ''}"
        lines.append(f"- OOM recovery ({name}), {layout}, compile {how}, standby {r.get('standby', 'on')}, OOM injected at step "
                     f"{r.get('inject_at', 3)}, {g(r.get('oom_after_rank_start_s'))} s after attempt 1's rank_start: "
                     f"{g(r['recovery_s'])} s from the `oom` event to the first step of attempt 2 (attempt 2 {warm}; "
                     f"{g(r.get('oom_to_attempt_start_s'))} s to its start, {g(r.get('oom_to_rank_start_s'))} s to its "
                     f"ranks' rank_start, teardown {g(r.get('teardown_s'))} s).")
    for name, saved in report.get("standby_saved_s", {}).items():
        lines.append(f"- Ranks started ahead, {name} against {name}-cold: {saved:+.1f} s of recovery saved.")
    for b, chk in report.get("loss_check", {}).items():
        batch, _, packed = b.partition("-")
        lines.append(f"- Loss, compiled vs eager{' (packed)' if packed else ''} at batch {batch}: largest relative gap "
                     f"{chk['max_rel_gap'] * 100:.3g} % over steps {chk['steps']} ({'ok' if chk['ok'] else 'TOO LARGE'}).")
    if report["skipped"]:
        lines.append(f"- Skipped for time: {', '.join(report['skipped'])}.")
    return "\n".join(lines) + "\n"


def packing_markdown(report: dict[str, Any], g: Any) -> list[str]:
    """The packing table (packed beside padded, per batch and mode) and issue 17's two figures."""
    pk = report.get("packing")
    if not pk:
        return []
    runs, pct = report["sftui"], (lambda x: g(x, 0.01, "{:.1f} %"))
    how = ("an encoder-decoder's micro-batch in rows of --max-len, first fit decreasing, masks keeping each sample to itself"
           if report.get("seq2seq") else "a causal LM's micro-batch in one row, each sample attending to itself")
    lines = ["", f"Packed (`--packing`: {how}) against padded (`--no-packing`), same seed, rows and steps; the loss "
                 "gap is the largest "
                 "relative difference of the two runs' logged per-step losses (bf16 and dropout noise: compare the "
                 "compiled-vs-eager gap below).", "",
             "| batch | mode | data event | samples/s padded → packed | packed/padded | MFU padded → packed | "
             "peak GiB padded → packed | packed/HF | loss gap (steps) |", "|" + "---|" * 9]
    for b in report["batches"]:
        for mode in ("compiled", "eager"):
            pad, pkd = runs.get(variant(mode, b, False), {}), runs.get(variant(mode, b, True))
            if pkd is None:
                continue
            cmp_ = pk["vs_padded"].get(variant(mode, b, False), {})
            chk = cmp_.get("loss")
            gap = (f"{chk['max_rel_gap'] * 100:.3g} % ({len(chk['steps'])}){'' if chk['ok'] else ' TOO LARGE'}"
                   if chk else "n/a")
            seen = pkd.get("batches") if pkd.get("batches") == "packed" else f"**{pkd.get('batches')}** (not packed)"
            hf = pk["vs_hf"].get(str(b), {}).get(variant(mode, b, True))
            lines.append(f"| {b} | {mode} | {seen} | {g(pad.get('samples_per_s'))} → {g(pkd.get('samples_per_s'))} "
                         f"| {g(cmp_.get('samples_per_s'), fmt='{:.2f}×')} | {pct(pad.get('mfu'))} → {pct(pkd.get('mfu'))} "
                         f"| {g(pad.get('peak_reserved'), GIB, '{:.2f}')} → {g(pkd.get('peak_reserved'), GIB, '{:.2f}')} "
                         f"| {g(hf, fmt='{:.2f}×')} | {gap} |")
    best, mid = pk.get("best_mfu"), 16 if 16 in report["batches"] else report["batches"][0]
    at_mid = pk["vs_hf"].get(str(mid), {})
    if best or at_mid:
        lines.append("")
    if best:
        lines.append(f"- Issue 17: best MFU {pct(best['mfu'])} ({best['run']}; target ≥ 25 %).")
    if at_mid:
        lines.append(f"- Issue 17: at batch {mid}, over HF: " + ", ".join(f"{name} {r:.2f}×" for name, r in at_mid.items())
                     + " (target: ≥ 8×, compiled, in the layout sftui uses for a T5 by default: padded).")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps: the script works (no claims)")
    p.add_argument("--smoke-model", choices=("t5", "tiny"), default="t5",
                   help="--smoke's model: t5 (default): a ~0.1M-parameter T5 without dropout written to "
                        "OUT/smoke-t5 with the data's character tokenizer, the encoder-decoder path "
                        "(chatlm-mini's, rows of --max-len when packed) and a strict packed-vs-padded loss check; "
                        "tiny: the causal preset (one packed row per micro-batch)")
    p.add_argument("--compile", action="store_true", help="also the compiled sftui worker (GPU)")
    p.add_argument("--packing", choices=tuple(LAYOUTS), default="both",
                   help="the layouts of the speed runs (b): both (default): each batch and mode padded "
                        "(--no-packing: eager-B, compiled-B) and then packed (--packing: eager-B-packed, "
                        "compiled-B-packed; a T5 in rows of --max-len), with packed ÷ padded samples/s, MFU, "
                        "peak and the largest per-step loss gap in the report; off: padded only (as before "
                        "packing); only: packed only (no grouped run, the bare rank from the packed run)")
    p.add_argument("--top-packing", choices=tuple(LAYOUTS), default=None,
                   help="the layouts of the speed runs at the batches after the first (16 when --batches has it: "
                        "the issue's comparison point; default: --packing's), e.g. only: the largest rung packed "
                        "alone, where packing is what its MFU counts on")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="the compiled runs' --compile-mode (speed and oom; default: the worker's own choice)")
    p.add_argument("--modes", default="compiled,eager",
                   help="which speed runs (b) a batch gets: compiled (with --compile), eager (with the grouped run and "
                        "the bare rank); default both")
    p.add_argument("--batches", default=None, help="comma-separated; 'auto' = the largest rung for the card")
    p.add_argument("--hf-batches", default=None, help="the HF Trainer's batches (a), a subset of --batches "
                                                      "(default: all of them)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the timed window (default 5)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30)")
    p.add_argument("--budget-s", type=float, default=330.0, help="start no stage that would end after this")
    p.add_argument("--gpu", default="0")
    p.add_argument("--stages", default="hf,speed,oom",
                   help="which parts run: hf (a), speed (b, c), oom (d: oom-eager, oom-eager-cold, oom-compiled, "
                        "oom-compiled-cold, oom-layers, oom-layers-cold; the compiled ones with --compile; -cold: "
                        "SFTUI_STANDBY=0, no ranks started ahead); default all")
    p.add_argument("--inject-at", type=int, default=None,
                   help="the oom stages' injected OOM step (default 40; 5 with --smoke, where a step of the "
                        "tiny model takes seconds on a loaded CPU). The next attempt's ranks are started "
                        "ahead at attempt 1's rank_start and need some seconds of imports (~6 s on an H200 "
                        "image); an OOM before they are done waits for the rest (the attempt is still warm). A "
                        "real OOM usually comes minutes in, so the default puts the OOM some 10 s after "
                        "rank_start eagerly (40 steps of ~0.2 s at batch 16); compiled, the first step's compile "
                        "alone outlasts the imports. 3 is the earlier protocol (docs/BENCHMARKS.md's 20.7 / "
                        "33.3 s) and the standby's worst case; oom_after_rank_start_s in the report says how "
                        "much head start the standby had")
    p.add_argument("--oom-ladder", default=None,
                   help=f"the oom stages' ladder, the first rung their batch (default {OOM_LADDER[False]}; "
                        f"{OOM_LADDER[True]} with --smoke)")
    p.add_argument("--oom-packed", action="store_true",
                   help="the oom stages with --packing (default: the model's own layout; a T5's is padded)")
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.smoke:
        args.model = args.model or "chatlm-mini"
    elif args.smoke_model == "tiny":
        args.model = args.model or "tiny"  # else --smoke's T5, written below (beside the data it needs)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 5)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 30)
    args.log_every = 2 if args.smoke else 5
    if args.warmup % args.log_every or args.steps % args.log_every:
        p.error(f"--warmup and --steps must be multiples of the log interval ({args.log_every})")
    if args.hf_worker:
        args.batches = [int(b) for b in args.batches.split(",")]
        return hf_worker(args)
    if args.compile and args.smoke:
        p.error("--compile needs a GPU (the worker ignores it on the CPU)")
    args.inject_at = args.inject_at if args.inject_at is not None else (5 if args.smoke else 40)
    if args.inject_at < 1:
        p.error("--inject-at: a step >= 1")
    try:
        args.oom_ladder = [int(b) for b in (args.oom_ladder or OOM_LADDER[args.smoke]).split(",")]
    except ValueError:
        p.error(f"--oom-ladder: {args.oom_ladder!r}: a comma list of batches, largest first")
    ladder = args.oom_ladder
    if len(ladder) < 2 or ladder[-1] < 1 or any(a <= b for a, b in zip(ladder, ladder[1:])):
        p.error(f"--oom-ladder: {ladder}: two or more batches, each smaller than the one before")
    modes = set(args.modes.split(","))
    if not modes <= {"compiled", "eager"}:
        p.error(f"--modes: {args.modes!r}: a comma list of compiled, eager")
    if modes == {"compiled"} and not args.compile:
        p.error("--modes compiled: the compiled runs need --compile")
    if args.compile_mode and not args.compile:
        p.error("--compile-mode: the compiled runs' mode needs --compile")
    rungs = parse_rungs(args.batches or ("8" if args.smoke else "8,16,auto"), args.gpu)
    hf_rungs = rungs if args.hf_batches is None else parse_rungs(args.hf_batches, args.gpu)
    if not set(hf_rungs) <= set(rungs):
        p.error(f"--hf-batches: {hf_rungs} are not all in --batches {rungs}")
    args.batches, args.hf_batches = rungs, hf_rungs
    args.out.mkdir(parents=True, exist_ok=True)
    args.data = args.out / "data.jsonl"
    # enough rows for the timed window, and for the oom runs (--inject-at + 3 steps of the ladder's top) in one epoch
    write_data(args.data, max((args.warmup + args.steps) * max(args.batches),
                              (args.inject_at + 3) * args.oom_ladder[0]) + 64)
    if args.model is None:
        args.model = str(smoke_t5(args.out / "smoke-t5", args.data))
    bench = Bench(args)
    rep = bench.report
    seq2seq = is_seq2seq(args.model)
    rep.update(batches=args.batches, packing_mode=args.packing, seq2seq=seq2seq,
               real_share=round(padding_share(args.data, seq2seq), 4), card=card_name(args.smoke))
    bench.save()
    say(f"{args.model} on {rep['card']}, batches {args.batches}, real tokens {rep['real_share'] * 100:.0f} % of padded")

    stages = set(args.stages.split(","))
    mid = 16 if 16 in args.batches else args.batches[0]  # the comparison point
    if "hf" in stages:
        bench.hf(args.hf_batches)
    order = [mid] + [b for b in args.batches if b != mid] if "speed" in stages else []
    every_layout = tuple(dict.fromkeys(LAYOUTS[args.packing] + LAYOUTS[args.top_packing or args.packing]))
    cold = dict.fromkeys(every_layout, True)  # per layout: the next compiled run compiles its graphs from nothing
    for b in order:
        layouts = LAYOUTS[args.packing if b == mid or args.top_packing is None else args.top_packing]
        for packed in layouts if args.compile and "compiled" in modes else ():
            key = "compiled_packed" if packed else "compiled"
            if bench.fits(variant("compiled", b, packed), COST[key + "_cold" if cold[packed] else key]):
                bench.throughput(variant("compiled", b, packed), b, True, packed=packed)
                cold[packed] = False
        for packed in layouts if "eager" in modes else ():
            if bench.fits(variant("eager", b, packed), COST["eager_packed" if packed else "eager"]):
                bench.throughput(variant("eager", b, packed), b, False, packed=packed)
        if "eager" in modes and False in layouts and b == max(args.batches) and bench.fits(f"grouped-{b}", COST["eager"]):
            bench.throughput(f"grouped-{b}", b, False, ("--group-by-length",))
        supervised = variant("eager", b, False not in layouts)  # the padded eager run; packed with --packing only
        bare_name = variant("bare", b, False not in layouts)
        if b == mid and supervised in rep["sftui"] and bench.fits(bare_name, COST["direct"]):
            bench.direct(bare_name, supervised)
            sup, bare = rep["sftui"][supervised].get("samples_per_s"), rep["sftui"][bare_name].get("samples_per_s")
            if sup and bare:
                rep["overhead"] = {"batch": b, "run": supervised, "supervised": sup, "bare": bare,
                                   "overhead_pct": round((bare - sup) / bare * 100, 2)}
    for b in args.batches:
        for packed in every_layout:
            e, c = rep["sftui"].get(variant("eager", b, packed)), rep["sftui"].get(variant("compiled", b, packed))
            if e and c and (chk := loss_check(e, c, args.warmup)):
                rep.setdefault("loss_check", {})[variant("", b, packed).lstrip("-")] = chk
    if order and True in every_layout:
        rep["packing"] = packing_summary(rep, every_layout)
        for name, cmp_ in rep["packing"]["vs_padded"].items():
            say(f"{name}-packed ({cmp_['batches']} batches) ÷ {name} ({cmp_['padded_batches']}): "
                f"{cmp_.get('samples_per_s')}× samples/s, {cmp_.get('mfu')}× MFU, largest loss gap "
                f"{(cmp_.get('loss') or {}).get('max_rel_gap')}")
    bench.save()
    if "oom" in stages:
        stages |= set(OOM_STAGES)
    for name, (compile_, more, cold) in OOM_STAGES.items():
        if name in stages and (args.compile or not compile_) \
                and bench.fits(name, COST["oom_compiled" if compile_ else "oom"]):
            bench.oom_recovery(name, compile_, more, cold)
    oom = rep.get("oom_recovery", {})
    for name in OOM_STAGES:  # warm against cold, side by side
        warm, cold_ = oom.get(name), oom.get(f"{name}-cold")
        if warm and cold_ and warm.get("recovery_s") is not None and cold_.get("recovery_s") is not None:
            rep.setdefault("standby_saved_s", {})[name] = round(cold_["recovery_s"] - warm["recovery_s"], 2)

    text = markdown(rep)
    (args.out / "bench_throughput.md").write_text(text)
    bench.save()
    print(text, flush=True)
    say("done")
    return 0


def smoke_t5(directory: Path, data: Path) -> Path:
    """--smoke's encoder-decoder model: chatlm-mini's T5 layout (relu feed-forward, tied
    embeddings) shrunk to ~0.1M parameters, random seeded weights, with the data's character
    tokenizer beside it (a local model directory brings its own). No dropout (chatlm-mini has
    T5's 0.1): two layouts draw other dropout masks, and the smoke's loss check is meant to be
    strict (float32 on the CPU: rounding only)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from sftui.rows import char_counts
    from sftui.trainer import model as models

    shutil.rmtree(directory, ignore_errors=True)
    models.build_char_tokenizer(char_counts(str(data), False), directory)
    tok = models.load_tokenizer(directory)
    torch.manual_seed(SEED)
    config = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, feed_forward_proj="relu", dropout_rate=0.0, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def card_name(smoke: bool) -> str:
    if smoke:
        return "CPU (smoke test, no speed claim)"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                         text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown GPU"


def parse_rungs(text: str, gpu: str) -> list[int]:
    """A comma list of batches, 'auto' the card's largest rung (asked of nvidia-smi once)."""
    items = text.split(",")
    top = largest_rung(gpu) if "auto" in items else 0
    return [top if b == "auto" else int(b) for b in items]


def largest_rung(gpu: str) -> int:
    """The largest rung that fits both sides at max-len 256: the probe measured ~3 + 0.5 GiB per
    sample (98 GiB at 192) on an H200; an 80 GiB card takes 96 with room for HF's dynamic peaks."""
    try:
        out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit("bench_throughput.py: 'auto' batches: no nvidia-smi here to read the card's memory")
    mib = int(out.stdout.strip() or 0) if out.returncode == 0 else 0
    return 128 if mib > 120_000 else 96


if __name__ == "__main__":
    sys.exit(main())
