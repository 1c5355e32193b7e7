"""The command line: argument parsing and the subcommands. No training or UI logic here.

Heavy modules (textual, torch) are imported only by the subcommands that need them, so that
`run --headless`, `status` and `stop` start fast and work where textual is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from sftui import __version__, runsetup
from sftui import config as cfgmod
from sftui import events as ev
from sftui.config import OPTIONS, ConfigError
from sftui.forecast import DEFAULT_TARGET
from sftui.probing import ProbeFailed, require_gpu
from sftui.rundir import RunDir, lock_is_held
from sftui.runfile import RunFile

START_TIMEOUT_S = 15.0
# The settings the memory probe takes: what shapes the model, the data, the devices and memory, and,
# packed, the sample plan (its heaviest micro-batch is the packed worst case: epochs, steps, order).
PROBE_OPTIONS = ("model", "data", "chat_template", "ladder", "max_len", "lr", "weight_decay", "seed", "gpus", "mem_fraction",
                 "gradient_checkpointing", "compile", "compile_layers", "compile_mode", "pad_to_max_len", "skip_bad_rows",
                 "hang_timeout", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "packing",
                 "epochs", "max_steps", "grad_accum", "group_by_length")


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
                           description="A few optimizer steps at two or more batch sizes on the longest rows (packed: "
                           "on the heaviest micro-batch of the run's sample plan, so give the run's --epochs or "
                           "--max-steps), on the run's GPUs; a forecast of the peak for every rung of the ladder.")
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

    export = sub.add_parser("export", help="write a run's metrics for another tool (TensorBoard event files)",
                            description="What --report-to tensorboard writes while a run trains, from the run's "
                            "events: for a run that is over, or one that ran without it (a running one: so far).")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--tensorboard", required=True, metavar="DIR",
                        help="write one event file here (exporting again replaces it): tensorboard --logdir DIR")

    serve = sub.add_parser("serve", help="show a run's screen in a web browser (127.0.0.1 only, behind a token)",
                           description="The TUI of `sftui attach`, served by textual-serve on 127.0.0.1 behind a "
                           "random token in the URL it prints. From another machine: ssh -L PORT:127.0.0.1:PORT HOST.")
    serve.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="default: the newest run under ./runs")
    serve.add_argument("--port", default="8000", metavar="N", help="the port on 127.0.0.1 (default: 8000)")

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
        "export": cmd_export, "serve": cmd_serve,
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
        if args.config:
            raise ConfigError("--config: not with --resume (the run keeps its settings; pass flags to change them)")
        run = runsetup.prepare_resume(args.resume, values)
    else:
        run = runsetup.prepare_new(cfgmod.build(values, args.config), args.run_dir)
    headless = args.headless or (not args.detach and not sys.stdout.isatty())
    if args.detach:
        start_detached(run)
        print(run.path)
        return ev.EXIT_FINISHED
    if headless:
        return run_headless(run)
    start_detached(run)
    return attach_tui(run)


def cmd_probe(args: argparse.Namespace) -> int:
    """``sftui probe``: the table (or JSON) of predicted peaks per rung; writes nothing."""
    from sftui import probing

    target = cfgmod.parse_fraction(args.target, "--target")
    # The probe weighs the ladder as given: no --batch (a config file's included) is put on it.
    cfg = cfgmod.build({**flag_values(args), "batch": "auto"}, args.config)
    require_gpu(cfg, "probe")
    cfgmod.check_paths(cfg)
    runsetup.resolve_devices(cfg)
    cfgmod.validate(cfg)
    fingerprint, rows = runsetup.check_data(cfg)
    result = probing.run_probe(cfg, fingerprint, rows, target)
    print(json.dumps(result.to_json(cfg), indent=2) if args.json else probing.table(result), flush=True)
    return 0


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
        if lock_is_held(run) or RunFile.read(run).status != "starting":
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
    from sftui.headless import status_json, status_lines
    from sftui.runstate import RunWatcher

    watcher = RunWatcher(resolve_run(args.run_dir).path)
    watcher.poll()
    print(json.dumps(status_json(watcher.state), indent=2, default=str) if args.json
          else "\n".join(status_lines(watcher.state)))
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


def cmd_export(args: argparse.Namespace) -> int:
    from sftui.tboard import export

    run = resolve_run(args.run_dir)
    try:
        path, records = export(run, Path(args.tensorboard))
    except OSError as e:
        fail(f"--tensorboard: {args.tensorboard}: {e.strerror or e}")
    print(f"{records} records to {path}; view with: tensorboard --logdir {path.parent}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sftui.serve import serve

    port = cfgmod.positive_int(args.port, "--port")
    if port > 65535:
        fail(f"--port: expected a port from 1 to 65535, got {port}")
    return serve(resolve_run(args.run_dir), port)


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
