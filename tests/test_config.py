"""config.py: defaults, TOML, flags, validation messages and the ladder math."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sftui import config as c
from sftui.config import ConfigError, RunConfig


def test_defaults_put_batch_on_the_ladder():
    cfg = c.build({})
    assert cfg.batch == 16 and cfg.ladder == [16, 12, 8]
    cfg = c.build({"batch": 10})
    assert cfg.ladder == [16, 12, 10, 8]


def test_toml_then_flags(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('batch = 12\nladder = [12, 6]\nlr = 2e-4\nrecord-samples = true\n')
    cfg = c.build({"lr": 1e-3}, str(f))
    assert cfg.batch == 12 and cfg.ladder == [12, 6] and cfg.lr == 1e-3 and cfg.record_samples


@pytest.mark.parametrize("text, needle", [
    ("batch = 0\n", "batch: expected a positive integer"),
    ("ladder = [8, 12]\n", "strictly descending"),
    ("bogus = 1\n", "bogus: unknown setting"),
    ("batch = \n", "invalid TOML"),
    ("cpu = 3\n", "cpu: expected true or false"),
])
def test_toml_errors_name_the_file_and_key(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        c.build({}, str(f))
    assert str(f) in str(e.value) and needle in str(e.value)
    assert "\n" not in str(e.value)


def test_flag_parsers():
    opt = c.OPTION_BY_NAME
    assert opt["batch"].parse("auto", "--batch") == "auto"
    assert opt["ladder"].parse("16,12,8", "--ladder") == [16, 12, 8]
    assert opt["mem_fraction"].parse("0.5,0.25", "--mem-fraction") == [0.5, 0.25]
    for name, bad in [("batch", "-1"), ("batch", "x"), ("ladder", "8,8"), ("mem_fraction", "1.5"), ("epochs", "0")]:
        with pytest.raises(ConfigError, match=opt[name].flag.replace("-", r"\-")):
            opt[name].parse(bad, opt[name].flag)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="--grad-accum and --effective-batch"):
        c.build({"grad_accum": 2, "effective_batch": 64})
    with pytest.raises(ConfigError, match="--num-processes"):
        c.build({"num_processes": 2})
    with pytest.raises(ConfigError, match="--inject-oom-rank"):
        c.build({"cpu": True, "num_processes": 2, "inject_oom_rank": 2})
    with pytest.raises(ConfigError, match="--mem-fraction"):
        c.build({"gpus": [0, 1], "mem_fraction": [0.5, 0.5, 0.5]})
    with pytest.raises(ConfigError, match="--compile-mode: only with --compile"):
        c.build({"compile_mode": "default"})
    with pytest.raises(ConfigError, match="--compile-mode: expected one of reduce-overhead, default"):
        c.OPTION_BY_NAME["compile_mode"].parse("fast", "--compile-mode")
    assert c.build({"compile": True, "compile_mode": "max-autotune"}).compile_mode == "max-autotune"
    for accumulation in ({"grad_accum": 2}, {"effective_batch": 64}):
        with pytest.raises(ConfigError, match="--compile-mode reduce-overhead: its CUDA graphs would overwrite"):
            c.build({"compile": True, "compile_mode": "reduce-overhead", **accumulation})
        assert c.build({"compile": True, "compile_mode": "max-autotune-no-cudagraphs", **accumulation}).compile


def test_compile_mode_defaults_to_cuda_graphs_only_where_they_were_measured():
    """CUDA graphs (reduce-overhead) for a model compiled whole in one process on a GPU without
    accumulation; torch's default under DDP, by layers, for micro-batches of many shapes (a T5's packed
    rows, rows padded to their longest), with accumulation and on the CPU; a mode the user gives is
    taken as given."""
    from sftui.config import WITHOUT_GRAPHS
    from sftui.trainer.compiling import CUDA_GRAPHS, resolve_mode

    measured = {"world": 1, "cuda": True, "layers": False, "accumulates": False, "shapes_vary": False}
    assert resolve_mode(None, **measured) == CUDA_GRAPHS == "reduce-overhead"
    for other in ({"world": 2}, {"cuda": False}, {"layers": True}, {"accumulates": True}, {"shapes_vary": True}):
        assert resolve_mode(None, **{**measured, **other}) == "default", other
    assert resolve_mode("max-autotune", **{**measured, "world": 2, "shapes_vary": True}) == "max-autotune"
    assert c.accumulates(c.build({"effective_batch": 64})) and not c.accumulates(c.build({}))
    assert set(WITHOUT_GRAPHS) == set(c.GRAPH_MODES) and not set(WITHOUT_GRAPHS.values()) & set(c.GRAPH_MODES)


def test_many_shapes_keep_cuda_graphs_off_by_default():
    """What resolve_mode's ``shapes_vary`` is for a run: a T5's packed rows vary in count and rows
    padded to their longest vary in width (a graph per value); rows padded to --max-len (the
    compiled default on a GPU) and a causal LM's token buckets do not."""
    from sftui.trainer.loop import shapes_vary

    compiled = RunConfig(compile=True)
    assert shapes_vary(replace(compiled, packing=True), seq2seq=True, cuda=True)
    assert not shapes_vary(replace(compiled, packing=False), seq2seq=True, cuda=True)
    assert not shapes_vary(replace(compiled, packing=True), seq2seq=False, cuda=True)
    for seq2seq in (False, True):
        assert shapes_vary(replace(compiled, packing=False, pad_to_max_len=False), seq2seq=seq2seq, cuda=True)


