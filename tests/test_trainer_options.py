"""Worker options that trade compute for memory must not change what is learned."""

from __future__ import annotations

from conftest import kinds, read_events, run_sftui, write_rows


def step_losses(tmp_path, name, *extra):
    data = write_rows(tmp_path / "d.jsonl", 48)
    run_dir = tmp_path / name
    result = run_sftui("run", "--headless", "--cpu", "--run-dir", str(run_dir), "--data", str(data), "--batch", "8",
                       "--max-steps", "4", "--log-every", "1", "--max-len", "32", "--checkpoint-every", "0", *extra,
                       cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    return [e["loss"] for e in kinds(read_events(run_dir), "step")]


def test_gradient_checkpointing_trains_the_same_curve(tmp_path):
    plain = step_losses(tmp_path, "plain")
    recomputed = step_losses(tmp_path, "ckpt", "--gradient-checkpointing")
    assert len(plain) == 4 and plain[-1] < plain[0]
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(plain, recomputed)), (plain, recomputed)
