"""Who holds each GPU (issue 19, item 3): NVML's process records into telemetry, told apart into
this attempt's ranks, ranks left from an earlier attempt and foreign processes; the GPU panel's
lines, the OOM prompt's and the supervisor's naming of the biggest outsider; allocated next to
reserved (issue 16, item 3) in the GPU rows and in `sftui status`. From recorded telemetry."""

from __future__ import annotations

import getpass
import io
import os
import subprocess
import sys

import psutil
import pynvml
import pytest

from sftui import events as ev
from sftui.headless import HeadlessLog, status_lines
from sftui.rundir import RunDir
from sftui.gpumemory import RankPids, peak_text
from sftui.runstate import RunWatcher
from sftui.supervisor import Supervisor, oom_holder_note
from sftui.telemetry import gpu_processes
from sftui.tui.app import SftuiApp
from sftui.tui.oom import OomScreen
from memory_support import (FOREIGN, HOST, LEFTOVER, RANK_PIDS, event, oom_with_foreign_run, procs_sample, rank_proc,
                            shared_run, shared_sample)
from test_tui_support import CLOCK, GIB, GPU_UUIDS, HeldLock, fixed_clock, polled, screen_text


def nvml_record(pid: int, used: int | None):
    """A process record as pynvml hands it out: its v3 struct through nvmlStructToFriendlyObject
    (pynvml itself turns NVML_VALUE_NOT_AVAILABLE into None afterwards, as here)."""
    record = pynvml.nvmlStructToFriendlyObject(pynvml.c_nvmlProcessInfo_v3_t(pid=pid, usedGpuMemory=used or 0))
    if used is None:
        record.usedGpuMemory = None
    return record


def test_nvml_records_become_telemetrys_procs():
    """This very process (a real one, looked up through psutil) as NVML would list it on a GPU,
    twice (compute and graphics: once, at the larger figure), beside a pid that no longer exists
    and one whose memory the driver does not say."""
    me = os.getpid()
    gone = 2**22 + 12345  # above any Linux pid_max
    while psutil.pid_exists(gone):
        gone += 1
    procs = gpu_processes([nvml_record(gone, 2 * GIB), nvml_record(me, 3 * GIB), nvml_record(me, GIB),
                           nvml_record(1, None)])
    assert [p["pid"] for p in procs] == [me, gone, 1]  # biggest first, unknown memory last
    mine = procs[0]
    assert mine["mem"] == 3 * GIB and mine["user"] == getpass.getuser()
    argv = psutil.Process(me).cmdline()
    assert mine["command"].split()[0] == os.path.basename(argv[0])  # the program without its directory
    assert "pytest" in mine["command"] and sys.executable not in mine["command"]
    assert procs[1] == {"pid": gone, "user": None, "command": None, "mem": 2 * GIB}
    assert procs[2]["mem"] is None


def test_a_command_of_several_lines_reads_as_one(tmp_path):
    """Seen on an H200: a holder started as `python3 -c "<a script of several lines>"` broke the
    OOM warning over several lines of the log. Its command reads as one line."""
    script = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        (proc,) = gpu_processes([nvml_record(child.pid, GIB)])
    finally:
        child.kill()
        child.wait()
    assert proc["command"] == f"{os.path.basename(sys.executable)} -c import time print('ready', flush=True) time.sleep(60)"


def test_a_new_supervisor_knows_the_ranks_of_earlier_ones(tmp_path):
    """After a --resume the supervisor is a new process: attempt 1's rank 1, still on GPU 1,
    must read as left over in its OOM note, not as a foreign process."""
    path = shared_run(tmp_path)
    sup = Supervisor(RunDir(path))
    oom = event("oom", CLOCK, 2, step=150, batch_size=12, rank=1, gpu_uuid=GPU_UUIDS[1], where="backward",
                message="CUDA out of memory", emergency_checkpoint=149, injected=False)
    assert oom_holder_note(oom, shared_sample(CLOCK), sup._ranks) == (
        "out of memory on GPU 1: 10.5 GiB held by pid 4001 (rank 1 of attempt 1, left over), user alice, "
        "python -m sftui.trainer /runs/alpaca-7b")


