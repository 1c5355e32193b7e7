"""Two and more GPUs (issue 20): scaling, OOM recovery, the features together, telemetry against nvidia-smi.

    PYTHONPATH=src python3 scripts/bench_multi_gpu.py --out OUT_DIR [--gpus 0,1] [--stages scaling,recovery,combined,telemetry]
    .venv/bin/python scripts/bench_multi_gpu.py --smoke --out OUT_DIR     # CPU, two gloo ranks: the script works

On a machine with N >= 2 GPUs (--gpus, default all visible), everything through the real command line
(`python3 -m sftui run --headless | --detach`, `sftui set-batch`, `sftui stop`, `sftui run --resume`);
nothing here imports textual. The model is bench_causal's Qwen2.5-0.5B-shaped directory (random bf16
weights, a byte-level BPE with a ChatML template) on bench_causal's rows.

1. scaling: the Qwen shape (--max-len 512, --batch-qwen per GPU, default 128) and the `chatlm-mini` preset
   (--max-len 256, --batch-chatlm, default 192), each on 1 GPU and on all N at the same per-GPU batch,
   --steps steps (default 120); rates over steps --warmup+1.. from the runs' own `step` events
   (bench_causal.window). Reports samples/s on N / (N x samples/s on 1) (goal >= 0.9) and
   each rank's peak allocated and reserved from `rank_stats`.
2. recovery: the Qwen shape on N GPUs, `--inject-oom-at-step S --inject-oom-rank N-1 --on-oom auto
   --ladder B,3B/4,B/2` (S = --inject-at, default 5), one run per --recovery-modes entry (default eager,
   eager-cold, compiled): `-cold` is the same run with SFTUI_STANDBY=0 in the supervisor's environment, so
   that the next attempt's ranks are not started ahead. Figures (scripts/recovery.py, as in
   bench_throughput and bench_lora): seconds from the `oom` event to the next attempt's first `step` (goal
   <= 20 s), to its ranks' `rank_start` (what the ranks started ahead save) and to its `attempt_start`;
   `warm` (attempt_start's: its ranks were started ahead); teardown (oom -> attempt_end); steps lost (oom
   step - 1 - resume_step); how long after attempt 1's rank_start the oom came (the standby's head start);
   the next attempt's attempt_start / rank_start / data / model / phase times after the oom, so that the
   time can be attributed; and `MODE-saved_s`, cold minus warm recovery.
3. combined: the Qwen shape with its chat template, --lora, --packing, --record-samples on N GPUs, one
   epoch: (a) an injected OOM (--on-oom auto) on rank --combined-oom-rank (default the last, N-1; a
   resume clears the injection, so the run may later resume on one GPU), (b) `sftui set-batch RUN_DIR B/2` while it
   runs, (c) `sftui stop`, `sftui run --resume RUN_DIR --gpus G0` (one GPU), `sftui stop` again, then
   `sftui run --resume RUN_DIR --gpus ALL` to the end; then every sample trained exactly once (from
   samples.jsonl, as gpu_oom.check_once). Pass/fail per check.
4. telemetry: a run training on all N GPUs; each new line of its telemetry.jsonl (gpus[].mem_used, bytes)
   read at once against `nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits` (MiB);
   each GPU's relative difference (goal within 2 %).

--smoke: the CPU with two gloo ranks (--cpu --num-processes 2), bench_causal's SMOKE shape, the `tiny`
preset instead of chatlm-mini, tiny batches and few steps, no --compile, no telemetry stage (no nvidia-smi).
Its figures mean nothing; it shows that every stage runs end to end.

Writes OUT/bench_multi_gpu.json after every stage (a run cut short keeps what it got) and prints a summary
table at the end. Every figure goes into docs/BENCHMARKS.md with the card, the GPU count, the date and the
command line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_causal import GIB, SEED, Bench, build_model_dir, say, window, write_rows  # noqa: E402
from gpu_oom import check_once  # noqa: E402
from recovery import NoRecovery, recovery_figures  # noqa: E402

from sftui import rundir  # noqa: E402

Events = list[dict[str, Any]]


def of(evs: Events, kind: str) -> Events:
    return [e for e in evs if e.get("kind") == kind]


def rates(evs: Events, warmup: int) -> tuple[float | None, float | None]:
    """samples/s and tokens/s over steps warmup+1.. (bench_causal.window over the step events)."""
    w = window([e for e in of(evs, "step") if e["step"] >= warmup])
    return w["samples_per_s"], w["tokens_per_s"]


def peaks(evs: Events) -> dict[int, dict[str, float | None]]:
    """Each rank's peak allocated and reserved GiB from its rank_stats (null on the CPU)."""
    out: dict[int, dict[str, float | None]] = {}
    for rank in sorted({e["rank"] for e in of(evs, "rank_stats")}):
        stats = [e for e in of(evs, "rank_stats") if e["rank"] == rank]
        alloc = max((e.get("mem_peak_bytes") or 0 for e in stats), default=0)
        res = max((e.get("mem_reserved_bytes") or 0 for e in stats), default=0)
        out[rank] = {"allocated_gib": round(alloc / GIB, 2) if alloc else None,
                     "reserved_gib": round(res / GIB, 2) if res else None}
    return out


