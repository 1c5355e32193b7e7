"""The command line: argument parsing and the subcommands. No training or UI logic here.

Heavy modules (textual, torch) are imported only by the subcommands that need them, so that
`run --headless`, `status` and `stop` start fast and work where textual is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from sftui import __version__
from sftui import config as cfgmod
from sftui import events as ev
from sftui.config import OPTIONS, ConfigError, RunConfig
from sftui.forecast import DEFAULT_TARGET
from sftui.probing import ProbeFailed, require_gpu
from sftui.rundir import RunDir, lock_is_held, read_json, write_json_atomic

RESUME_MUTABLE = {
    "batch", "ladder", "on_oom", "oom_timeout", "max_oom_restarts", "hang_timeout", "notify", "checkpoint_every",
    "keep_checkpoints", "log_every", "eval_every", "dataloader_workers", "compile", "gpus", "cpu",
    "num_processes", "mem_fraction", "record_samples", "skip_bad_rows", "peak_tflops",
    "num_machines", "main_process_ip", "main_process_port", "pad_to_max_len", "compile_layers",
}
START_TIMEOUT_S = 15.0
# The settings the memory probe takes: what shapes the model, the data, the devices and memory.
PROBE_OPTIONS = ("model", "data", "ladder", "max_len", "lr", "weight_decay", "seed", "gpus", "mem_fraction",
                 "gradient_checkpointing", "compile", "compile_layers", "pad_to_max_len", "skip_bad_rows",
                 "hang_timeout")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ev.EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(message: str) -> NoReturn:
    print(f"sftui: {message}", file=sys.stderr)
    raise SystemExit(ev.EXIT_USAGE)


# --- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="sftui",
        description="Supervise supervised fine-tuning runs: a live screen of GPUs, memory and loss; "
        "a worker that survives SSH drops; restarts at a smaller batch after CUDA out-of-memory.",
        epilog="`sftui run` with no arguments trains the built-in tiny model on the built-in demo data.",
    )
    p.add_argument("--version", action="version", version=f"sftui {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    run = sub.add_parser("run", help="start a run (the TUI in a terminal, a plain log otherwise)",
                         description="Validate the inputs, start the supervisor and show the run.")
    run.add_argument("--config", metavar="FILE.toml", help="settings file; flags override it")
    add_options(run, OPTIONS)
    run.add_argument("--run-dir", metavar="DIR", help="the run directory (default: ./runs/NAME-YYYYmmdd-HHMMSS)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or failed run from its latest checkpoint")
    run.add_argument("--headless", action="store_true", help="print a plain log instead of the TUI (implied without a TTY)")
    run.add_argument("--detach", action="store_true", help="start the run in the background, print its directory, exit")

    attach = sub.add_parser("attach", help="show a run in the TUI (live or finished)")
    attach.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="default: the newest run under ./runs")

    status = sub.add_parser("status", help="one-shot summary of a run")
    status.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="default: the newest run under ./runs")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    for name, text in (("stop", "stop a run gracefully (checkpoint, then exit; resumable)"),
                       ("checkpoint", "write a checkpoint now")):
        c = sub.add_parser(name, help=text)
        c.add_argument("run_dir", metavar="RUN_DIR")

    sb = sub.add_parser("set-batch", help="switch the per-GPU batch size at the next step boundary")
    sb.add_argument("run_dir", metavar="RUN_DIR")
    sb.add_argument("batch_size", metavar="N")

    d = sub.add_parser("decide", help="answer a pending out-of-memory question: restart [BATCH] or stop",
                       description="Answer a pending out-of-memory question. BATCH is a per-GPU batch size (the "
                       "TUI's prompt takes rung numbers instead); without it, the proposed rung.")
    d.add_argument("run_dir", metavar="RUN_DIR")
    d.add_argument("action", choices=("restart", "stop"))
    d.add_argument("batch_size", nargs="?", metavar="BATCH", help="per-GPU batch size to restart at (default: the proposed one)")

    probe = sub.add_parser("probe", help="measure peak GPU memory per batch size and recommend a rung",
                           description="A few optimizer steps at two or more batch sizes on the longest rows, on the "
                           "run's GPUs; a forecast of the peak for every rung of the ladder.")
    probe.add_argument("--config", metavar="FILE.toml", help="settings file; flags override it")
    add_options(probe, [cfgmod.OPTION_BY_NAME[name] for name in PROBE_OPTIONS])
    probe.add_argument("--target", default=str(DEFAULT_TARGET), metavar="F",
                       help=f"fraction of the smallest free GPU memory a rung may use (default: {DEFAULT_TARGET})")
    probe.add_argument("--json", action="store_true", help="print the forecast as JSON (forecast.json's form)")

    node = sub.add_parser("node", help="take part in a multi-node run as machine R (machine 0 runs `sftui run`)",
                          description="Follow a run started with `sftui run --num-machines N` on a shared "
                          "filesystem: launch this machine's ranks for every attempt, until the run ends.")
    node.add_argument("run_dir", metavar="RUN_DIR", help="the run directory, as this machine mounts it")
    node.add_argument("--machine-rank", required=True, metavar="R", help="this machine's rank, 1 to N-1")

    runs = sub.add_parser("runs", help="list runs with status, step, batch and last event")
    runs.add_argument("--root", default="runs", metavar="DIR", help="where runs live (default: ./runs)")

    return p


def add_options(parser: argparse.ArgumentParser, options: Any) -> None:
    """Flags from config.OPTIONS; unset ones stay absent, so the config file can fill them."""
    for opt in options:
        if opt.is_flag and opt.negatable:
            parser.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=opt.help)
        elif opt.is_flag:
            parser.add_argument(opt.flag, dest=opt.name, action="store_true", default=argparse.SUPPRESS, help=opt.help)
        else:
            parser.add_argument(opt.flag, dest=opt.name, metavar=opt.metavar, default=argparse.SUPPRESS, help=opt.help)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed values of the OPTIONS flags given on the command line."""
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        if hasattr(args, opt.name):
            text = getattr(args, opt.name)
            values[opt.name] = text if opt.is_flag else opt.parse(text, opt.flag)
    return values


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Everything sftui creates (run directory, logs, checkpoints, the ranks' files: they inherit
    # it) is its owner's alone on a shared server.
    os.umask(0o077)
    if argv[:1] == ["_supervise"] and len(argv) == 2:  # the background supervisor; not a user command
        from sftui.supervisor import main_detached

        return main_detached(argv[1])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handler = {
        "run": cmd_run, "attach": cmd_attach, "status": cmd_status, "stop": cmd_control, "checkpoint": cmd_control,
        "set-batch": cmd_control, "decide": cmd_control, "runs": cmd_runs, "probe": cmd_probe, "node": cmd_node,
    }[args.command]
    try:
        return handler(args)
    except BrokenPipeError:
        # `sftui status R | head -1`: the reader took what it wanted. No traceback, and nothing
        # more written at exit to the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ev.EXIT_FINISHED
    except ConfigError as e:
        fail(str(e))
    except ProbeFailed as e:
        print(f"sftui: probe: {e}", file=sys.stderr)
        return ev.EXIT_FAILED
    except KeyboardInterrupt:
        return ev.EXIT_INTERRUPTED


# --- run ----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    values = flag_values(args)
    if args.resume:
        run = prepare_resume(args, values)
    else:
        cfg = cfgmod.build(values, args.config)
        run = prepare_new(args, cfg)
    headless = args.headless or (not args.detach and not sys.stdout.isatty())
    if args.detach:
        start_detached(run)
        print(run.path)
        return ev.EXIT_FINISHED
    if headless:
        return run_headless(run)
    start_detached(run)
    return attach_tui(run)


def resolve_devices(cfg: RunConfig) -> str | None:
    """GPUs: all visible by default; --gpus picks among the visible ones. No GPU: the CPU (a note)."""
    if cfg.cpu:
        return None
    from sftui.telemetry import visible_gpus

    visible, why = visible_gpus()
    if cfg.gpus is None:
        if visible:
            cfg.gpus = visible
            return None
        cfg.cpu = True
        return f"{why}; training on the CPU"
    if not visible:
        raise ConfigError(f"--gpus: {why}")
    bad = [g for g in cfg.gpus if g >= len(visible)]
    if bad:
        raise ConfigError(f"--gpus: no GPU {bad[0]} ({len(visible)} visible: 0-{len(visible) - 1})")
    cfg.gpus = [visible[g] for g in cfg.gpus]
    return None


def check_data(cfg: RunConfig) -> tuple[str, int]:
    """Read every data row in the foreground (a bad row stops us before anything is written);
    return the training data's fingerprint and its usable rows. Rows that --skip-bad-rows
    leaves out are counted on stderr, so they are never a surprise."""
    from sftui.trainer import data, demo

    rows = demo.DEMO_ROWS
    for path in (cfg.data, cfg.eval_data):
        if path is not None and path != "demo":
            usable, skipped = data.validate_file(path, cfg.skip_bad_rows)
            if path == cfg.data:
                rows = usable
            if skipped:
                print(f"sftui: {path}: skipping {skipped:,} bad rows of {usable + skipped:,} (--skip-bad-rows)",
                      file=sys.stderr)
    return data.fingerprint(cfg.data), rows


def prepare_new(args: argparse.Namespace, cfg: RunConfig) -> RunDir:
    from sftui.supervisor import new_run_json

    auto = cfg.batch == "auto"
    if cfg.num_machines > 1:
        if auto:
            raise ConfigError("--batch auto: not with --num-machines (probe one machine with sftui probe, then give --batch)")
        if not args.run_dir:
            raise ConfigError("--run-dir: required with --num-machines (a directory every machine mounts)")
    if auto:
        require_gpu(cfg, "--batch auto")
    cfgmod.check_paths(cfg)
    note = resolve_devices(cfg)
    cfgmod.validate(cfg)
    fingerprint, rows = check_data(cfg)
    if cfg.lr is None:
        from sftui.trainer.model import default_lr

        cfg.lr = default_lr(cfg.model)
    name = cfg.name or (Path(cfg.data).stem if cfg.data != "demo" else "demo")
    path = (Path(args.run_dir) if args.run_dir else default_run_dir(name)).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if (path / "run.json").exists():
            raise ConfigError(f"--run-dir: {path}: already holds a run ({existing_run_advice(RunDir(path))})")
        raise ConfigError(f"--run-dir: {path}: exists and is not an empty directory")
    from sftui import rundir

    existed = path.exists()
    try:
        run = rundir.create(path)
    except OSError as e:
        raise ConfigError(f"--run-dir: {path}: {e.strerror or e}") from None
    batch = probe_first_rung(run, cfg, fingerprint, existed) if auto else None
    write_json_atomic(run.run_json, new_run_json(cfg, name, fingerprint, rows, batch))
    if note:
        print(f"sftui: {note}", file=sys.stderr)
    return run


def existing_run_advice(run: RunDir) -> str:
    """What to do with a run directory that is taken, by the state of the run in it."""
    if lock_is_held(run):
        return f"it is training now: sftui attach {run.path}"
    try:
        status = read_json(run.run_json).get("status")
    except (OSError, ValueError):
        status = None
    if status == "finished":
        return "it has finished; give another --run-dir"
    return f"continue it with --resume {run.path}"


def probe_first_rung(run: RunDir, cfg: RunConfig, fingerprint: str, existed: bool) -> int:
    """``--batch auto``: probe in the foreground (its tokenizer and data cache stay for the run),
    print the table, keep the points in RUN_DIR/forecast.json, and return the recommended rung.
    On failure the new run directory goes again."""
    from sftui import probing

    try:
        result = probing.run_probe(cfg, fingerprint, DEFAULT_TARGET, work_dir=run.path)
        print(probing.table(result), file=sys.stderr, flush=True)
        if result.recommended is None:
            raise ConfigError("--batch auto: no rung of the ladder fits the GPU memory; lower --max-len, "
                              "add --gradient-checkpointing or smaller rungs to --ladder")
    except BaseException:
        for child in run.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        if not existed:
            run.path.rmdir()
        raise
    probing.write_forecast(run.path, result, cfg)
    return result.recommended


def cmd_probe(args: argparse.Namespace) -> int:
    """``sftui probe``: the table (or JSON) of predicted peaks per rung; writes nothing."""
    from sftui import probing

    target = cfgmod.parse_fraction(args.target, "--target")
    # The probe weighs the ladder as given: no --batch (a config file's included) is put on it.
    cfg = cfgmod.build({**flag_values(args), "batch": "auto"}, args.config)
    require_gpu(cfg, "probe")
    cfgmod.check_paths(cfg)
    resolve_devices(cfg)
    cfgmod.validate(cfg)
    fingerprint, _ = check_data(cfg)
    result = probing.run_probe(cfg, fingerprint, target)
    print(json.dumps(result.to_json(cfg), indent=2) if args.json else probing.table(result), flush=True)
    return 0


def default_run_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{name}-{stamp}"
    n = 2
    while path.exists():
        path = Path("runs") / f"{name}-{stamp}-{n}"
        n += 1
    return path


def prepare_resume(args: argparse.Namespace, values: dict[str, Any]) -> RunDir:
    run = RunDir(Path(args.resume).absolute())
    if not run.is_run():
        raise ConfigError(f"--resume: {args.resume}: not a run directory (no run.json)")
    if lock_is_held(run):
        raise ConfigError(f"--resume: {args.resume}: in use by a live supervisor (attach with: sftui attach {args.resume})")
    try:
        state = read_json(run.run_json)
        cfg = RunConfig.from_dict(state["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume: {run.run_json}: unreadable run.json ({e})") from None
    if values.get("batch") == "auto":
        raise ConfigError("--batch auto: only for a new run; give a number to change a resumed run's batch")
    if state.get("status") == "finished":
        raise ConfigError(f"--resume: {args.resume}: this run has already finished")
    if args.config:
        raise ConfigError("--config: not with --resume (the run keeps its settings; pass flags to change them)")
    for name, value in values.items():
        if name in RESUME_MUTABLE:
            setattr(cfg, name, value)
        elif value != getattr(cfg, name):
            flag = cfgmod.OPTION_BY_NAME[name].flag
            raise ConfigError(f"{flag}: cannot change on --resume (the run has {getattr(cfg, name)!r})")
    if "gpus" in values or "cpu" in values:
        if "cpu" in values:
            cfg.gpus = None
        else:
            cfg.cpu = False
        if "num_processes" not in values and "cpu" not in values:
            cfg.num_processes = 1
        resolve_devices(cfg)
    if "batch" in values:
        state["batch_size"] = int(cfg.batch)
    cfg.ladder = cfgmod.ladder_with(cfg.ladder, int(state["batch_size"]))
    cfgmod.validate(cfg)
    cfgmod.check_paths(cfg)
    fingerprint, _ = check_data(cfg)
    if fingerprint != state.get("data_fingerprint"):
        raise ConfigError(f"--resume: the data changed since the run started ({cfg.data}); refusing to resume")
    state.update(config=cfg.to_dict(), status="starting", ladder=cfg.ladder, world_size=cfg.world_size,
                 pending_decision=None, exit_code=None, reason=None)
    write_json_atomic(run.run_json, state)
    return run


def run_headless(run: RunDir) -> int:
    from sftui.headless import HeadlessLog
    from sftui.supervisor import Supervisor

    print(f"sftui: run directory {run.path}", flush=True)
    sup = Supervisor(run)
    sup.observers.append(HeadlessLog(run, sup.sampler.latest))
    return sup.run_forever()


def start_detached(run: RunDir) -> None:
    """Start the supervisor in a new session, so that it outlives this terminal and SSH."""
    log = open(run.supervisor_log, "ab")
    subprocess.Popen(
        [sys.executable, "-m", "sftui", "_supervise", str(run.path)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        env={**os.environ, "PYTHONPATH": _package_root() + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if lock_is_held(run) or read_json(run.run_json).get("status") not in ("starting",):
            return
        time.sleep(0.05)
    fail(f"the supervisor did not start within {START_TIMEOUT_S:g} s; see {run.supervisor_log}")


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


# --- clients ------------------------------------------------------------------------------------


def resolve_run(arg: str | None) -> RunDir:
    from sftui.runstate import newest_run

    if arg is None:
        newest = newest_run(Path("runs"))
        if newest is None:
            fail("no runs under ./runs; give a RUN_DIR")
        return RunDir(newest.absolute())
    run = RunDir(Path(arg).absolute())
    if not run.is_run():
        fail(f"{arg}: not a run directory (no run.json)")
    return run


def attach_tui(run: RunDir) -> int:
    try:
        from sftui.tui.app import run_tui
    except ImportError as e:
        print(f"sftui: the TUI needs textual ({e}); training goes on in the background.\n"
              f"  follow it with: sftui status {run.path}   or stop it with: sftui stop {run.path}", file=sys.stderr)
        return ev.EXIT_USAGE
    return run_tui(run.path)


def cmd_attach(args: argparse.Namespace) -> int:
    return attach_tui(resolve_run(args.run_dir))


def cmd_status(args: argparse.Namespace) -> int:
    from sftui.headless import memory_text
    from sftui.runstate import RunWatcher, fmt_duration, fmt_num, rung_text

    watcher = RunWatcher(resolve_run(args.run_dir).path)
    watcher.poll()
    s = watcher.state
    if args.json:
        print(json.dumps({
            "run_dir": str(s.path), "name": s.name, "status": s.display_status, "attempt": s.attempt,
            "batch_size": s.batch_size, "grad_accum": s.grad_accum, "world_size": s.world_size,
            "effective_batch": s.effective_batch, "step": s.step, "total_steps": s.total_steps, "epoch": s.epoch,
            "loss": s.loss, "samples_per_s": s.samples_per_s, "eta_s": s.eta_s, "ladder": s.ladder,
            "oom_rungs": s.oom_rungs, "pending_decision": s.pending_decision, "exit_code": s.exit_code,
            "reason": s.reason, "rows": s.rows, "skipped_rows": s.skipped_rows,
            "telemetry": s.telemetry if s.live else None,
        }, indent=2, default=str))
        return 0
    print(f"{s.name}  {s.display_status}  attempt {s.attempt}  batch {rung_text(s.batch_size, s.world_size, s.grad_accum)}")
    eta = f"  ETA {fmt_duration(s.eta_s)}" if s.eta_s is not None else ""
    print(f"  step {s.step}/{s.total_steps if s.total_steps is not None else '?'}  epoch {s.epoch_text}  "
          f"loss {fmt_num(s.loss, '.4f')}  {fmt_num(s.samples_per_s, '.1f')} samples/s{eta}")
    if s.budget_note:
        print(f"  {s.budget_note}")
    if s.skipped_rows:
        print(f"  {s.skipped_rows:,} bad rows skipped (--skip-bad-rows), {s.rows:,} trained on")
    if s.telemetry and s.live:  # an ended run's last sample is not the machine now
        mem = memory_text(s.telemetry)
        if mem:
            print(f"  {mem}")
        for g in s.telemetry.get("gpus") or []:
            print(f"  GPU{g['index']} {g.get('name') or 'n/a'}{' *' if g.get('in_run') else ''}  "
                  f"util {fmt_num(g.get('util'), '.0f')}%  temp {fmt_num(g.get('temp'), '.0f')}C  "
                  f"power {fmt_num(g.get('power_w'), '.0f')} W")
        if s.telemetry.get("gpu_error"):
            print(f"  GPU: {s.telemetry['gpu_error']}")
    if s.pending_decision:
        print(f"  waiting for a decision: sftui decide {s.path} restart [BATCH] | stop")
    if s.reason:
        print(f"  {s.reason}")
    if s.display_status == "lost":
        print(f"  its supervisor is gone (killed, or the machine restarted); continue with: sftui run --resume {s.path}")
    if s.log:
        print(f"  last event: {s.log[-1].splitlines()[0]}")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from sftui.control import ControlError, request

    run = resolve_run(args.run_dir)
    payload: dict[str, Any] = {"cmd": args.command.replace("-", "_")}
    if args.command == "set-batch":
        payload["batch_size"] = cfgmod.positive_int(args.batch_size, "N")
    if args.command == "decide":
        payload["action"] = args.action
        if args.batch_size is not None:
            payload["batch_size"] = cfgmod.positive_int(args.batch_size, "BATCH")
    try:
        reply = request(run, payload)
    except ControlError as e:
        fail(str(e))
    print(reply.get("message", "ok"))
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from sftui.node import follow

    return follow(resolve_run(args.run_dir), cfgmod.positive_int(args.machine_rank, "--machine-rank"))


def cmd_runs(args: argparse.Namespace) -> int:
    from sftui.runstate import RunWatcher, find_runs, rung_text

    runs = find_runs(Path(args.root))
    if not runs:
        print(f"no runs under {args.root}")
        return 0
    print(f"{'RUN':40} {'STATUS':9} {'STEP':>11} {'BATCH':>12}  LAST EVENT")
    for path in runs:
        w = RunWatcher(path)
        w.poll()
        s = w.state
        last = s.log[-1].splitlines()[0] if s.log else ""
        step = f"{s.step}/{s.total_steps if s.total_steps is not None else '?'}"
        print(f"{str(path):40} {s.display_status:9} {step:>11} {rung_text(s.batch_size, s.world_size, s.grad_accum):>12}  {last[:60]}")
    return 0
