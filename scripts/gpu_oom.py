"""Real CUDA out-of-memory, multi-GPU teardown and a two-GPU batch switch, on a GPU machine.

    PYTHONPATH=src python3 scripts/gpu_oom.py --out OUT_DIR [--scenarios one,two,switch,foreign]

`one`: chatlm-mini at max-len 256 on GPU 0, headless, --batch 16 --ladder 16,12,8 --on-oom auto
--record-samples, with --mem-fraction calibrated on this card so that a batch of 16 long rows runs
out of memory for real and 12 does not. The data is arranged (from sftui's own sample plan) so that
only step 6 at batch 16 holds long rows: the real torch.OutOfMemoryError comes at step 6, after five
completed steps. Checks: the OOM was real (not injected) and caught, the emergency checkpoint was
written at step 5, attempt 2 resumed there at batch 12, every sample was trained once; measures the
recovery time (OOM event to the first step of attempt 2) and the optimizer steps lost.

`two`: the same on GPUs 0,1 where only rank 1 has the low memory fraction: the whole attempt is
torn down (teardown seconds), attempt 2 runs on both GPUs at 12, every sample once; the headless
log and `sftui status` show both GPUs.

`switch`: `sftui set-batch` on two GPUs mid-run: both ranks stop at the same step; nothing lost.

`foreign`: as `one`, but with no --mem-fraction: another process (a plain torch script, started
here) holds all of GPU 0 but what batch 12 needs, so batch 16's OOM at step 6 is real and caused
by it. Checks that the supervisor's warning after the `oom` event names that process (pid, user,
command, GiB) — the line the TUI's OOM prompt shows — and that the run recovers down the ladder.

Everything goes through the real command line (`python3 -m sftui ...`); nothing here imports textual.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sftui.rundir import read_all  # noqa: E402
from sftui.trainer.data import Plan  # noqa: E402

SEED = 42
COMMON = ["--model", "chatlm-mini", "--max-len", "256", "--seed", str(SEED), "--checkpoint-every", "0",
          "--log-every", "1", "--dataloader-workers", "1"]
ALPHABET = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坐集编宝谈府拉黑且随格尽剑讲布杀微怕母调局根曾准团段终乐切级克精哪官示冷域读"


def sh(cmd: list[str], log: Path | None = None, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    if check and r.returncode not in (0,):
        print(r.stdout[-4000:], r.stderr[-4000:], flush=True)
        raise SystemExit(f"command failed with {r.returncode}: {' '.join(cmd)}")
    return r


def sftui(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "sftui", *args], **kw)


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def write_data(path: Path, n_rows: int, long_positions: range) -> None:
    """n_rows rows; the rows the plan puts at ``long_positions`` of epoch 0 are long (>= 256 tokens
    on both sides), the rest short."""
    order = Plan(n_rows, SEED, n_rows).order(0)
    long_ids = {int(order[p]) for p in long_positions}
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n_rows):
            if i in long_ids:
                prompt, response = text(rng, 300), text(rng, 300)
            else:
                prompt, response = text(rng, 12), text(rng, 8)
            f.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")


def events(run_dir: Path) -> list[dict]:
    return read_all(run_dir / "events.jsonl")


def of(evs: list[dict], kind: str) -> list[dict]:
    return [e for e in evs if e.get("kind") == kind]


def gpu_memory(index: int) -> tuple[int, int]:
    """NVML's (free, total) bytes of one GPU."""
    import pynvml

    pynvml.nvmlInit()
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return info.free, info.total
    finally:
        pynvml.nvmlShutdown()


def calibrate(out: Path, gpus: str, rank: int) -> dict[int, dict[str, int]]:
    """Peak allocated and reserved bytes of ``rank`` at batch 12 and 16, on all-long rows."""
    world = len(gpus.split(","))
    data = out / f"calib-{world}.jsonl"
    write_data(data, 16 * world * 3, range(0, 16 * world * 3))
    peaks: dict[int, dict[str, int]] = {}
    for batch in (12, 16):
        run_dir = out / f"calib-w{world}-b{batch}"
        sftui("run", "--headless", "--run-dir", str(run_dir), *COMMON, "--data", str(data), "--gpus", gpus,
              "--batch", str(batch), "--max-steps", "2", log=out / f"calib-w{world}-b{batch}.log")
        stats = [e for e in of(events(run_dir), "rank_stats") if e["rank"] == rank]
        peaks[batch] = {"allocated": max(e["mem_peak_bytes"] for e in stats),
                        "reserved": max(e["mem_reserved_bytes"] for e in stats)}
        print(f"calibration world {world} batch {batch}: rank {rank} peak allocated "
              f"{peaks[batch]['allocated'] / 2**30:.2f} GiB, reserved {peaks[batch]['reserved'] / 2**30:.2f} GiB",
              flush=True)
    return peaks