def test_holders_are_told_apart(tmp_path):
    """This attempt's ranks, attempt 1's rank 1 still there, bob's job; a pid of a rank on
    another machine of the run is not one of this machine's processes."""
    w = RunWatcher(shared_run(tmp_path))
    w.poll()
    s = w.state
    gpu0, gpu1 = s.telemetry["gpus"]
    assert [(h.pid, h.role, h.rank, h.attempt) for h in s.holders(gpu0)] == [
        (RANK_PIDS[0], "rank", 0, 2), (FOREIGN["pid"], "foreign", None, None)]
    assert [(h.pid, h.role, h.rank, h.attempt) for h in s.holders(gpu1)] == [
        (RANK_PIDS[1], "rank", 1, 2), (LEFTOVER["pid"], "leftover", 1, 1)]
    ranks = RankPids()
    ranks.see(event("rank_start", CLOCK, 2, rank=1, pid=FOREIGN["pid"], host="node2", gpu_uuid=None))
    assert [h.role for h in ranks.holders(gpu0, HOST, 2)] == ["foreign", "foreign"]
    assert [h.role for h in ranks.holders(gpu0, "node2", 2)] == ["foreign", "rank"]


def test_the_supervisor_names_the_biggest_outsider_after_an_oom():
    """The `log` line the supervisor writes after a rank's `oom` (the rank has no telemetry)."""
    ranks = RankPids()
    for attempt, pids in ((1, (4000, 4001)), (2, RANK_PIDS)):
        for rank, pid in enumerate(pids):
            ranks.see(event("rank_start", CLOCK, attempt, rank=rank, pid=pid, host=HOST, gpu_uuid=GPU_UUIDS[rank]))
    sample = shared_sample(CLOCK)

    def oom(gpu: int | None, attempt: int = 2) -> dict:
        return event("oom", CLOCK, attempt, step=80, batch_size=12, rank=gpu or 0,
                     gpu_uuid=None if gpu is None else GPU_UUIDS[gpu], where="backward", message="CUDA out of memory",
                     emergency_checkpoint=79, injected=False)

    assert oom_holder_note(oom(0), sample, ranks) == (
        "out of memory on GPU 0: 12.3 GiB held by pid 51234, user bob, python train.py --lr 3e-4")
    assert oom_holder_note(oom(1), sample, ranks) == (
        "out of memory on GPU 1: 10.5 GiB held by pid 4001 (rank 1 of attempt 1, left over), user alice, "
        "python -m sftui.trainer /runs/alpaca-7b")
    alone = shared_sample(CLOCK)
    alone["gpus"][0]["procs"] = alone["gpus"][0]["procs"][:1]
    assert oom_holder_note(oom(0), alone, ranks) is None  # only the run's own rank there
    assert oom_holder_note(oom(None), sample, ranks) is None  # on the CPU
    assert oom_holder_note(oom(0), None, ranks) is None  # no telemetry yet


def test_the_headless_log_names_the_holder_after_the_oom_line(tmp_path):
    path = shared_run(tmp_path)
    out = io.StringIO()
    log = HeadlessLog(RunDir(path), lambda: None, out)
    ranks = RankPids()
    for e in (event("attempt_start", CLOCK, 3, batch_size=8, grad_accum=2, world_size=2, effective_batch=32,
                    resume_step=150),
              event("rank_start", CLOCK, 3, rank=0, pid=4200, host=HOST, gpu_uuid=GPU_UUIDS[0])):
        ranks.see(e)
        log(e)
    oom = event("oom", CLOCK + 1, 3, step=151, batch_size=8, rank=0, gpu_uuid=GPU_UUIDS[0], where="forward",
                message="CUDA out of memory", emergency_checkpoint=150, injected=False)
    log(oom)
    sample = procs_sample(CLOCK, [rank_proc(4200, 30.2), FOREIGN], [])
    log(ev.make("log", 3, level="warning", message=oom_holder_note(oom, sample, ranks)))
    lines = out.getvalue().splitlines()
    assert "OUT OF MEMORY at step 151, batch 8, rank 0 (forward)" in lines[-2]
    assert lines[-1].endswith("warning: out of memory on GPU 0: 12.3 GiB held by pid 51234, user bob, "
                              "python train.py --lr 3e-4")