class MultiBench(Bench):
    name = "bench_multi_gpu"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.gpus: list[str] = args.gpus
        self.n = len(args.gpus)
        self.report.update(smoke=args.smoke, gpus=args.gpus, world=self.n, cards=args.cards)

    def devices(self, n: int) -> list[str]:
        if self.args.smoke:
            return ["--cpu", "--num-processes", str(n)]
        return ["--gpus", ",".join(self.gpus[:n])]

    def events(self, run_dir: Path) -> Events:
        path = run_dir / "events.jsonl"
        return rundir.read_all(path) if path.exists() else []

    def train(self, name: str, model: str, max_len: int, batch: int, n: int, *extra: str, data: Path | None = None,
              steps: int | None = None, detach: bool = False, timeout: float = 1800,
              env: dict[str, str] | None = None) -> tuple[int, Path]:
        """`sftui run` (headless and waited for, or --detach) into OUT/run-NAME, ``env`` added to the
        supervisor's environment; its exit code and directory."""
        run_dir = self.out / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        ladder = () if "--ladder" in extra else ("--ladder", str(batch))
        length = () if steps == 0 else ("--max-steps", str(steps or self.args.steps))
        code, _ = self.sftui("run", "--detach" if detach else "--headless", "--run-dir", str(run_dir),
                             "--model", model, "--data", str(data or self.args.data), "--max-len", str(max_len),
                             "--batch", str(batch), *ladder, *length, "--seed", str(SEED),
                             "--checkpoint-every", "0", "--keep-checkpoints", "1", *self.devices(n), *extra,
                             log=name, timeout=timeout, env=env)
        return code, run_dir

    def wait_for(self, run_dir: Path, what: str, pred: Callable[[Events], bool], timeout: float = 900,
                 ends: int | None = None) -> Events:
        """Poll events.jsonl until ``pred``; fail if the run ends (more than ``ends`` run_end events) first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            evs = self.events(run_dir)
            if pred(evs):
                return evs
            if ends is not None and len(of(evs, "run_end")) > ends:
                raise AssertionError(f"the run ended before {what}: {of(evs, 'run_end')[-1]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def stage(self, name: str, result: dict[str, Any]) -> None:
        self.report[name] = result
        self.save()
        say(f"{name}: {json.dumps(result, default=str)[:2000]}")


# --- 1. scaling ------------------------------------------------------------------------------------


def scaling(bench: MultiBench) -> dict[str, Any]:
    args, n = bench.args, bench.n
    shapes = [("qwen", str(args.model_dir), args.max_len, args.batch_qwen),
              ("tiny" if args.smoke else "chatlm-mini", "tiny" if args.smoke else "chatlm-mini", 256, args.batch_chatlm)]
    result: dict[str, Any] = {}
    for label, model, max_len, batch in shapes:
        row: dict[str, Any] = {"model": model, "max_len": max_len, "batch_per_gpu": batch}
        for world in (1, n):
            code, run_dir = bench.train(f"scaling-{label}-{world}", model, max_len, batch, world, "--on-oom", "stop",
                                        "--log-every", str(args.log_every))
            evs = bench.events(run_dir)
            samples, tokens = rates(evs, args.warmup)
            row[f"w{world}"] = {"exit": code, "samples_per_s": samples, "tokens_per_s": tokens,
                                "mfu": next((e.get("mfu") for e in reversed(of(evs, "step"))), None),
                                "oom": bool(of(evs, "oom")), "peaks": peaks(evs)}
            result[label] = row
            bench.stage("scaling", result)
        one, many = row["w1"]["samples_per_s"], row[f"w{n}"]["samples_per_s"]
        row["efficiency"] = round(many / (n * one), 3) if one and many else None
        row["goal_met"] = row["efficiency"] is not None and row["efficiency"] >= 0.9
        bench.stage("scaling", result)
    return result


# --- 2. recovery -----------------------------------------------------------------------------------


def ladder(b: int) -> str:
    return ",".join(str(x) for x in sorted({b, max(1, b * 3 // 4), max(1, b // 2)}, reverse=True))


def recovery(bench: MultiBench) -> dict[str, Any]:
    """Each mode of --recovery-modes: `eager` / `compiled` (--compile), and with `-cold` the same
    run with SFTUI_STANDBY=0 in the supervisor's environment (no ranks started ahead)."""
    args, n = bench.args, bench.n
    b = args.batch_qwen
    result: dict[str, Any] = {"batch": b, "ladder": ladder(b), "inject_at": args.inject_at}
    for mode in args.recovery_modes:
        extra = ["--compile"] if mode.startswith("compiled") else []
        env = {"SFTUI_STANDBY": "0"} if mode.endswith("-cold") else None
        code, run_dir = bench.train(f"recovery-{mode}", str(args.model_dir), args.max_len, b, n,
                                    "--inject-oom-at-step", str(args.inject_at), "--inject-oom-rank", str(n - 1),
                                    "--on-oom", "auto", "--ladder", ladder(b), "--log-every", "1", *extra,
                                    steps=max(args.recovery_steps, args.inject_at + 5), env=env)
        try:
            row = {"exit": code, "standby": "off" if env else "on", **recovery_figures(bench.events(run_dir))}
            if row["missing"]:
                row["failed"] = f"no recovery in the events: no {', '.join(row['missing'])} after the oom"
        except NoRecovery as e:
            row = {"exit": code, "standby": "off" if env else "on", "failed": f"no recovery in the events: {e}"}
        result[mode] = row
        bench.stage("recovery", result)
    for mode in args.recovery_modes:  # warm against cold, side by side
        warm, cold = result.get(mode), result.get(f"{mode}-cold")
        if not mode.endswith("-cold") and warm and cold and warm.get("recovery_s") is not None \
                and cold.get("recovery_s") is not None:
            result[f"{mode}-saved_s"] = round(cold["recovery_s"] - warm["recovery_s"], 2)
    bench.stage("recovery", result)
    return result


