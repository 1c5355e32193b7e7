"""The run directory: where each file lives, atomic JSON writes, the supervisor lock,
appending events safely and tailing JSONL files incrementally.

Every process of a run (supervisor, ranks, TUI, `status`) goes through this module, so the
on-disk layout is written down once. It imports nothing heavy: the headless path and the
worker both use it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sftui import events as ev

SOCKET_NAME = "control.sock"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory. Creating the object touches nothing on disk."""

    path: Path

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def lock(self) -> Path:
        return self.path / "lock"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    def node_events(self, node: int) -> Path:
        """The event file the ranks of machine ``node`` append to: ``events.jsonl`` on machine 0
        (with the supervisor), ``events.node-R.jsonl`` on the others (appends from several
        machines to one file are not atomic on network filesystems)."""
        return self.events if node == 0 else self.path / f"events.node-{node}.jsonl"

    def event_files(self) -> list[Path]:
        """``events.jsonl`` and every machine's own event file that exists."""
        return [self.events, *sorted(self.path.glob("events.node-*.jsonl"))]

    @property
    def telemetry(self) -> Path:
        return self.path / "telemetry.jsonl"

    @property
    def request(self) -> Path:
        return self.path / "request.json"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "latest"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def cache(self) -> Path:
        """Tokenized data, kept so that a restart does not tokenize again."""
        return self.path / "cache"

    @property
    def supervisor_log(self) -> Path:
        return self.path / "supervisor.log"

    def attempt_log(self, attempt: int, node: int = 0) -> Path:
        """Output of attempt N on machine ``node`` (machine 0: ``attempt-N.log``)."""
        return self.path / (f"attempt-{attempt}.log" if node == 0 else f"attempt-{attempt}.node-{node}.log")

    def accelerate_config(self, node: int) -> Path:
        """The generated ``accelerate launch --config_file`` of machine ``node`` (multi-node)."""
        return self.path / "accelerate" / f"node-{node}.json"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    def default_socket_path(self) -> Path:
        """Under the run directory when the path fits in sun_path, else under $XDG_RUNTIME_DIR."""
        inside = self.path.resolve() / SOCKET_NAME
        if len(os.fsencode(str(inside))) <= UNIX_PATH_MAX:
            return inside
        import hashlib

        base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
        digest = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        return base / f"sftui-{os.getuid()}-{digest}.sock"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, as named by ``checkpoints/latest``."""
        try:
            name = self.latest.read_text().strip()
        except OSError:
            return None
        candidate = self.checkpoints / name
        return candidate if name and candidate.is_dir() else None

    def is_run(self) -> bool:
        return self.run_json.is_file()


# --- atomic files -------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def fresh_dir(final: Path, tag: str | None = None, replace: bool = False) -> Iterator[Path]:
    """A directory written whole or not at all: yields an empty temporary sibling of ``final``
    (``.tmp-NAME-TAG``, TAG this writer's own: the pid unless given) to fill, renames it to
    ``final`` when the block ends and removes it when the block raises.

    When ``final`` exists already, another writer got there first and its copy is as good as
    ours (a token cache, a checkpoint of the same step): ours is removed. With ``replace``, ours
    takes its place instead (``final/``): the old one is moved aside, then removed.
    """
    tag = tag or str(os.getpid())
    tmp = final.with_name(f".tmp-{final.name}-{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if replace and final.exists():
            old = final.with_name(f".old-{final.name}-{tag}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def create(path: Path) -> RunDir:
    """Create a new, empty run directory, mode 0700. Fails if it already holds a run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if any(path.iterdir()):
            raise
    os.chmod(path, 0o700)
    (path / "checkpoints").mkdir(mode=0o700, exist_ok=True)
    return RunDir(path)


# --- the supervisor lock ------------------------------------------------------------------------


class LockHeld(Exception):
    """Another live supervisor holds this run directory."""


def acquire_lock(run: RunDir) -> int:
    """Take the run's flock and return its descriptor; keep it open for the supervisor's life.

    The descriptor is not inherited by children (O_CLOEXEC), so a leftover rank cannot keep
    a dead supervisor's run looking alive.
    """
    fd = os.open(run.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise LockHeld(str(run.path)) from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_is_held(run: RunDir) -> bool:
    """True while some process holds the run's flock (a live supervisor)."""
    try:
        fd = os.open(run.lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# --- appending events ---------------------------------------------------------------------------


class EventLog:
    """Appends whole events to a JSONL file with one ``write`` on an O_APPEND descriptor.

    On opening, a torn last line (a writer that died mid-write) is ended with a newline, so the
    next event starts on a line of its own instead of being glued onto the fragment.
    """

    def __init__(self, path: Path, attempt: int | None = None):
        self.path = Path(path)
        self.attempt = attempt
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _end_torn_line(self.path, self._fd)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one event; ``attempt=`` in fields overrides the log's own attempt."""
        attempt = fields.pop("attempt", self.attempt)
        event = ev.make(kind, attempt, **fields)
        self.write(event)
        return event

    def write(self, event: dict[str, Any]) -> None:
        os.write(self._fd, ev.encode(event))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _end_torn_line(path: Path, fd: int) -> None:
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
            os.write(fd, b"\n")


# --- tailing JSONL ------------------------------------------------------------------------------


@dataclass
class JsonlTail:
    """Reads the complete lines appended to a JSONL file since the last call.

    A last line without its newline is left for the next call (it may still be being written);
    lines that do not parse are skipped. Works whether or not the file exists yet.
    """

    path: Path
    offset: int = 0
    _partial: bytes = field(default=b"", repr=False)

    def read(self, max_bytes: int = 8 << 20) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(max_bytes)
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if line.strip():
                obj = _parse_object(line)
                if obj is not None:
                    out.append(obj)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while batch := self.read():
            yield from batch


class EventTails:
    """Tails every event file of a run (``events.jsonl`` and the per-machine ones) as one stream.

    Files that appear later (a machine's first event) are picked up on the next ``read`` and read
    from their start; ``from_end`` skips what the files already hold when the tail is made.
    """

    def __init__(self, run: RunDir, from_end: bool = False):
        self.run = run
        self._tails: dict[Path, JsonlTail] = {}
        for path in run.event_files():
            self._tails[path] = JsonlTail(path, path.stat().st_size if from_end and path.exists() else 0)

    def read(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for path in self.run.event_files():
            tail = self._tails.setdefault(path, JsonlTail(path))
            out.extend(tail.read())
        return out


def _parse_object(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def read_all(path: Path) -> list[dict[str, Any]]:
    """Every complete, parseable line of a JSONL file."""
    return list(JsonlTail(Path(path)))


def tail_lines(path: Path, n: int, max_bytes: int = 64 << 10) -> list[str]:
    """The last ``n`` text lines of a (log) file, decoded leniently."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-n:]
