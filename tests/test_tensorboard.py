"""TensorBoard (issue 19, item 1): `--report-to tensorboard` writes event files while a real run
trains, across an out-of-memory restart and a supervisor resume; `sftui export --tensorboard`
writes the same records afterwards. Everything is read back with TensorBoard's own reader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import kinds, read_events, run_sftui, sftui_env, wait_for_event, wait_no_processes, write_rows
from sftui import events as ev
from sftui.rundir import RunDir
from sftui.runfile import RunFile
from sftui.runstate import describe_event
from sftui.tboard import LiveReport

GIB = 1024**3
STEP_TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
             "samples_per_s": "train/samples_per_second", "tokens_per_s": "train/tokens_per_second",
             "batch_size": "train/batch_size", "epoch": "train/epoch"}


def read_back(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(s.step, s.value) for s in acc.Scalars(tag)]


def texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(t.step, t.tensor_proto.string_val[0].decode()) for t in acc.Tensors(tag)]


def assert_scalars_are_the_steps(acc: EventAccumulator, steps: list[dict]) -> None:
    """Every step event's numbers at its own training step, in order, float32 as TensorBoard keeps them."""
    for field, tag in STEP_TAGS.items():
        want = [(s["step"], s[field]) for s in steps]
        got = scalars(acc, tag)
        assert [step for step, _ in got] == [step for step, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag


@pytest.mark.slow
def test_a_run_reports_to_tensorboard_across_an_oom_and_a_resume_and_export_agrees(tmp_path):
    """A CPU run with an injected OOM at step 3 (batch 4 → 2), stopped, then resumed by a second
    supervisor: two event files; loss, lr, grad norm, speed, epoch and batch size at every step
    event's own step, the batch a step down at the OOM, the OOM, decision and switch as text;
    `sftui export` writes the same."""
    data = write_rows(tmp_path / "d.jsonl", 400)
    run_dir = tmp_path / "run"
    started = run_sftui("run", "--detach", "--run-dir", str(run_dir), "--cpu", "--data", str(data), "--max-len", "32",
                        "--batch", "4", "--ladder", "4,2", "--log-every", "1", "--checkpoint-every", "0",
                        "--inject-oom-at-step", "3", "--on-oom", "auto", "--report-to", "tensorboard", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e.get("attempt") == 2 and e["step"] >= 5, 240)
    assert run_sftui("stop", str(run_dir)).returncode == 0
    first_end = wait_for_event(run_dir, lambda e: e["kind"] == "run_end")
    wait_no_processes(run_dir)
    resumed = run_sftui("run", "--resume", str(run_dir), "--detach", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e.get("attempt") == 3, 240)
    assert run_sftui("stop", str(run_dir)).returncode == 0
    wait_for_event(run_dir, lambda e: e["kind"] == "run_end" and e["t"] > first_end["t"])
    wait_no_processes(run_dir)

    events = read_events(run_dir)
    steps = kinds(events, "step")
    logdir = run_dir / "tensorboard"
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 2, files  # one per supervisor
    assert any(f"TensorBoard event files go to {logdir}" in str(e.get("message")) for e in kinds(events, "log"))

    live = read_back(logdir)
    assert_scalars_are_the_steps(live, steps)
    numbers = [s["step"] for s in steps]
    assert numbers == sorted(set(numbers)) and numbers[0] == 1  # the training step, on through the resume
    resume = kinds(events, "attempt_start")[-1]["resume_step"]
    assert resume is not None and min(s["step"] for s in steps if s["attempt"] == 3) == resume + 1

    # the OOM at step 3: batch 4 until step 2, then 2: a step down in the curve
    assert scalars(live, "train/batch_size") == [(n, 4.0 if n < 3 else 2.0) for n in numbers]
    assert "train/mfu" not in live.Tags()["scalars"]  # null on the CPU: no made-up zeros
    # the OOM at its own step, the decision and the switch at the step the run had reached (2), each
    # in the words of the log
    (oom,), (decision,), (change,) = (kinds(events, kind) for kind in ("oom", "decision", "batch_change"))
    assert texts(live, "events/oom") == [(3, describe_event(oom))]
    assert texts(live, "events/decision") == [(2, describe_event(decision))]
    assert texts(live, "events/batch_change") == [(2, describe_event(change))]
    assert describe_event(oom).startswith("OUT OF MEMORY at step 3, batch 4") and "batch 4 → 2" in describe_event(change)

    out = tmp_path / "exported"
    result = run_sftui("export", str(run_dir), "--tensorboard", str(out))
    assert result.returncode == 0, result.stderr
    (exported_file,) = out.glob("events.out.tfevents.*")
    assert str(exported_file) in result.stdout
    exported = read_back(out)
    assert exported.Tags()["scalars"] == live.Tags()["scalars"]
    for tag in live.Tags()["scalars"]:
        assert scalars(exported, tag) == scalars(live, tag), tag
    for tag in ("events/oom", "events/decision", "events/batch_change"):
        assert texts(exported, tag) == texts(live, tag), tag
    # exporting again replaces its file rather than doubling every point
    assert run_sftui("export", str(run_dir), "--tensorboard", str(out)).returncode == 0
    assert list(out.glob("events.out.tfevents.*")) == [exported_file]
    assert scalars(read_back(out), "train/loss") == scalars(live, "train/loss")


def recorded_gpu_run(path: Path) -> RunDir:
    """A run directory as a two-GPU run leaves it (--log-every 2): rank_stats carry no step and
    rank 1's report of step 4 comes before rank 0's step event; attempt 2 resumes after step 4."""
    run = RunDir(path)
    path.mkdir()
    RunFile(name="gpu", created=1_700_000_000.0).write(run)
    lines = [ev.make("run_start", config={"log_every": 2})]
    for attempt, resume, last in ((1, None, 5), (2, 4, 8)):
        lines.append(ev.make("attempt_start", attempt, batch_size=16 if attempt == 1 else 12, grad_accum=1,
                             world_size=2, effective_batch=32, resume_step=resume))
        for step in range((resume or 0) + 1, last + 1):
            if step % 2 == 0:
                lines.append(ev.make("rank_stats", attempt, rank=1, gpu_uuid="GPU-b", mem_peak_bytes=step * GIB,
                                     mem_reserved_bytes=(step + 1) * GIB, alloc_retries=0))
            lines.append(ev.make("step", attempt, step=step, loss=1.0 / step, batch_size=16, mfu=0.25))
            if step % 2 == 0:
                lines.append(ev.make("rank_stats", attempt, rank=0, gpu_uuid="GPU-a", mem_peak_bytes=2 * step * GIB,
                                     mem_reserved_bytes=None, alloc_retries=0))
        if attempt == 1:
            lines.append(ev.make("eval", attempt, step=4, loss=0.5, samples=10))
    run.events.write_bytes(b"".join(ev.encode(e) for e in lines))
    return run


def test_each_gpus_memory_at_the_step_it_was_measured(tmp_path):
    """Allocated and reserved peaks per rank in GiB, at the step of each report (counted from the
    attempt's resume step), whatever order the ranks' lines came in; eval loss and MFU too."""
    run = recorded_gpu_run(tmp_path / "run")
    result = run_sftui("export", str(run.path), "--tensorboard", str(tmp_path / "tb"))
    assert result.returncode == 0, result.stderr
    acc = read_back(tmp_path / "tb")
    assert scalars(acc, "memory/rank1/allocated_gib") == [(2, 2.0), (4, 4.0), (6, 6.0), (8, 8.0)]
    assert scalars(acc, "memory/rank1/reserved_gib") == [(2, 3.0), (4, 5.0), (6, 7.0), (8, 9.0)]
    assert scalars(acc, "memory/rank0/allocated_gib") == [(2, 4.0), (4, 8.0), (6, 12.0), (8, 16.0)]
    assert "memory/rank0/reserved_gib" not in acc.Tags()["scalars"]  # never reported
    assert scalars(acc, "eval/loss") == [(4, 0.5)]
    assert [v for _, v in scalars(acc, "train/mfu")] == pytest.approx([0.25] * 9)


def test_export_refuses_bad_input_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    run = recorded_gpu_run(tmp_path / "run")
    for args, needle in (
        (["export", str(tmp_path), "--tensorboard", str(tmp_path / "tb")], "not a run directory (no run.json)"),
        (["export", str(run.path), "--tensorboard", str(tmp_path / "afile" / "tb")], "afile/tb: Not a directory"),
        (["export", str(run.path), "--tensorboard", str(tmp_path / "afile")], "afile: Not a directory"),
        (["export", str(run.path)], "the following arguments are required: --tensorboard"),
        (["run", "--report-to", "wandb"], "--report-to: expected one of none, tensorboard, got 'wandb'"),
    ):
        result = run_sftui(*args, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr)
    assert not (tmp_path / "tb").exists()


def test_a_failing_write_is_said_once_and_training_goes_on(tmp_path):
    """The live observer, where RUN_DIR/tensorboard cannot be a directory: one warning, no
    exception into the supervisor, nothing more tried."""
    (tmp_path / "tensorboard").write_text("in the way")
    said: list[tuple[str, str]] = []
    report = LiveReport(RunDir(tmp_path), lambda level, message: said.append((level, message)))
    for step in (1, 2):
        report(ev.make("step", 1, step=step, loss=1.0))
    assert len(said) == 1 and said[0][0] == "warning" and "--report-to tensorboard:" in said[0][1], said
    assert f"sftui export {tmp_path} --tensorboard DIR" in said[0][1]


def test_the_writer_needs_neither_torch_nor_tensorflow(tmp_path):
    """Importing the module loads no TensorBoard at all (the supervisor starts as fast as
    before); writing loads neither torch nor TensorFlow, even where TensorFlow is installed (a
    stand-in that fails on import: TensorBoard's EventFileWriter would import it)."""
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('tensorflow was imported')\n")
    run = recorded_gpu_run(tmp_path / "run")
    code = (
        "import sys\n"
        "from sftui import tboard, supervisor\n"
        "assert not {'tensorboard', 'numpy'} & set(sys.modules), 'imported at once'\n"
        "from pathlib import Path\n"
        "from sftui.rundir import RunDir\n"
        f"print(tboard.export(RunDir(Path({str(run.path)!r})), Path({str(tmp_path / 'tb')!r}))[1])\n"
        "print(sorted({'torch', 'tensorflow', 'textual'} & {m.split('.')[0] for m in sys.modules}))\n"
    )
    env = sftui_env()
    env["PYTHONPATH"] = f"{tmp_path / 'site'}:{env['PYTHONPATH']}"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    records, heavy = out.stdout.splitlines()
    assert int(records) > 0 and heavy == "[]", out.stdout


def test_a_resume_may_switch_reporting_on():
    """A run started without --report-to can be resumed with it (and the reverse)."""
    from sftui.config import RunConfig

    state = RunFile.new(RunConfig(model="tiny", data="demo", cpu=True), "t", "demo", 100)
    assert state.cfg.report_to == "none"
    assert state.resumed({"report_to": "tensorboard"}).cfg.report_to == "tensorboard"
