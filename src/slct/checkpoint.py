"""Safe, atomic files: checkpoints and snapshots are written to a temporary file, fsynced, then renamed into place,
and read back without running any code from them.

Writing: a crash, kill -9 or full disk at any moment leaves either the old set of files or the old set plus one
complete new file, never a truncated one; older checkpoints are pruned only after the new one is in place. A failed
write removes its temporary file and raises ``SaveError`` in one line (naming a full disk as such); temporary files
left by a killed process are removed by ``remove_stale_temporaries`` when the next run starts.

Reading: snapshots are the files people share and download, so ``load`` never unpickles arbitrary objects: it uses
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers (dict, list, tuple, str, numbers,
None) and refuses everything else. slct writes nothing but those, so every file it wrote loads, and a file holding
any other object (a pickle with a ``__reduce__`` payload, say) is refused in one line before anything in it runs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

_CKPT = re.compile(r"^checkpoint-(\d{8})\.pt$")
_TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")  # what save_atomic writes before the rename
CHECKPOINT_FORMAT = "slct-checkpoint-v1"
SNAPSHOT_FORMAT = "slct-snapshot-v1"
_LOW_SPACE_BYTES = 1 << 20  # less than this free after a failed write: the disk was full


class SaveError(RuntimeError):
    """A file could not be written; its temporary file is gone and the previous files are untouched."""

    def __init__(self, message: str, disk_full: bool):
        super().__init__(message)
        self.disk_full = disk_full


class UnsafeFileError(ValueError):
    """A file that is not an slct file (or holds objects slct does not load); nothing in it was executed."""


class DamagedFileError(UnsafeFileError):
    """A file that cannot be read at all (truncated, corrupted, not a torch file): nothing in it was executed."""


# how writers that are not Python's own I/O say ENOSPC: safetensors' Rust error, a C++ library's strerror
_DISK_FULL_TEXT = re.compile(r"No space left on device|StorageFull|Disk quota exceeded|os error 28", re.IGNORECASE)


def disk_full(error: BaseException, directory: Path) -> bool:
    # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos", not as ENOSPC
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:  # the error and its causes
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or _DISK_FULL_TEXT.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(directory).free < _LOW_SPACE_BYTES
    except OSError:
        return False


def atomic_write(path: str | Path, write: Callable, what: str | None = None) -> Path:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``; ``SaveError`` if it fails.

    The temporary file is removed whatever happens (kill -9 aside: see ``remove_stale_temporaries``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full(e, path.parent)  # measured before the partial file is removed
        tmp.unlink(missing_ok=True)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: cleaned up, then on their way
            raise
        reason = f"no space left on {path.parent}" if full else f"{type(e).__name__}: {_first_line(e)}"
        raise SaveError(f"{reason} while writing {what or path.name}", disk_full=full) from e
    return path


def write_folder_atomic(path: str | Path, fill: Callable[[Path], None], what: str, replace: bool = False) -> Path:
    """``fill(folder)`` writes a folder's files into a temporary folder beside ``path``, which is then renamed to
    ``path``: a failed write leaves nothing behind; a write error (a full disk) raises ``SaveError`` in one line
    naming ``path``, any other error propagates as it is. Files get the mode the umask gives new files (some writers create them 0600).

    ``path`` must not exist or be an empty folder; with ``replace``, an existing ``path`` is swapped out whole.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(mode)
        if replace and path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)  # rename(2) takes the place of a missing or empty folder
    except BaseException as e:
        full = disk_full(e, path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (full or isinstance(e, OSError)):  # bad input, an interrupt: cleaned up, then on their way as they are
            raise
        reason = f"no space left on {path.parent}" if full else f"{type(e).__name__}: {_first_line(e)}"
        raise SaveError(f"{reason} while writing {what} to {path}; nothing was written", disk_full=full) from e
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


CHECKSUM_KEY = "checksum"  # a checkpoint's or snapshot's content digest (sha256 of content_digest's walk)


def content_digest(tree) -> str:
    """SHA-256 over a payload's content in a fixed walk: every tensor's dtype, shape and bytes, every plain value's
    type and repr, dict keys in their (pickled, so preserved) order. Written with checkpoints and snapshots and
    checked on every load: bit rot that stays finite (a weight set to 65536, Adam's second moment to 2e32) changes
    it, where the non-finite checks would pass it."""
    h = hashlib.sha256()

    def walk(node) -> None:
        if isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(node.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(node, dict):
            h.update(f"D{len(node)}".encode())
            for k, v in node.items():
                h.update(f"K{type(k).__name__}:{k!r}".encode())
                walk(v)
        elif isinstance(node, (list, tuple)):
            h.update(f"{type(node).__name__[0]}{len(node)}".encode())
            for v in node:
                walk(v)
        else:
            h.update(f"V{type(node).__name__}:{node!r}".encode())

    walk(tree)
    return h.hexdigest()


def with_checksum(payload: dict) -> dict:
    """The payload with its content digest under ``CHECKSUM_KEY`` (verified by ``load``)."""
    body = {k: v for k, v in payload.items() if k != CHECKSUM_KEY}
    return {**body, CHECKSUM_KEY: content_digest(body)}


def save_atomic(obj, path: str | Path, what: str | None = None) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see ``atomic_write``); a checkpoint or snapshot (a dict with an
    slct ``format``) is written with its content digest."""
    if isinstance(obj, dict) and obj.get("format") in (CHECKPOINT_FORMAT, SNAPSHOT_FORMAT):
        obj = with_checksum(obj)
    return atomic_write(path, lambda f: torch.save(obj, f), what)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporary files of interrupted writes (``.NAME.tmp-PID``) in ``directory``; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_file() and _TEMPORARY.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an error's message, cut at a word boundary past ``limit`` characters."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _CKPT.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: str | Path, keep: int) -> None:
    for p in list_checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)


def load_untrusted(path: str | Path, what: str = "slct file", map_location="cpu", mmap: bool = False):
    """Read a torch file without running code from it: tensors and plain containers only (``weights_only``).

    Raises ``UnsafeFileError`` (one line) for anything else: a hostile or foreign pickle, a damaged file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # weights_only refused an object: report it, never retry unrestricted
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None and "global" not in str(e).lower():  # random bytes: a bad opcode, not an object
            raise DamagedFileError(f"{path} is damaged or not a {what}: it cannot be read (not a valid torch file: "
                                   f"{_unpickler_reason(e)})") from None
        detail = f" ({found.group(1)})" if found else ""
        raise UnsafeFileError(f"{path} is not an {what}: it holds Python objects{detail} that slct does not load; "
                              "nothing in it was run") from None
    except Exception as e:  # truncated, not a torch file at all, ...
        raise DamagedFileError(f"{path} is damaged or not a {what}: it cannot be read ({type(e).__name__}: "
                               f"{_first_line(e)})") from None


def _unpickler_reason(error: BaseException) -> str:
    """torch's weights-only refusal is a page of advice; the reason is the line after 'WeightsUnpickler error:'."""
    text = str(error)
    tail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[0][:120] if lines else "unreadable"


def load(path: str | Path, expect: str | tuple[str, ...] = CHECKPOINT_FORMAT, map_location="cpu",
         mmap: bool = False) -> dict:
    """An slct checkpoint or snapshot (``expect``: the accepted ``format`` values), loaded safely."""
    expect = (expect,) if isinstance(expect, str) else tuple(expect)
    what = {(SNAPSHOT_FORMAT,): "slct snapshot", (CHECKPOINT_FORMAT,): "slct checkpoint"}.get(
        expect, "slct snapshot or checkpoint")
    payload = load_untrusted(path, what, map_location, mmap)
    found = payload.get("format") if isinstance(payload, dict) else None
    if found not in expect:
        hint = ""
        if found == SNAPSHOT_FORMAT:
            hint = " (it is a snapshot, for sampling; training resumes from checkpoints/checkpoint-*.pt)"
        elif found == CHECKPOINT_FORMAT:
            hint = " (it is a training checkpoint; sampling reads the run's snapshot-*.pt files)"
        raise UnsafeFileError(f"{path} is not an {what}{hint}")
    stored = payload.pop(CHECKSUM_KEY, None)  # files written before checksums have none: read as they are
    if stored is not None and content_digest(payload) != stored:
        raise DamagedFileError(f"{path} is damaged: its contents do not match the checksum written with it (bit "
                               "rot, a bad copy or an edited file); nothing from it was used")
    return payload
