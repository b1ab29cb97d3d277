"""Writing files and folders so that nothing the user had is lost and nothing half-written is left.

Every command that writes a folder (export, quantize, attnmap, act apply) goes through ``atomic_dir``:
the folder is built in a temporary sibling and renamed into place at the end; an existing folder is moved
aside first and removed only once the new one is in place. Temporary siblings carry this machine's name
and the writer's process id (``.OUT.llmdrop-tmp-HOST-PID``), so a later run can tell a leftover of a
killed process from a folder another run is writing right now, and remove only the former.
"""

import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from llmdrop.errors import LlmdropError

DATA_DIR = Path(__file__).parent / "data"  # the files shipped inside the package (texts, tasks, the viewer)

_TMP_TAG = ".llmdrop-tmp-"
_OLD_TAG = ".llmdrop-old-"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}{tag}{_host()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_siblings(parent: Path) -> list[Path]:
    """Remove temporary folders in ``parent`` left by llmdrop processes of this machine that no longer run."""
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        name = path.name
        tag = _TMP_TAG if _TMP_TAG in name else _OLD_TAG if _OLD_TAG in name else None
        if not tag or not name.startswith(".") or not path.is_dir():
            continue
        host, _, pid = name.rsplit(tag, 1)[1].rpartition("-")
        if host == _host() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _inside(a: Path, b: Path) -> bool:
    """Is ``a`` the same as or inside ``b``?"""
    return a == b or b in a.parents


# What each kind of file output can be written as (its extension). Plots: whatever matplotlib can save.
JSON = (".json",)
MARKDOWN = (".md", ".markdown")


def plot_suffixes() -> tuple[str, ...]:
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(f".{s}" for s in FigureCanvasBase.get_supported_filetypes())


def check_output(
    out,
    *,
    overwrite: bool = False,
    inputs=(),
    kind: str = "dir",
    suffixes: tuple[str, ...] | None = None,
    option: str = "--out",
    resume: bool = False,
) -> Path:
    """The one check every output goes through, before any model work. Refused: an output equal to, inside, or
    containing an input (the model, a calibration / scores / task file, the teacher); a folder where a file is
    written or the reverse; a file name whose extension the writer cannot produce (``suffixes``); an existing
    output without ``overwrite`` (``resume``: an existing file is read back and extended, e.g. act search's
    heads.json); a place where nothing can be created."""
    out = Path(out).expanduser()
    resolved = out.resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if _inside(src, resolved) or _inside(resolved, src):
            if kind == "dir":
                raise LlmdropError(
                    f"the output {out} would overwrite the input {source}; choose another output directory"
                )
            raise LlmdropError(f"{option} {out} would overwrite the input {source}; choose another file name")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise LlmdropError(f"{out} exists and is not a directory")
    check_writable_parent(out)
    if kind == "file":
        if out.is_dir() or not out.name:
            raise LlmdropError(f"{option} {out} is a directory; give a file name")
        if suffixes is not None and out.suffix.lower() not in suffixes:
            raise LlmdropError(f"{option} {out}: the file name must end in {', '.join(suffixes)}")
    if out.exists() and not (overwrite or resume):
        raise LlmdropError(f"{out} already exists; pass --overwrite to replace it")
    return out


def check_outputs(outputs: dict, *, overwrite: bool = False, inputs=()) -> None:
    """``check_output`` for each ``{option: (path, suffixes)}`` file output of one command (None: not asked for).
    Two outputs of one command cannot name the same file: their writers' extensions differ."""
    for option, (path, suffixes) in outputs.items():
        if path is not None:
            check_output(path, overwrite=overwrite, inputs=inputs, kind="file", suffixes=suffixes, option=option)


def check_output_dir(out, overwrite: bool, inputs=()) -> Path:
    """``check_output`` for a checkpoint (or other) directory."""
    return check_output(out, overwrite=overwrite, inputs=inputs, kind="dir")


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def _public_modes(root: Path) -> None:
    """Files as a plain ``open()`` would create them: some writers (mkstemp) leave 0600, unreadable to a serving
    container running under another uid."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename tmp -> out; an existing out is moved aside first and removed only once tmp is in place."""
    old = _sibling(out, _OLD_TAG)
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)  # put the user's folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out, overwrite: bool = False, inputs=()):
    """Yield an empty temporary folder; on success it becomes ``out``, on any error (Ctrl-C included) it is
    removed and ``out`` is left as it was."""
    out = check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out.parent)
    tmp = _sibling(out, _TMP_TAG)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _public_modes(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename: readers see the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".llmdrop-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path):
    """Yield a temporary sibling of ``path`` with the same extension (writers such as matplotlib pick the format by
    it); on success it replaces ``path``, on any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".llmdrop-tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(data, path) -> None:
    """``data`` as indented JSON, atomically, creating the parent folder. NaN / infinity are refused: they are not
    JSON, and a strict reader (or a model card) would choke on them."""
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise LlmdropError(f"refusing to write {path}: {e}") from None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def check_writable_parent(out: Path) -> None:
    """Refuse, before any slow work, an output whose folder cannot be created: the nearest existing folder above
    ``out`` must be a writable directory (else the failure comes only at the end, naming a temporary sibling)."""
    out = Path(out).expanduser()
    existing = out.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LlmdropError(f"cannot write {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LlmdropError(f"cannot write {out}: no permission to create files in {existing}")