def fraction_between(peaks: dict[int, dict[str, int]], total: int) -> float:
    """A cap above what 12 reserves and well below what 16 allocates."""
    low = max(peaks[12]["reserved"], peaks[12]["allocated"])
    high = peaks[16]["allocated"]
    if high <= low:
        raise SystemExit(f"cannot separate the rungs: 12 reserves {low} B, 16 allocates {high} B")
    return round((low + 0.6 * (high - low)) / total, 4)


def check_once(run_dir: Path, n_rows: int) -> int:
    last: dict[int, dict] = {}
    for rec in read_all(run_dir / "samples.jsonl"):
        if rec["step"] not in last or rec["attempt"] >= last[rec["step"]]["attempt"]:
            last[rec["step"]] = rec
    ids = sorted(i for rec in last.values() for i in rec["ids"])
    assert sorted(last) == list(range(1, len(last) + 1)), "steps not contiguous"
    assert ids == list(range(n_rows)), f"{len(ids)} ids, {len(set(ids))} distinct, {n_rows} rows"
    return len(ids)


def oom_scenario(out: Path, name: str, gpus: str, oom_rank: int) -> dict:
    world = len(gpus.split(","))
    _, total = gpu_memory(int(gpus.split(",")[oom_rank]))
    peaks = calibrate(out, gpus, oom_rank)
    fraction = fraction_between(peaks, total)
    fractions = ["0.9"] * world
    fractions[oom_rank] = str(fraction)
    per_step = 16 * world
    n_rows = per_step * 12
    data = out / f"{name}.jsonl"
    write_data(data, n_rows, range(5 * per_step, 6 * per_step))  # step 6 at batch 16 is long
    run_dir = out / f"run-{name}"
    t0 = time.time()
    r = sftui("run", "--headless", "--run-dir", str(run_dir), *COMMON, "--data", str(data), "--gpus", gpus,
              "--batch", "16", "--ladder", "16,12,8", "--on-oom", "auto", "--record-samples",
              "--mem-fraction", ",".join(fractions), log=out / f"{name}.log", check=False)
    wall = time.time() - t0
    evs = events(run_dir)
    ooms = of(evs, "oom")
    starts = of(evs, "attempt_start")
    ends = of(evs, "attempt_end")
    result = {"scenario": name, "gpus": gpus, "exit_code": r.returncode, "mem_fraction": fractions,
              "calibration_gib": {b: {k: round(v / 2**30, 3) for k, v in p.items()} for b, p in peaks.items()},
              "wall_s": round(wall, 1)}
    assert r.returncode == 0, f"run exited {r.returncode}; see {name}.log"
    assert ooms and not ooms[0]["injected"], "no real OOM"
    oom = ooms[0]
    result["oom"] = {k: oom[k] for k in ("step", "batch_size", "rank", "where", "emergency_checkpoint", "message")}
    assert oom["step"] == 6 and oom["rank"] == oom_rank and oom["batch_size"] == 16, oom
    assert [(s["attempt"], s["batch_size"]) for s in starts] == [(1, 16), (2, 12)], starts
    resume = starts[1]["resume_step"]
    result["resume_step"] = resume
    result["steps_lost"] = (oom["step"] - 1) - (resume or 0)
    first_step_2 = next(e for e in of(evs, "step") if e.get("attempt") == 2)
    # The oom event is written after the emergency checkpoint: the OOM itself came that much earlier.
    saved = [e for e in of(evs, "checkpoint") if e["reason"] == "oom"]
    t_oom = saved[0]["t"] - saved[0]["seconds"] if saved else oom["t"]
    result["emergency_checkpoint_s"] = saved[0]["seconds"] if saved else None
    result["recovery_s"] = round(first_step_2["t"] - t_oom, 2)
    result["teardown_s"] = round(ends[0]["t"] - oom["t"], 2)
    result["attempt_1_outcome"] = ends[0]["outcome"]
    result["samples_checked"] = check_once(run_dir, n_rows)
    log = (out / f"{name}.log").read_text()
    result["headless_gpus_shown"] = sorted({int(tok[3:]) for line in log.splitlines() if " step " in line
                                           for tok in line.split() if tok.startswith("GPU") and tok[3:].isdigit()})
    status = sftui("status", str(run_dir), log=out / f"{name}-status.txt").stdout
    result["status_gpu_lines"] = [line.strip() for line in status.splitlines() if line.strip().startswith("GPU")]
    print(json.dumps(result, indent=2), flush=True)
    return result


HOLDER = """
import sys, time, torch
x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda")
print("holding", x.numel(), flush=True)
time.sleep(900)
"""
CONTEXT_BYTES = int(0.6 * 2**30)  # a rank's CUDA context and kernels: used on the card, not reserved by torch


