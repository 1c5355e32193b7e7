#!/usr/bin/env python3
"""CPU use of the TUI while idle: a live-looking run whose telemetry.jsonl gains a 2-GPU sample
every second (a writer thread here), the TUI attached to it, nobody pressing keys.

    .venv/bin/python scripts/bench_tui_idle.py [--seconds 30] [--size 120x40] [--steps] [--headless]

By default the TUI runs inside a detached tmux session (a real terminal, TERM=xterm-256color);
``--headless`` uses Textual's headless driver instead (no tmux needed). ``--steps`` also appends
a training step event every second (a busier, still keyless screen). Prints the TUI process's
CPU time over the window as a percentage of one core. Target: <= 3 %.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sftui import events as ev  # noqa: E402
from sftui.rundir import EventLog, RunDir, acquire_lock, create  # noqa: E402
from sftui.runfile import RunFile  # noqa: E402

GIB = 1024**3


def sample(i: int) -> dict:
    wave = abs(math.sin(i / 7))
    gpus = [{"index": k, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-bench-{k}", "mem_used": int((50 + 25 * wave - k) * GIB),
             "mem_total": 80 * GIB, "util": round(70 + 29 * wave), "temp": 60 + k, "power_w": 500.0 + 100 * wave,
             "power_limit_w": 700.0, "in_run": True} for k in range(2)]
    return {"t": round(time.time(), 3), "gpus": gpus, "gpu_error": None,
            "system": {"mem_used": 60 * GIB, "mem_total": 500 * GIB, "swap_used": 0, "swap_total": 8 * GIB,
                       "cpu_percent": 12.5}, "run_rss": 20 * GIB}


def make_run(path: Path) -> RunDir:
    run = create(path)
    with EventLog(run.events, attempt=1) as log:
        log.emit("run_start", config={"model": "tiny", "data": "demo"})
        log.emit("attempt_start", batch_size=16, grad_accum=1, world_size=2, effective_batch=32, resume_step=None)
        for s in range(1, 201):
            log.emit("step", step=s, total_steps=5000, epoch=s / 5000, epochs=1, samples_seen=32 * s,
                     loss=2 + 3 * math.exp(-s / 40), lr=1e-4, grad_norm=1.0, samples_per_s=300.0,
                     tokens_per_s=75000.0, batch_size=16, grad_accum=1, mfu=0.4)
    RunFile(name="bench-idle", created=time.time(), config={"model": "tiny", "epochs": 1}, status="running",
            attempt=1, batch_size=16, grad_accum=1, world_size=2, effective_batch=32, ladder=[16, 12, 8],
            data_fingerprint="demo", supervisor_pid=os.getpid(), socket=str(path / "control.sock")).write(run)
    return run


def writer(run: RunDir, stop: threading.Event, steps: bool) -> None:
    i, step = 0, 200
    log = EventLog(run.events, attempt=1)
    while not stop.wait(1.0):
        with open(run.telemetry, "ab") as f:
            f.write(ev.encode(sample(i)))
        if steps:
            step += 1
            log.emit("step", step=step, total_steps=5000, epoch=step / 5000, epochs=1, samples_seen=32 * step,
                     loss=2 + 3 * math.exp(-step / 40), lr=1e-4, grad_norm=1.0, samples_per_s=300.0,
                     tokens_per_s=75000.0, batch_size=16, grad_accum=1, mfu=0.4)
        i += 1
    log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--size", default="120x40")
    ap.add_argument("--steps", action="store_true", help="also append a step event every second")
    ap.add_argument("--headless", action="store_true", help="Textual's headless driver instead of tmux")
    ap.add_argument("--show", action="store_true", help="print the tmux screen at the end (a check that it drew)")
    args = ap.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    use_tmux = not args.headless and shutil.which("tmux") is not None

    tmp = Path(tempfile.mkdtemp(prefix="sftui-bench-"))
    run = make_run(tmp / "run")
    lock_fd = acquire_lock(run)  # this process plays the live supervisor
    stop = threading.Event()
    thread = threading.Thread(target=writer, args=(run, stop, args.steps), daemon=True)
    thread.start()
    pidfile = tmp / "tui.pid"
    code = (f"import os,sys; sys.path.insert(0,{str(ROOT / 'src')!r}); open({str(pidfile)!r},'w').write(str(os.getpid()));"
            f"from sftui.tui.app import SftuiApp; SftuiApp({str(run.path)!r}).run(headless={args.headless!r}"
            f"{', size=(%d, %d)' % (width, height) if args.headless else ''})")
    session = f"sftui-bench-{os.getpid()}"
    proc = None
    try:
        if use_tmux:
            subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", str(width), "-y", str(height),
                            f"TERM=xterm-256color {sys.executable} -c {json.dumps(code)}"], check=True)
        else:
            proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while not pidfile.exists() or not pidfile.read_text():
            if time.time() > deadline:
                print("the TUI did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        tui = psutil.Process(int(pidfile.read_text()))
        time.sleep(args.warmup)
        c0, t0 = tui.cpu_times(), time.monotonic()
        time.sleep(args.seconds)
        c1, t1 = tui.cpu_times(), time.monotonic()
        if use_tmux and args.show:
            print(subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout)
        used = (c1.user - c0.user) + (c1.system - c0.system)
        pct = 100 * used / (t1 - t0)
        where = f"tmux {width}x{height}, TERM=xterm-256color" if use_tmux else f"headless driver {width}x{height}"
        print(f"TUI idle CPU: {pct:.2f} % of one core over {t1 - t0:.1f} s "
              f"({where}; 2 GPUs of telemetry at 1 Hz{'; a step event every second' if args.steps else ''}; "
              f"RSS {tui.memory_info().rss / 2**20:.0f} MiB)")
        return 0
    finally:
        stop.set()
        if use_tmux:
            subprocess.run(["tmux", "kill-session", "-t", session], stderr=subprocess.DEVNULL)
        if proc is not None:
            proc.terminate()
            proc.wait(5)
        os.close(lock_fd)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
