"""What the supervisor and the TUI cost the worker: samples/s with them and without, in one run.

    PYTHONPATH=src python3 scripts/bench_overhead.py --out OUT_DIR [--batch 16] [--compile]
        [--pairs 6] [--window-s 15] [--gpu 0]
    .venv/bin/python scripts/bench_overhead.py --smoke --out OUT_DIR   # CPU, tiny model: the script works

One real run (`sftui run --detach`, chatlm-mini at max-len 256, bf16; `tiny` at max-len 64 on the
CPU with --smoke) trains throughout while the script alternates two conditions in windows of --window-s
seconds, in the order A B B A A B B A … so that a slow drift counts against both equally:

A  "alone": the supervisor is paused (SIGSTOP) and no TUI is attached, so nothing but the
   worker runs: no tailing of the worker's output, no NVML or /proc sampling, no socket.
B  "watched": the supervisor runs and `sftui attach` draws the TUI in a real pseudo-terminal
   (120 × 40, TERM=xterm-256color) for the whole window; it is quit with `q` at the window's end.

The run pads every batch to --max-len, so that each step does the same work and a window's rate
does not depend on which rows it drew. A window's rate is the worker's own: samples between its first and last `step` event in the
window over the time between them (events.jsonl, written by the worker itself). The overhead is
the mean over the A/B pairs of (A − B) / A, with its standard error; the CPU time the supervisor
and the TUI used in each window is reported beside it. Comparing windows of one run removes
what differs from run to run (start-up, memory placement, the data order's lengths), which was
a few per cent between separate runs. Writes OUT/bench_overhead.json and OUT/bench_overhead.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from bench_throughput import write_data  # noqa: E402  (scripts/ is this script's own directory)
from sftui import rundir  # noqa: E402
from sftui.runfile import RunFile  # noqa: E402

MAX_LEN = 256
SMOKE_MAX_LEN = 64  # the tiny model on the CPU: padded to 256, a step took seconds, longer than a window
TUI_SIZE = (120, 40)
RUN_NAME = "bench-overhead"  # the TUI's header shows it: the mark that it drew the run
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", flush=True)


class Tui:
    """`sftui attach RUN` on a pseudo-terminal; what it draws is read and counted, not kept."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        master, slave = os.openpty()
        cols, rows = TUI_SIZE
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "sftui", "attach", str(run_dir)], cwd=ROOT,
                                     env=dict(env, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows)),
                                     stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.master = master
        self.bytes = 0
        self.seen = b""  # the first 64 KiB drawn
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.bytes += len(chunk)
            if len(self.seen) < 65536:
                self.seen += chunk

    def quit(self) -> int | None:
        """`q` (the TUI's "leave"), then SIGTERM if it is still there after 5 s."""
        try:
            os.write(self.master, b"q")
            code = self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.terminate()
            code = self.proc.wait(5)
        os.close(self.master)
        self.reader.join(2)
        return code


def cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def steps_between(events_path: Path, t0: float, t1: float) -> list[dict[str, Any]]:
    return [e for e in rundir.read_all(events_path) if e["kind"] == "step" and t0 <= e["t"] <= t1]


def window_rate(steps: list[dict[str, Any]]) -> tuple[float | None, int]:
    """Samples per second between the window's first and last step events, and the steps spanned."""
    if len(steps) < 2 or steps[-1]["t"] <= steps[0]["t"]:
        return None, 0
    first, last = steps[0], steps[-1]
    return (last["samples_seen"] - first["samples_seen"]) / (last["t"] - first["t"]), last["step"] - first["step"]