async def test_the_gpu_panel_lists_the_holders(tmp_path):
    """120x40: every holder, this attempt's ranks marked; 80x24 (compact): only the flagged ones."""
    path = shared_run(tmp_path)
    lock = HeldLock(path)
    try:
        app = SftuiApp(path, clock=fixed_clock)
        async with app.run_test(size=(120, 40)) as pilot:
            await polled(pilot)
            text = screen_text(app)
            assert "▶ rank 0    pid 4100     62.1 GiB  alice      python -m sftui.trainer /runs/alpaca-7b" in text
            assert "✗ foreign   pid 51234    12.3 GiB  bob        python train.py --lr 3e-4" in text
            assert ("✗ left over pid 4001     10.5 GiB  alice      attempt 1 rank 1: python -m sftui.trainer"
                    in text)
            await pilot.resize_terminal(80, 24)
            await pilot.pause(0.2)
            text = screen_text(app)
            assert "✗ foreign   pid 51234" in text and "✗ left over pid 4001" in text
            assert "▶ rank" not in text
    finally:
        lock.release()


async def test_the_oom_prompt_names_the_biggest_foreign_holder(tmp_path):
    path = oom_with_foreign_run(tmp_path)
    lock = HeldLock(path)
    try:
        app = SftuiApp(path, clock=fixed_clock)
        async with app.run_test(size=(120, 40)) as pilot:
            await polled(pilot, OomScreen)
            assert "GPU 1: 40.2 GiB held by pid 51234, user bob, python train.py" in screen_text(app)
    finally:
        lock.release()


def test_holders_snapshot_120x40(tmp_path, snap_compare):
    """A shared machine: bob's job on GPU 0, attempt 1's rank 1 left on GPU 1, both GPUs under
    memory pressure, allocated next to reserved."""
    path = shared_run(tmp_path)
    lock = HeldLock(path)
    try:
        assert snap_compare(SftuiApp(path, clock=fixed_clock), terminal_size=(120, 40), run_before=polled)
    finally:
        lock.release()


def test_oom_prompt_with_a_foreign_holder_80x24(tmp_path, snap_compare):
    """The holder's line fits the prompt at 80x24, keys included."""
    path = oom_with_foreign_run(tmp_path)
    lock = HeldLock(path)
    try:
        assert snap_compare(SftuiApp(path, clock=fixed_clock), terminal_size=(80, 24),
                            run_before=lambda pilot: polled(pilot, OomScreen))
    finally:
        lock.release()


@pytest.mark.parametrize("alloc,reserved,text", [
    (int(21.2 * GIB), int(21.9 * GIB), "alloc 21.2 / res 21.9 GiB"),
    (int(21.91 * GIB), int(21.94 * GIB), "peak 21.9 GiB"),  # the same as shown: one figure
    (None, int(21.9 * GIB), "peak 21.9 GiB"),
    (None, None, None),
])
def test_peak_text(alloc, reserved, text):
    assert peak_text(alloc, reserved) == text


def test_status_shows_allocated_next_to_reserved(tmp_path):
    path = shared_run(tmp_path)
    lock = HeldLock(path)
    try:
        w = RunWatcher(path)
        w.poll()
        lines = status_lines(w.state)
    finally:
        lock.release()
    gpu_lines = [line for line in lines if " util " in line]
    assert gpu_lines[0].endswith("alloc 58.1 / res 61.2 GiB") and gpu_lines[1].endswith("alloc 60.3 / res 67.5 GiB")