# --- 3. combined -----------------------------------------------------------------------------------


def combined(bench: MultiBench) -> dict[str, Any]:
    args, n = bench.args, bench.n
    b = args.batch_combined or args.batch_qwen
    half = max(1, b // 2)
    n_rows = b * n * args.combined_steps
    data = bench.out / "combined.jsonl"
    write_rows(data, n_rows, args.smoke)
    checks: list[dict[str, Any]] = []
    result: dict[str, Any] = {"batch": b, "ladder": ladder(b), "rows": n_rows, "checks": checks}

    def check(name: str, ok: bool, detail: Any) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        bench.stage("combined", result)

    flags = ["--lora", "--packing", "--record-samples", "--log-every", "1", "--on-oom", "auto",
             "--ladder", ladder(b), "--inject-oom-at-step", "5", "--inject-oom-rank", str(args.combined_oom_rank)]
    code, run_dir = bench.train("combined", str(args.model_dir), args.max_len, b, n, *flags, data=data, steps=0,
                                detach=True)
    assert code == 0, f"sftui run --detach exited {code}; see combined.log"
    wait = 900

    def steps_of(evs: Events, attempt: int) -> Events:
        return [e for e in of(evs, "step") if e.get("attempt") == attempt]

    # (a) the injected OOM, then the restart one rung down
    evs = bench.wait_for(run_dir, "attempt 2's third step", lambda evs: len(steps_of(evs, 2)) >= 3, wait, ends=0)
    oom = of(evs, "oom")[0]
    a2 = next(e for e in of(evs, "attempt_start") if e["attempt"] == 2)
    check(f"oom: injected on rank {args.combined_oom_rank}, restarted one rung down from the emergency checkpoint",
          oom["rank"] == args.combined_oom_rank and oom["step"] == 5 and a2["batch_size"] == int(ladder(b).split(",")[1])
          and a2["resume_step"] == 4 and a2["world_size"] == n,
          {"oom": {k: oom[k] for k in ("step", "rank", "batch_size", "emergency_checkpoint")},
           "attempt_2": {k: a2[k] for k in ("batch_size", "resume_step", "world_size")}})
    # (b) set-batch while it runs
    code, text = bench.sftui("set-batch", str(run_dir), str(half), log="combined-set-batch")
    evs = bench.wait_for(run_dir, "attempt 3's third step", lambda evs: len(steps_of(evs, 3)) >= 3, wait, ends=0)
    exits = [e for e in of(evs, "worker_exit") if e.get("attempt") == 2]
    a3 = next(e for e in of(evs, "attempt_start") if e["attempt"] == 3)
    check("set-batch: every rank stopped at the same step, attempt 3 resumed there at the new batch",
          code == 0 and sorted(e["rank"] for e in exits) == list(range(n)) and {e["reason"] for e in exits} == {"switch"}
          and len({e["step"] for e in exits}) == 1 and a3["batch_size"] == half and a3["resume_step"] == exits[0]["step"],
          {"set_batch_exit": code, "worker_exits": [(e["rank"], e["reason"], e["step"]) for e in exits],
           "attempt_3": {k: a3[k] for k in ("batch_size", "resume_step", "world_size")}})
    # (c) stop, resume on one GPU, stop, resume on all
    for i, (world, then) in enumerate(((1, "stop"), (n, "finish"))):
        code, _ = bench.sftui("stop", str(run_dir), log=f"combined-stop-{i + 1}")
        evs = bench.wait_for(run_dir, f"run_end after stop {i + 1}", lambda evs, k=i: len(of(evs, "run_end")) > k, wait)
        end = of(evs, "run_end")[i]
        stop_ckpt = [e for e in of(evs, "checkpoint") if e.get("reason") == "stop"]
        check(f"stop {i + 1}: exit 4 after a stop checkpoint", code == 0 and end["exit_code"] == 4 and stop_ckpt,
              {"stop_exit": code, "run_end": {k: end.get(k) for k in ("status", "exit_code")},
               "stop_checkpoint_step": stop_ckpt[-1]["step"] if stop_ckpt else None})
        last = stop_ckpt[-1]["step"] if stop_ckpt else None
        before = len(of(evs, "attempt_start"))
        mode = "--detach" if then == "stop" else "--headless"
        code, text = bench.sftui("run", "--resume", str(run_dir), mode, *bench.devices(world),
                                 log=f"combined-resume-{i + 1}", timeout=1800)
        if then == "stop" and code != 0:
            raise AssertionError(f"sftui run --resume on {world} exited {code}: {text.strip()[-300:]}")
        if then == "stop":
            evs = bench.wait_for(run_dir, "three steps of the one-GPU resume",
                                 lambda evs, k=before: len(of(evs, "attempt_start")) > k
                                 and len(steps_of(evs, of(evs, "attempt_start")[k]["attempt"])) >= 3, wait, ends=i + 1)
        else:
            evs = bench.events(run_dir)
        start = of(evs, "attempt_start")[before] if len(of(evs, "attempt_start")) > before else {}
        check(f"resume {i + 1} on {world} {'rank' if world == 1 else 'ranks'}: from the stop checkpoint"
              + ("" if then == "stop" else ", to the end (exit 0)"),
              start.get("world_size") == world and start.get("resume_step") == last
              and (then == "stop" or (code == 0 and of(evs, "run_end")[-1]["exit_code"] == 0)),
              {"resume_exit": code, "attempt": {k: start.get(k) for k in ("attempt", "batch_size", "resume_step",
                                                                          "world_size")}})
    try:
        check("every sample trained exactly once (samples.jsonl)", True, {"samples": check_once(run_dir, n_rows)})
    except AssertionError as e:
        check("every sample trained exactly once (samples.jsonl)", False, str(e))
    batches = {e.get("batches") for e in of(evs, "data")}
    check("packed batches (the data events)", batches == {"packed"}, sorted(str(x) for x in batches))
    result["attempts"] = [(e["attempt"], e["batch_size"], e["world_size"], e["resume_step"])
                          for e in of(evs, "attempt_start")]
    result["passed"] = all(c["ok"] for c in checks)
    bench.stage("combined", result)
    return result


# --- 4. telemetry ----------------------------------------------------------------------------------


def nvidia_smi() -> dict[int, int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return {int(i): int(m) * 2**20 for i, m in (line.split(",") for line in out.strip().splitlines())}


def telemetry(bench: MultiBench) -> dict[str, Any]:
    args, n = bench.args, bench.n
    if args.smoke or shutil.which("nvidia-smi") is None:
        result = {"skipped": "no nvidia-smi (the CPU)" if shutil.which("nvidia-smi") is None else "--smoke"}
        bench.stage("telemetry", result)
        return result
    code, run_dir = bench.train("telemetry", str(args.model_dir), args.max_len, args.batch_qwen, n, "--on-oom", "stop",
                                "--log-every", "10", steps=100000, detach=True)
    assert code == 0, f"sftui run --detach exited {code}; see telemetry.log"
    pairs: list[dict[str, Any]] = []
    try:
        bench.wait_for(run_dir, f"step {args.warmup}", lambda evs: any(e["step"] >= args.warmup for e in of(evs, "step")),
                       900, ends=0)
        path = run_dir / "telemetry.jsonl"
        for _ in range(args.telemetry_samples):
            size = path.stat().st_size
            deadline = time.time() + 15
            while path.stat().st_size == size and time.time() < deadline:
                time.sleep(0.02)
            smi, t_smi = nvidia_smi(), time.time()
            sample = rundir.read_all(path)[-1]
            row: dict[str, Any] = {"skew_s": round(t_smi - sample["t"], 2), "gpus": {}}
            for g in sample.get("gpus") or []:
                if str(g["index"]) in bench.gpus and g.get("mem_used") is not None and g["index"] in smi:
                    ref = smi[g["index"]]
                    row["gpus"][g["index"]] = {"sftui_mib": round(g["mem_used"] / 2**20), "smi_mib": ref // 2**20,
                                               "rel_diff": round(abs(g["mem_used"] - ref) / ref, 4) if ref else None}
            pairs.append(row)
            time.sleep(1)
    finally:
        bench.sftui("stop", str(run_dir), log="telemetry-stop")
        try:
            bench.wait_for(run_dir, "run_end", lambda evs: bool(of(evs, "run_end")), 300)
        except AssertionError as e:
            say(f"telemetry run: {e}")
    worst = {g: max(p["gpus"][g]["rel_diff"] or 0 for p in pairs if g in p["gpus"])
             for g in sorted({g for p in pairs for g in p["gpus"]})}
    result = {"samples": pairs, "worst_rel_diff": worst,
              "goal_met": bool(worst) and len(worst) == n and all(v <= 0.02 for v in worst.values())}
    bench.stage("telemetry", result)
    return result


# --- main ------------------------------------------------------------------------------------------


def summary(report: dict[str, Any], n: int) -> str:
    lines = [f"{'stage':<10} {'what':<80} {'figure':>26}"]

    def add(stage: str, what: str, figure: Any) -> None:
        lines.append(f"{stage:<10} {what[:80]:<80} {str(figure):>26}")

    for label, row in (report.get("scaling") or {}).items():
        for w in (1, n):
            r = row.get(f"w{w}") or {}
            res = [p.get("reserved_gib") for p in (r.get("peaks") or {}).values()]
            add("scaling", f"{label} batch {row['batch_per_gpu']}/GPU on {w}: samples/s, reserved GiB/rank",
                f"{r.get('samples_per_s')} {res if any(res) else '-'}")
        add("scaling", f"{label}: efficiency on {n} (goal >= 0.9)", row.get("efficiency"))
    for mode, row in (report.get("recovery") or {}).items():
        if isinstance(row, dict) and "recovery_s" in row:
            w = {True: "warm", False: "cold"}.get(row.get("warm"), "warm n/a")
            add("recovery", f"{mode} ({w}): oom->1st step s (goal <= 20); ->ranks up s; teardown s; lost",
                f"{row['recovery_s']}; {row.get('oom_to_rank_start_s')}; {row['teardown_s']}; {row['steps_lost']}")
            add("recovery", f"{mode}: the oom came s after attempt {row.get('oom_attempt')}'s rank_start",
                row.get("oom_after_rank_start_s"))
        elif isinstance(row, dict):
            add("recovery", mode, row.get("failed", "-"))
        elif mode.endswith("-saved_s"):
            add("recovery", f"{mode[:-8]}: cold - warm recovery s (the ranks started ahead)", row)
    comb = report.get("combined") or {}
    for c in comb.get("checks", []):
        add("combined", c["check"], "pass" if c["ok"] else "FAIL")
    if "failed" in comb:
        add("combined", "stage", "FAILED: " + comb["failed"][:60])
    tele = report.get("telemetry") or {}
    if "skipped" in tele:
        add("telemetry", "skipped", tele["skipped"])
    for g, v in (tele.get("worst_rel_diff") or {}).items():
        add("telemetry", f"GPU {g}: worst |sftui - nvidia-smi| / nvidia-smi (goal 2 %)", f"{v:.2%}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gpus", default=None, help="GPU indices (default: all visible)")
    p.add_argument("--stages", default="scaling,recovery,combined,telemetry")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rows", type=int, default=8000)
    p.add_argument("--batch-qwen", type=int, default=128)
    p.add_argument("--batch-chatlm", type=int, default=192)
    p.add_argument("--batch-combined", type=int, default=None, help="the combined stage's batch (default: --batch-qwen)")
    p.add_argument("--combined-steps", type=int, default=40, help="the combined run's steps at its first batch: "
                                                                   "rows = batch x GPUs x this")
    p.add_argument("--combined-oom-rank", type=int, default=None,
                   help="the combined run's injected-OOM rank (default: the last)")
    p.add_argument("--recovery-steps", type=int, default=30)
    p.add_argument("--recovery-modes", default=None,
                   help="the recovery stage's runs, in order, of eager, eager-cold, compiled, compiled-cold; "
                        "-cold: SFTUI_STANDBY=0, no ranks started ahead (default eager,eager-cold,compiled; "
                        "--smoke: eager,eager-cold)")
    p.add_argument("--inject-at", type=int, default=5,
                   help="the recovery stage's injected OOM step (default 5; the combined stage's stays 5). The "
                        "ranks started ahead begin at attempt 1's rank_start and need some seconds of imports: "
                        "an earlier OOM waits for the rest of them (still warm). At the Qwen shape's batch 128 per "
                        "GPU, rank_start -> step 5 (tokenizing, the model, five steps) should outlast them (about "
                        "6 s on an H200 image); the report's oom_after_rank_start_s says how long it was")
    p.add_argument("--telemetry-samples", type=int, default=5)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--max-len", type=int, default=512, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = args.out / "qwen2.5-0.5b-shape"
    args.data = args.out / "rows.jsonl"
    args.cards = None
    if args.smoke:
        args.gpus = "0,1"
        args.steps, args.warmup, args.rows, args.log_every = 12, 2, 200, 1
        args.batch_qwen, args.batch_chatlm, args.combined_steps, args.recovery_steps = 4, 4, 60, 10
    elif args.gpus is None:
        import torch

        args.gpus = ",".join(str(i) for i in range(torch.cuda.device_count()))
    if not args.smoke and shutil.which("nvidia-smi"):
        args.cards = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip().splitlines()
    modes = args.recovery_modes or ("eager,eager-cold" if args.smoke else "eager,eager-cold,compiled")
    args.recovery_modes = [m for m in modes.split(",") if m]
    if not set(args.recovery_modes) <= {"eager", "eager-cold", "compiled", "compiled-cold"} or args.inject_at < 1:
        p.error(f"--recovery-modes: of eager, eager-cold, compiled, compiled-cold (got {modes}); --inject-at >= 1")
    args.gpus = [g for g in args.gpus.split(",") if g]
    args.gpu = args.gpus[0] if args.gpus else "0"
    if len(args.gpus) < 2:
        print(f"bench_multi_gpu: needs at least two GPUs (have {args.gpus}); --smoke runs on the CPU", file=sys.stderr)
        return 2
    if args.combined_oom_rank is None:
        args.combined_oom_rank = len(args.gpus) - 1
    bench = MultiBench(args)
    if not args.model_dir.exists() or not args.data.exists():
        write_rows(args.data, args.rows, args.smoke)
        build_model_dir(args.model_dir, args.data, args.smoke)
        say(f"built {args.model_dir} and {args.rows} rows")
    stages = {"scaling": scaling, "recovery": recovery, "combined": combined, "telemetry": telemetry}
    for name in args.stages.split(","):
        try:
            stages[name](bench)
        except (AssertionError, subprocess.TimeoutExpired, subprocess.CalledProcessError, StopIteration,
                IndexError, KeyError) as e:
            say(f"STAGE {name} FAILED: {e!r}")
            part = bench.report.get(name) if isinstance(bench.report.get(name), dict) else {}
            bench.report[name] = {**part, "failed": repr(e)}
            bench.save()
    bench.save()
    print(summary(bench.report, bench.n), flush=True)
    say(f"wrote {args.out / 'bench_multi_gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
