"""Small file helpers shared by every stage: atomic writes, output ownership, locks, JSON sidecars, hashes.

Every folder tinylm writes carries a marker, `.tinylm-output`, naming what kind of output it is
(and, for an output built in one go, the size of every file in it). A stage replaces only an earlier
output of its own kind: `--out` naming a folder with anything else in it, a file, or a folder that
holds (or lies inside) the stage's input is refused before anything is touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (see write_text)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically: a temp file in the same folder, then rename over the target.

    The file gets the mode any file the user creates gets (0666 less the umask: 0644 under umask
    022), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if os.name == "posix":
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask, read from /proc where it can be (setting it to read it races with threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a JSON file tinylm can read ({type(e).__name__})") from None


# --- output ownership --------------------------------------------------------------------------
MARKER = ".tinylm-output"
SIDECARS = (".json", ".toml", ".md")  # small files written atomically on their own, some after the build


class OutputError(ValueError):
    """`--out` names something a stage must not write over; the message says what to do instead."""


def output_kind(folder: Path) -> str | None:
    """The kind in a folder's marker; None for no marker (or an unreadable one)."""
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_output(target: str | Path, kind: str, inputs: tuple = (), legacy: tuple[str, ...] = ()) -> None:
    """Refuse an output path a `kind` stage must not write: an existing file, a folder holding one of
    `inputs` or lying inside one, or a non-empty folder that is not an earlier `kind` output. `legacy`
    names files that mark an output written before markers existed.

    Raises OutputError naming the path and what to do.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} is a file: --out names a folder (a new one, or an earlier {kind} output)")
    resolved = target.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise OutputError(f"--out {target} holds the input {source}: writing there would delete it; "
                              "choose an --out outside it")
        if source in resolved.parents:
            raise OutputError(f"--out {target} lies inside the input {source}: choose an --out outside it")
    if not target.is_dir() or not any(target.iterdir()):
        return
    found = output_kind(target)
    if found == kind or (found is None and legacy and all((target / name).exists() for name in legacy)):
        return
    what = f"a tinylm {found} output" if found else "files that tinylm did not write"
    raise OutputError(f"--out {target} already holds {what}; a {kind} output replaces only an earlier "
                      f"{kind} output: choose a new or empty folder")


@contextlib.contextmanager
def claimed_folder(folder: str | Path, kind: str, inputs: tuple = (), legacy: tuple[str, ...] = ()) -> Iterator[Path]:
    """Check `folder` as an output of `kind` (see check_output), create it and mark it for the work
    of the block. If the block raises while the folder still holds nothing but the marker this call
    wrote, the claim is undone (the marker goes, and the folder too if this call made it), so a
    refused setting or a bad input leaves no empty output behind."""
    folder = Path(folder)
    check_output(folder, kind, inputs, legacy)
    made, was_empty = not folder.exists(), not folder.is_dir() or not any(folder.iterdir())
    folder.mkdir(parents=True, exist_ok=True)
    if output_kind(folder) != kind:
        write_json(folder / MARKER, {"kind": kind})
    try:
        yield folder
    except BaseException:
        if was_empty and [p.name for p in folder.iterdir()] == [MARKER]:
            (folder / MARKER).unlink()
            if made:
                folder.rmdir()
        raise


def output_complete(folder: str | Path) -> bool:
    """True when every file the marker of an atomically built output lists is there with its size."""
    try:
        files = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))["files"]
        return all((Path(folder) / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


# --- one writer at a time ----------------------------------------------------------------------
_held: dict[Path, int] = {}  # lock files this process holds, with how many times it entered each


class LockedError(RuntimeError):
    """Another process is writing the same output."""


@contextlib.contextmanager
def output_lock(target: str | Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `target` while this process writes it; a second process is refused
    at once (LockedError with the holder's PID). The lock is an flock(2), so it dies with its holder:
    a killed run never leaves a folder locked. Re-entrant within one process; only rank 0 of a
    torchrun job locks (the other ranks do not write). Without fcntl (Windows) it does nothing.
    """
    target = Path(target).absolute()
    lock_path = target.parent / f".{target.name}.lock"
    if lock_path in _held or os.environ.get("RANK", "0") != "0":
        _held[lock_path] = _held.get(lock_path, 0) + 1
        try:
            yield
        finally:
            _held[lock_path] -= 1
            if not _held[lock_path]:
                del _held[lock_path]
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = lock_path.read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise LockedError(f"{target} is being written by another tinylm process (PID {holder}); "
                              "wait for it to end or choose another --out") from None
        try:  # the holder before us may have removed the file after we opened it: lock the current one
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[lock_path] = 1
    try:
        yield
    finally:
        del _held[lock_path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: str | Path, kind: str, inputs: tuple = (), legacy: tuple[str, ...] = ()) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in only when complete.

    `target` must be new, empty or an earlier output of the same `kind` (see check_output); the
    new one is marked with its kind and the size of each file, so that `output_complete` can tell a
    damaged copy. A crash leaves the old directory (or nothing) plus a `.tmp` folder that the next
    run removes: a reader never sees a half-written output. One process at a time (output_lock).
    Its files get the umask's mode (0644 under 022), whatever mode their writer chose.
    """
    target = Path(target)
    check_output(target, kind, inputs, legacy)
    target.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(target), _build(target, kind) as tmp:
        yield tmp


@contextlib.contextmanager
def _build(target: Path, kind: str) -> Iterator[Path]:
    tmp = target.with_name(f"{target.name}.tmp")
    old = target.with_name(f"{target.name}.old")
    if old.exists() and not target.exists():  # killed between the two renames below: put the old one back
        os.replace(old, target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file() and f.suffix not in SIDECARS}
        write_json(tmp / MARKER, {"kind": kind, "files": files})
        mode = 0o666 & ~current_umask()
        for f in tmp.rglob("*"):  # flush contents before the rename makes them visible
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                    if os.name == "posix":  # some writers (safetensors) create 0600 files
                        os.fchmod(fh.fileno(), mode)
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