def wait_for_step(run_dir: Path, step: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = rundir.read_all(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
        if any(e["kind"] == "step" and e["step"] >= step for e in evs):
            return True
        if any(e["kind"] == "run_end" for e in evs):
            return False
        time.sleep(1.0)
    return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, short windows: the script works (no claims)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="the worker with --compile (GPU)")
    p.add_argument("--pairs", type=int, default=None, help="A/B pairs (default 6; 2 with --smoke)")
    p.add_argument("--window-s", type=float, default=None, help="seconds per window (default 15; 6 with --smoke)")
    p.add_argument("--settle-step", type=int, default=30, help="the step after which the windows start")
    p.add_argument("--log-every", type=int, default=None, help="the run's --log-every (default 5; 1 with --smoke)")
    p.add_argument("--gpu", default="0")
    args = p.parse_args()
    if args.compile and args.smoke:
        p.error("--compile needs a GPU (the worker ignores it on the CPU)")
    pairs = args.pairs or (2 if args.smoke else 6)
    window_s = args.window_s or (6.0 if args.smoke else 15.0)
    model = "tiny" if args.smoke else "chatlm-mini"
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data.jsonl"
    write_data(data, 20_000)
    run_dir = args.out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    if not args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = args.gpu
    max_len = SMOKE_MAX_LEN if args.smoke else MAX_LEN
    flags = ["--model", model, "--data", str(data), "--max-len", str(max_len), "--batch", str(args.batch),
             "--ladder", str(args.batch), "--pad-to-max-len", "--epochs", "50",
             "--log-every", str(args.log_every or (1 if args.smoke else 5)), "--checkpoint-every", "0",
             "--keep-checkpoints", "1", "--on-oom", "stop", "--name", RUN_NAME, "--run-dir", str(run_dir)]
    flags += ["--cpu"] if args.smoke else (["--compile"] if args.compile else [])
    cmd = [sys.executable, "-m", "sftui", "run", "--detach", *flags]
    say("$ " + shlex.join(["sftui", "run", "--detach", *flags]))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": shlex.join(sys.argv),
                              "run_flags": flags, "window_s": window_s, "windows": []}
    supervisor = None
    try:
        if not wait_for_step(run_dir, args.settle_step, 600):
            say("the run did not reach the settle step; see " + str(run_dir / "events.jsonl"))
            return 1
        supervisor = int(RunFile.read(rundir.RunDir(run_dir)).supervisor_pid)
        say(f"step {args.settle_step} reached; supervisor pid {supervisor}; {pairs} pairs of {window_s:.0f} s windows")
        order = [("A", "B") if i % 2 == 0 else ("B", "A") for i in range(pairs)]
        for i, pair in enumerate(order):
            for cond in pair:
                report["windows"].append(window(cond, i, run_dir, supervisor, env, window_s))
                w = report["windows"][-1]
                say(f"pair {i} {cond}: {w['samples_per_s']} samples/s over {w['steps']} steps; supervisor "
                    f"{w['supervisor_cpu_pct']:.1f} % of a core, TUI {w.get('tui_cpu_pct', 0):.1f} %")
    finally:
        if supervisor is not None:
            os.kill(supervisor, signal.SIGCONT)
        subprocess.run([sys.executable, "-m", "sftui", "stop", str(run_dir)], cwd=ROOT, env=env, capture_output=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and RunFile.read(rundir.RunDir(run_dir)).status == "running":
            time.sleep(1)
    report.update(summarize(report["windows"]))
    report["tui_drew_every_window"] = all(w.get("tui_drew_run") for w in report["windows"] if w["condition"] == "B")
    if not report["tui_drew_every_window"]:
        say("the TUI did not draw the run in every window: no figure. Its output: "
            + next((w["tui_output"] for w in report["windows"] if "tui_output" in w), "none"))
    for heavy in ("checkpoints", "final"):
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    (args.out / "bench_overhead.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "bench_overhead.md").write_text(text)
    print(text, flush=True)
    return 0 if report["tui_drew_every_window"] and report.get("overhead_pct") is not None else 1


def window(cond: str, pair: int, run_dir: Path, supervisor: int, env: dict[str, str], seconds: float) -> dict[str, Any]:
    """One window: A pauses the supervisor, B resumes it and attaches the TUI."""
    tui = None
    if cond == "A":
        os.kill(supervisor, signal.SIGSTOP)
    else:
        os.kill(supervisor, signal.SIGCONT)
        tui = Tui(run_dir, env)
    sup0 = cpu_s(supervisor)  # the TUI starts in the window: all its CPU time counts
    t0 = time.time()
    time.sleep(seconds)
    t1 = time.time()
    res: dict[str, Any] = {"pair": pair, "condition": cond,
                           "supervisor_cpu_pct": round((cpu_s(supervisor) - sup0) / (t1 - t0) * 100, 2)}
    if tui is not None:
        res["tui_cpu_pct"] = round(cpu_s(tui.proc.pid) / (t1 - t0) * 100, 2)
        res["tui_bytes_drawn"] = tui.bytes
        res["tui_exit"] = tui.quit()
        res["tui_drew_run"] = RUN_NAME.encode() in tui.seen
        if not res["tui_drew_run"]:
            res["tui_output"] = tui.seen[:600].decode(errors="replace")
    rate, steps = window_rate(steps_between(run_dir / "events.jsonl", t0, t1))
    res.update(samples_per_s=rate and round(rate, 3), steps=steps, t0=round(t0, 3), t1=round(t1, 3))
    return res


def summarize(windows: list[dict[str, Any]]) -> dict[str, Any]:
    by_pair: dict[int, dict[str, float]] = {}
    for w in windows:
        by_pair.setdefault(w["pair"], {})[w["condition"]] = w["samples_per_s"]
    rel = [(r["A"] - r["B"]) / r["A"] for r in by_pair.values() if r.get("A") and r.get("B")]
    if not rel:
        return {"overhead_pct": None}
    mean = statistics.fmean(rel)
    se = statistics.stdev(rel) / len(rel) ** 0.5 if len(rel) > 1 else None
    a = [w["samples_per_s"] for w in windows if w["condition"] == "A" and w["samples_per_s"]]
    b = [w["samples_per_s"] for w in windows if w["condition"] == "B" and w["samples_per_s"]]
    return {"pairs": len(rel), "overhead_pct": round(mean * 100, 3), "overhead_se_pct": se and round(se * 100, 3),
            "overhead_by_pair_pct": [round(x * 100, 3) for x in rel],
            "alone_samples_per_s": round(statistics.fmean(a), 2), "watched_samples_per_s": round(statistics.fmean(b), 2),
            "supervisor_cpu_pct_watched": round(statistics.fmean(w["supervisor_cpu_pct"] for w in windows
                                                                 if w["condition"] == "B"), 2),
            "tui_cpu_pct": round(statistics.fmean(w["tui_cpu_pct"] for w in windows if w["condition"] == "B"), 2)}


def markdown(r: dict[str, Any]) -> str:
    if r.get("overhead_pct") is None:
        return "No complete A/B pair was measured.\n"
    se = f" ± {r['overhead_se_pct']:.2f} (standard error)" if r.get("overhead_se_pct") is not None else ""
    return (f"- Alone (supervisor paused, no TUI): {r['alone_samples_per_s']} samples/s; watched (supervisor and TUI "
            f"attached): {r['watched_samples_per_s']} samples/s, over {r['pairs']} pairs of {r['window_s']:.0f} s windows.\n"
            f"- Overhead (A − B) / A: **{r['overhead_pct']:+.2f} %**{se}; by pair: "
            f"{', '.join(f'{x:+.2f}' for x in r['overhead_by_pair_pct'])} %.\n"
            f"- CPU while watched: supervisor {r['supervisor_cpu_pct_watched']} % of a core, TUI {r['tui_cpu_pct']} %; "
            f"the TUI drew the run in every window: {'yes' if r['tui_drew_every_window'] else 'NO'}.\n")


if __name__ == "__main__":
    sys.exit(main())
