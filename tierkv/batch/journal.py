"""The results file of `tierkv batch`: a JSONL journal, one line per finished request.

A result counts as done only once its line is on disk: each line is appended with one write and
fsynced before the caller goes on (and the directory is fsynced once, when the file is created, so
the file itself survives a crash too). So after a crash the file holds every result that was reported
done, plus at most one torn last line, which `open(..., mode="resume")` finds and cuts away.

The file is created 0600 (results can be as private as the prompts), and held under an exclusive
flock while open: a second `tierkv batch` on the same file is refused instead of interleaving lines.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from .errors import ResultsFileError
from .requests import id_key

MODES = ("new", "resume", "overwrite")


@dataclass(frozen=True)
class Existing:
    """A result already in the file."""

    status: str  # ok | error
    key: Dict[str, str]  # what it was made with (see api.result_key)
    line: int


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


class ResultsJournal:
    """Open with ResultsJournal.open(path, mode); `existing` maps id keys to the results found."""

    def __init__(self, path: str, fd: int, existing: Dict[str, Existing], notes: List[str], lines: int) -> None:
        self.path = path
        self._fd = fd
        self.existing = existing  # id key -> the result the file holds for it (updated by append)
        self.notes = notes  # what recovery did, for the user
        self.lines = lines

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, mode: str = "new") -> "ResultsJournal":
        """mode 'new': the file must not exist or be empty; 'resume': read what it holds (cutting a torn
        last line away); 'overwrite': empty it (only once it is locked: never under a running writer)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; expected one of {MODES}")
        path = os.path.abspath(path)
        fd = _open_locked(path)
        try:
            size = os.fstat(fd).st_size
            if mode == "new" and size:
                raise ResultsFileError(
                    f"{path} already holds results ({size} bytes); pass --resume to continue it, or --overwrite "
                    "to start it over")
            if mode == "overwrite" and size:
                os.ftruncate(fd, 0)
                os.fsync(fd)
            existing, notes, lines = ({}, [], 0) if mode != "resume" else _recover(path, fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, existing, notes, lines)

    # --- writing ---------------------------------------------------------------------------------
    def append(self, record: dict) -> None:
        """Write one result line and fsync it; then it counts as done (in `existing`). A failed write
        (a full disk) is cut back off, so the file never keeps half a line; the results before it stay."""
        data = encode_line(record)
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, start)
                os.fsync(self._fd)
            except OSError:
                pass  # the next resume cuts the torn line
            raise ResultsFileError(f"cannot write a result to {self.path}: {e.strerror or e}; the results "
                                   "written before it are safe, rerun with --resume") from None
        self.lines += 1
        self.existing[id_key(record["id"])] = Existing(record["status"], dict(record["key"]), self.lines)

    def drop(self, keys: Iterable[str]) -> int:
        """Rewrite the file without the results of these ids (failed ones about to be retried), so the
        file keeps one line per id. Atomic: a new file is written, fsynced and renamed over the old."""
        drop = set(keys) & set(self.existing)
        if not drop:
            return 0
        folder, name = os.path.split(self.path)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        kept = [raw for raw, rec in _lines(self.path) if rec is None or id_key(rec.get("id")) not in drop]
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, os.fstat(self._fd).st_mode & 0o777)
            os.write(fd, b"".join(kept))
            os.fsync(fd)
        finally:
            os.close(fd)
        new_fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        fcntl.flock(new_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file nobody else knows: cannot fail
        os.replace(tmp, self.path)
        fsync_dir(folder)
        os.close(self._fd)
        self._fd = new_fd
        self.existing, _, self.lines = _recover(self.path, self._fd)  # line numbers moved up
        return len(drop)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ResultsJournal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_locked(path: str) -> int:
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ResultsFileError(f"{path}: the directory {folder} does not exist")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ResultsFileError(f"{path} is not a regular file; results need a file they can be fsynced to")
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        created = True
    except FileExistsError:
        fd, created = os.open(path, flags), False
    except OSError as e:
        raise ResultsFileError(f"cannot create {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ResultsFileError(f"{path} is being written by another process (a tierkv batch still running?)") from None
    if created:
        os.fchmod(fd, 0o600)  # whatever the umask
        fsync_dir(folder)
    return fd


def _lines(path: str) -> Iterator[Tuple[bytes, Optional[dict]]]:
    """Each line's bytes (with its newline, if any) and its record, or None where it is not one."""
    with open(path, "rb") as f:
        for raw in f:
            yield raw, _parse(raw)


def _parse(raw: bytes) -> Optional[dict]:
    if not raw.endswith(b"\n"):
        return None
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or "id" not in rec or rec.get("status") not in ("ok", "error"):
        return None
    if not isinstance(rec.get("key"), dict):
        return None
    return rec


def _recover(path: str, fd: int) -> Tuple[Dict[str, Existing], List[str], int]:
    """Read the results; cut away bad lines at the very end (torn by a crash), refuse bad ones earlier."""
    existing: Dict[str, Existing] = {}
    notes: List[str] = []
    good_end = 0  # byte offset just past the last good line
    offset = 0
    bad: List[int] = []  # line numbers of bad lines since the last good one
    n = 0
    for n, (raw, rec) in enumerate(_lines(path), start=1):
        offset += len(raw)
        if rec is None:
            bad.append(n)
            continue
        if bad:
            raise ResultsFileError(
                f"{path} line {bad[0]} is not a result record, and results follow it: the file was changed "
                "by something other than tierkv batch; remove that line, or pass --overwrite to start over")
        k = id_key(rec["id"])
        if k in existing:
            notes.append(f"{path}: id {k} has results on lines {existing[k].line} and {n}; the later one counts")
        existing[k] = Existing(rec["status"], {str(a): str(b) for a, b in rec["key"].items()}, n)
        good_end = offset
    if bad:
        os.ftruncate(fd, good_end)
        os.fsync(fd)
        what = f"line {bad[0]}" if len(bad) == 1 else f"lines {bad[0]}-{bad[-1]}"
        notes.append(f"{path}: {what} ({offset - good_end} bytes) torn by an interrupted write; cut away "
                     f"(those requests run again)")
    return existing, notes, n - len(bad)