def foreign_scenario(out: Path) -> dict:
    peaks = calibrate(out, "0", 0)
    low = max(peaks[12]["reserved"], peaks[12]["allocated"])
    want_free = CONTEXT_BYTES + low + int(0.6 * (peaks[16]["allocated"] - low))
    hold = gpu_memory(0)[0] - want_free
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(hold)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": ""})
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("holding"), "the holder did not start"
        free, _ = gpu_memory(0)
        n_rows = 16 * 12
        data = out / "foreign.jsonl"
        write_data(data, n_rows, range(5 * 16, 6 * 16))
        run_dir = out / "run-foreign"
        r = sftui("run", "--headless", "--run-dir", str(run_dir), *COMMON, "--data", str(data), "--gpus", "0",
                  "--batch", "16", "--ladder", "16,12,8", "--on-oom", "auto", "--record-samples",
                  log=out / "foreign.log", check=False)
    finally:
        holder.kill()
        holder.wait()
    evs = events(run_dir)
    ooms = [e for e in of(evs, "oom") if not e["injected"]]
    notes = [e["message"] for e in of(evs, "log") if e["message"].startswith("out of memory on GPU")]
    result = {"scenario": "foreign", "exit_code": r.returncode, "holder_pid": holder.pid,
              "held_gib": round(hold / 2**30, 2), "free_gib_left": round(free / 2**30, 2),
              "calibration_gib": {b: {k: round(v / 2**30, 3) for k, v in p.items()} for b, p in peaks.items()},
              "ooms": [(e["step"], e["batch_size"]) for e in ooms], "notes": notes,
              "attempts": [(s["attempt"], s["batch_size"]) for s in of(evs, "attempt_start")]}
    print(json.dumps(result, indent=2), flush=True)
    assert ooms, "no real OOM"
    assert notes and f"pid {holder.pid}," in notes[0], f"the warning does not name the holder: {notes}"
    assert r.returncode == 0, f"run exited {r.returncode}; see foreign.log"
    result["samples_checked"] = check_once(run_dir, n_rows)
    return result


def switch_scenario(out: Path, gpus: str = "0,1") -> dict:
    world = len(gpus.split(","))
    n_rows = 16 * world * 40
    data = out / "switch.jsonl"
    write_data(data, n_rows, range(0))
    run_dir = out / "run-switch"
    sftui("run", "--detach", "--run-dir", str(run_dir), *COMMON, "--data", str(data), "--gpus", gpus,
          "--batch", "16", "--record-samples")
    deadline = time.time() + 300
    while time.time() < deadline and not any(e["step"] >= 5 for e in of(events(run_dir), "step")):
        time.sleep(0.2)
    t_request = time.time()
    sftui("set-batch", str(run_dir), "8")
    while time.time() < deadline and not of(events(run_dir), "run_end"):
        time.sleep(0.5)
    evs = events(run_dir)
    exits = [e for e in of(evs, "worker_exit") if e.get("attempt") == 1]
    starts = of(evs, "attempt_start")
    end = of(evs, "run_end")[0]
    result = {"scenario": "switch", "gpus": gpus, "exit_code": end["exit_code"],
              "worker_exits": [(e["rank"], e["reason"], e["step"]) for e in exits],
              "attempts": [(s["attempt"], s["batch_size"], s["resume_step"]) for s in starts]}
    assert end["exit_code"] == 0, end
    assert sorted(e["rank"] for e in exits) == list(range(world)) and {e["reason"] for e in exits} == {"switch"}
    assert len({e["step"] for e in exits}) == 1, "ranks stopped at different steps"
    assert starts[1]["batch_size"] == 8 and starts[1]["resume_step"] == exits[0]["step"]
    first_step_2 = next(e for e in of(evs, "step") if e.get("attempt") == 2)
    result["switch_s"] = round(first_step_2["t"] - t_request, 2)
    result["steps_lost"] = 0 if starts[1]["resume_step"] == exits[0]["step"] else None
    result["samples_checked"] = check_once(run_dir, n_rows)
    print(json.dumps(result, indent=2), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--scenarios", default="one,two,switch")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.scenarios.split(","):
        try:
            if name == "one":
                results.append(oom_scenario(args.out, "one", "0", 0))
            elif name == "two":
                results.append(oom_scenario(args.out, "two", "0,1", 1))
            elif name == "switch":
                results.append(switch_scenario(args.out))
            elif name == "foreign":
                results.append(foreign_scenario(args.out))
        except (AssertionError, SystemExit, subprocess.TimeoutExpired, StopIteration) as e:
            print(f"SCENARIO {name} FAILED: {e!r}", flush=True)
            results.append({"scenario": name, "failed": repr(e)})
    (args.out / "gpu_oom.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