def test_ladder_math():
    assert c.next_rung([16, 12, 8], 16) == 12
    assert c.next_rung([16, 12, 8], 8) is None
    assert c.rung_above([16, 12, 8], 12) == 16
    cfg = RunConfig(effective_batch=64, cpu=True, num_processes=2)
    assert [c.grad_accum_for(cfg, b) for b in (16, 12, 8)] == [2, 3, 4]
    assert c.grad_accum_for(RunConfig(grad_accum=3), 8) == 3



def test_a_ladder_built_below_a_batch_past_the_given_one():
    """--batch auto past a short ladder: the default ladder's steps (×3/4, ×2/3) down to it."""
    assert c.ladder_below(24, [16, 12, 8]) == [24, 16, 12, 8]
    assert c.ladder_below(96, [16, 12, 8]) == [96, 72, 48, 36, 24, 16, 12, 8]
    big = c.ladder_below(1000, [16, 12, 8])
    assert big[:4] == [1000, 752, 496, 376] and big[-3:] == [16, 12, 8]
    assert big == sorted(set(big), reverse=True)
    assert all(b % 8 == 0 for b in big if b >= 64)
    assert all(later / earlier >= 0.6 for earlier, later in zip(big, big[1:]) if later > 16)


def test_round_trip_through_run_json():
    cfg = c.build({"batch": 12, "cpu": True, "num_processes": 2})
    assert RunConfig.from_dict(cfg.to_dict() | {"unknown_key": 1}) == cfg


def test_paths_in_a_config_file_are_read_from_its_directory(tmp_path, monkeypatch):
    """A config kept beside its data works from any directory (it used to resolve from the cwd)."""
    project = tmp_path / "project"
    project.mkdir()
    f = project / "run.toml"
    f.write_text('data = "sft.jsonl"\neval_data = "/abs/eval.jsonl"\nmodel = "tiny"\n')
    monkeypatch.chdir(tmp_path)
    cfg = c.build({}, "project/run.toml")
    assert Path(cfg.data).resolve() == project / "sft.jsonl"
    assert cfg.eval_data == "/abs/eval.jsonl" and cfg.model == "tiny"
    assert c.build({"data": "here.jsonl"}, str(f)).data == "here.jsonl"  # a flag is the shell's: from the cwd
    f.write_text('data = "demo"\nmodel = "models/qwen"\n')
    cfg = c.build({}, str(f))
    assert cfg.data == "demo" and Path(cfg.model) == project / "models" / "qwen"


def test_max_steps_becomes_the_samples_of_exactly_that_many_steps():
    """Short last steps of an epoch count as steps: --max-steps N on 300 rows at 16 is 40 steps, not 41."""
    for rows, per_step, steps in [(300, 16, 40), (19, 16, 3), (6000, 16, 375), (100, 7, 33), (5, 8, 4)]:
        budget = c.samples_in_steps(steps, per_step, rows)
        assert c.count_steps(0, per_step, rows, budget) == steps
        assert c.count_steps(0, per_step, rows, budget + 1) == steps + 1
    assert c.samples_in_steps(40, 16, 300) == 632


def test_a_resumed_run_injects_no_oom_and_may_drop_the_injecting_rank() -> None:
    """--inject-oom-at-step fires in attempt 1 only: a run of two ranks that injected on rank 1
    resumes on one rank (it used to be refused: "1 is not a rank of a run of 1")."""
    from sftui.config import validate
    from sftui.runfile import RunFile

    spec = RunFile.new(RunConfig(cpu=True, num_processes=2, inject_oom_at_step=3, inject_oom_rank=1), "r", "f" * 64, 100)
    cfg = spec.resumed({"num_processes": 1}).cfg
    validate(cfg)
    assert (cfg.world_size, cfg.inject_oom_at_step, cfg.inject_oom_rank) == (1, None, 0)


def test_a_compiled_run_resumes_uncompiled() -> None:
    """--no-compile on --resume takes the compile's own settings with it (they are refused without
    --compile), unless given anew."""
    from sftui.config import validate
    from sftui.runfile import RunFile

    spec = RunFile.new(RunConfig(cpu=True, compile=True, compile_layers=True, compile_mode="default"), "r", "f" * 64, 100)
    cfg = spec.resumed({"compile": False}).cfg
    validate(cfg)
    assert (cfg.compile, cfg.compile_layers, cfg.compile_mode) == (False, False, None)
    with pytest.raises(ConfigError, match="--compile-mode: only with --compile"):
        validate(spec.resumed({"compile": False, "compile_mode": "default"}).cfg)
    assert spec.resumed({}).cfg.compile_mode == "default"
