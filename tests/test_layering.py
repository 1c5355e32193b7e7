"""The house rules that keep sftui's layers apart (issue 15): the command line and the clients
start without torch or textual, run.json has one owner, and no module imports a layer above it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "sftui"


def imported_after(code: str) -> set[str]:
    """Top-level package names in sys.modules after running ``code`` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


def test_the_cli_and_the_plain_clients_import_neither_torch_nor_textual():
    """`sftui run --headless`, `status`, `stop` start in well under a second and work on a box
    without textual: importing the CLI, the run setup, the plain-text client and the supervisor
    pulls in neither (nor numpy: the row checks are pure Python; nor TensorBoard, aiohttp and
    textual-serve, which `--report-to tensorboard`, `export` and `serve` load when they need them)."""
    heavy = {"torch", "textual", "transformers", "accelerate", "numpy", "rich", "tensorboard", "aiohttp",
             "textual_serve"}
    for module in ("sftui.cli", "sftui.runsetup", "sftui.headless", "sftui.supervisor", "sftui.runstate",
                   "sftui.runfile", "sftui.tboard"):
        found = heavy & imported_after(f"import {module}")
        assert not found, f"import {module} pulls in {sorted(found)}"


def test_run_json_has_one_owner():
    """Only runfile.py reads or writes run.json (as a typed RunFile): nobody else opens it and
    spells its keys."""
    opens = re.compile(r"(read_json|write_json_atomic|open|json\.loads?)\([^)]*run_json")
    users = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
             if opens.search(p.read_text()) and p.name != "runfile.py"]
    assert users == [], f"run.json handled outside runfile.py: {users}"


def own_imports(path: Path) -> set[str]:
    """The sftui modules a source file imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sftui"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sftui"))
    return found


def test_layers_import_downwards_only():
    """trainer/ never imports textual or the TUI; nothing but the command line imports tui/;
    the supervisor and the clients never import trainer/ (torch's side of a process boundary)."""
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        imports = own_imports(path)
        text = path.read_text()
        if rel.startswith("trainer/"):
            assert "textual" not in text and not any(m.startswith("sftui.tui") for m in imports), rel
        if not rel.startswith("tui/") and rel != "cli.py":  # the command line starts the TUI
            assert not any(m.startswith("sftui.tui") for m in imports), rel
        if rel in ("cli.py", "runsetup.py", "supervisor.py", "runstate.py", "runfile.py", "headless.py",
                   "viewmodel.py", "control.py", "node.py", "tboard.py", "serve.py") or rel.startswith("tui/"):
            assert not any(m.startswith("sftui.trainer") for m in imports), f"{rel} imports trainer/"
