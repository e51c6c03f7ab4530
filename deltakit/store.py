"""The resumable results store of sweeps: ``<out>/results.jsonl``, one JSON record per finished point.

A record holds everything about one point, on one line::

    {"method": "dare", "label": "dare", "params": "{}", "q": 0.5, "rate": 0.5, "seed": 0, "status": "ok",
     "error": null, "prep_seconds": 0.01, "eval_seconds": 0.2, "metrics": {"accuracy": 0.91, "macro_f1": 0.9},
     "tier": "resident", "peak_host_mb": 612.4, "peak_device_mb": null, "key": "3f0c...",
     "base": "family:tiny/base", "fine_tune": "family:tiny/sentiment3"}

``tier`` is the memory tier the point ran in and ``peak_*_mb`` the sweep's peak memory so far
(:mod:`deltakit.memory`); records written before they existed lack them (NaN in the tidy rows).

``status`` is ``"ok"`` or ``"failed"`` (then ``error`` says why and ``metrics`` is empty). The line is written with
one ``os.write`` on an ``O_APPEND`` descriptor and fsynced, so a point is on disk entirely or not at all: a failed
or short write (full disk, file size limit) is truncated away and raises :class:`StoreError`. The file is strict
JSON: NaN and infinities are written as ``null`` and read back as NaN.

Reading tolerates what crashes and hand edits leave: a line that is not a JSON object with ``key``, ``status`` and
``metrics`` is skipped with one warning (its point counts as not done, so the next sweep recomputes it), and records
are de-duplicated by key (the first successful record wins; a failed one is superseded by a later record of its
key). :meth:`ResultStore.rows` expands records into the tidy rows plots read: one per (point, metric); a failed
point is one row with metric None and value NaN.

Writing goes through :meth:`ResultStore.writer`, which checks the folder before any work starts and holds an
exclusive ``flock`` on ``<out>/.lock`` (recording the holder's pid, start time and command), so two sweeps never
append to one store at once. Reading takes no lock and creates nothing.

A point's key pins the models by content (:func:`fingerprint`), not by file dates.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from deltakit.refs import Snapshot
from deltakit.fileio import json_default, write_atomically
from deltakit.tensors import TensorReader, content_parts

__all__ = ["ResultStore", "StoreError", "StoreLockedError", "check_writable_folder", "fingerprint", "point_key",
           "tidy_rows"]

# stored as null when NaN; NaN again in the tidy rows
_FLOAT_FIELDS = ("q", "lam", "prep_seconds", "eval_seconds", "peak_host_mb", "peak_device_mb")


class StoreError(RuntimeError):
    """The results store cannot be opened, locked or written; the message names the path and the fix."""


class StoreLockedError(StoreError):
    """Another process is writing to the results folder; the message names its pid."""


def fingerprint(snapshot: Snapshot) -> str:
    """What pins a model's weights, at a constant cost per weight file.

    Hub snapshots are pinned by ``repo_id@commit``. Other folders by a sha256 over, for each weight file the reader
    reads (:attr:`deltakit.tensors.TensorReader.files`), its name, size, safetensors header (the 8-byte length and
    the JSON) and 16 evenly spaced 4 KiB samples of its data, plus ``config.json``. Retraining changes almost every
    byte, so the samples catch it; hashing a 15 GB checkpoint whole would take minutes.

    Args:
        snapshot: a resolved model (:func:`deltakit.sources.resolve`).

    Returns:
        ``repo_id@commit``, or ``sha256:<hex>``.

    Raises:
        FileNotFoundError, deltakit.tensors.CorruptCheckpointError: as :class:`~deltakit.tensors.TensorReader`.
    """
    if snapshot.commit:
        return f"{snapshot.repo_id}@{snapshot.commit}"
    digest = hashlib.sha256()
    for file in TensorReader(snapshot.path).files:
        for part in content_parts(file):
            digest.update(part)
    config = snapshot.path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return f"sha256:{digest.hexdigest()}"


def check_writable_folder(folder: str | Path) -> None:
    """Refuse, before any work starts, an output folder that cannot be written; creates nothing.

    Args:
        folder: the output folder; it need not exist yet.

    Raises:
        StoreError: ``folder`` (or, when it does not exist yet, its nearest existing parent) is a file or
            read-only.
    """
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # the folder, or where it would be created
    if not existing.is_dir():
        raise StoreError(f"output folder {folder}: {existing} is a file, not a folder. Pass another folder (CLI --out) "
                         "or move the file away.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" (its parent {existing} is read-only)"
        raise StoreError(f"output folder {folder} cannot be written{where}: make it writable or pass a folder in a "
                         "writable place (CLI --out).")


def point_key(parts: dict[str, Any]) -> str:
    """The key of a point: a hash of everything that defines it (models' fingerprints, method, params, rate, ...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tidy_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Expand one point's record into tidy rows: one per metric; a failed point is one row, metric None, value NaN.

    A merge point's metrics are per task (``{"sentiment3": {"accuracy": ...}, "topic": {...}}``): one row per
    (task, metric), with a ``task`` column.

    Args:
        record: a record as :meth:`ResultStore.append` writes it.

    Returns:
        The rows: the record's fields (``null`` floats as NaN) with ``metric`` and ``value`` (and ``task`` for a
        merge point) instead of ``metrics``.
    """
    fields = {k: (_nan(v) if k in _FLOAT_FIELDS else v) for k, v in record.items() if k != "metrics"}
    metrics = record["metrics"] if record["status"] == "ok" else {None: None}
    rows = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            rows += [dict(fields, task=name, metric=m, value=_nan(v)) for m, v in value.items()]
        else:
            rows.append(dict(fields, metric=name, value=_nan(value)))
    return rows


class ResultStore:
    """The resumable results of sweeps in one folder: read freely, append through :meth:`writer`.

    Args:
        folder: where ``results.jsonl`` (and, on :meth:`write_parquet`, ``results.parquet``) live. Reading never
            creates it; :meth:`writer` does.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "results.jsonl"
        self._fd: int | None = None  # the O_APPEND descriptor while a writer is open
        self._reported: set[int] = set()  # numbers of skipped lines already warned about

    # -- reading ---------------------------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """The stored points, one record per key, in the order their keys first appear.

        A line that is not a JSON object with ``key``, ``status`` and ``metrics`` is skipped (one warning per store
        object names the file and the lines); its point counts as not done, so the next sweep recomputes it. Of
        several records of one key, the first successful one wins; a failed record is superseded by any later
        record of its key.
        """
        if not self.path.is_file():
            return []
        records: dict[str, dict[str, Any]] = {}
        skipped: list[int] = []
        with self.path.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = _parse(line)
                if record is None:
                    skipped.append(number)
                elif records.get(record["key"], {}).get("status") != "ok":
                    records[record["key"]] = record
        skipped = [n for n in skipped if n not in self._reported]
        if skipped:
            self._reported.update(skipped)
            shown = ", ".join(map(str, skipped[:10])) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
            warnings.warn(f"{self.path}: skipped {len(skipped)} line(s) that are not a sweep record (a JSON object "
                          f"with 'key', 'status' and 'metrics'): line(s) {shown}. Their points count as not done "
                          "and the next sweep recomputes them; delete those lines to silence this warning.",
                          stacklevel=2)
        return list(records.values())

    def done_keys(self) -> set[str]:
        """Keys of the points finished successfully (failed points are retried by the next sweep)."""
        return {r["key"] for r in self.records() if r["status"] == "ok"}

    def rows(self) -> list[dict[str, Any]]:
        """The tidy rows of every stored point (see :func:`tidy_rows`)."""
        return [row for record in self.records() for row in tidy_rows(record)]

    def frame(self) -> pd.DataFrame:
        """:meth:`rows` as a DataFrame (empty when nothing is stored)."""
        return pd.DataFrame(self.rows())

    # -- writing ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, *, wait: bool = False) -> Iterator[ResultStore]:
        """Open the store for :meth:`append`: check the folder, create it, and hold its exclusive writer lock.

        Args:
            wait: block until another writer releases the folder instead of raising :class:`StoreLockedError`.

        Yields:
            This store, ready for :meth:`append`.

        Raises:
            StoreError: the folder is a file or read-only, ``results.jsonl`` is a folder, or a file cannot be opened.
            StoreLockedError: another process is writing to the folder and ``wait`` is False.
        """
        check_writable_folder(self.folder)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, but the store keeps its results in a file of that name: move "
                             "that folder away or pass another output folder (CLI --out).")
        self.folder.mkdir(parents=True, exist_ok=True)  # check_writable_folder made sure it can be created
        with contextlib.ExitStack() as stack:
            lock = self._open(self.folder / ".lock", os.O_RDWR | os.O_CREAT)
            stack.callback(os.close, lock)  # closing the descriptor releases the lock
            _acquire(lock, self.folder, wait=wait)
            stack.callback(os.ftruncate, lock, 0)  # the holder's details go with the lock
            self._fd = self._open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            stack.callback(self._close)
            yield self

    def append(self, record: dict[str, Any]) -> None:
        """Append one point's record durably: one ``os.write`` of the whole line, then fsync.

        Args:
            record: the point's fields (see the module docstring); NaN and infinities are stored as ``null``.

        Raises:
            StoreError: the store is not open for writing, or the write failed or was short (full disk, file size
                limit); the file is then truncated back, so no partial line stays.
        """
        if self._fd is None:
            raise StoreError(f"{self.path} is not open for writing: append inside `with store.writer(): ...`.")
        line = (json.dumps(_finite(record), default=json_default, allow_nan=False) + "\n").encode()
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # end a partial line a killed writer left, so this record stays a line of its own
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"short write: {written} of {len(line)} bytes")
            os.fsync(self._fd)
        except OSError as err:
            with contextlib.suppress(OSError):  # should this fail too, readers skip the partial line with a warning
                os.ftruncate(self._fd, size)
            point = f"{record.get('label')} rate {record.get('rate')} seed {record.get('seed')} (key {record['key']})"
            raise StoreError(f"could not append point {point} to {self.path}: {err}. Free disk space (or raise the "
                             f"file size limit) and rerun: {len(self.done_keys())} finished point(s) are kept and "
                             "only the missing ones run.") from err

    def write_parquet(self) -> Path:
        """Write the tidy rows to ``results.parquet`` atomically (a temporary file renamed over it).

        Returns:
            The path of ``results.parquet``.

        Raises:
            StoreError: the file cannot be written (e.g. the disk is full); ``results.jsonl`` keeps every point.
        """
        out = self.folder / "results.parquet"
        df = self.frame()
        if "params" in df:
            df["params"] = df["params"].astype(str)
        try:
            write_atomically(out, lambda tmp: df.to_parquet(tmp, index=False))
        except OSError as err:
            raise StoreError(f"could not write {out}: {err}. Free disk space and rerun the sweep; {self.path} keeps "
                             "every finished point.") from err
        return out

    def _open(self, path: Path, flags: int) -> int:
        try:
            return os.open(path, flags, 0o644)
        except OSError as err:
            raise StoreError(f"cannot open {path} for writing ({err.strerror}): make it writable or pass another "
                             "output folder (CLI --out).") from err

    def _close(self) -> None:
        os.close(self._fd)
        self._fd = None


def _acquire(fd: int, folder: Path, *, wait: bool) -> None:
    """Take the exclusive lock on ``fd`` (blocking if ``wait``) and record this process as its holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            raise StoreLockedError(
                f"{folder} is being written by another sweep ({_holder(fd)}). Wait for it to finish, pass "
                "wait=True (CLI --wait) to wait for it, or pass another output folder (CLI --out).") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
    holder = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
    with contextlib.suppress(OSError):  # the holder's details only inform a refused sweep; the lock is what counts
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)


def _holder(fd: int) -> str:
    """Who holds the lock, as its details in the lock file say."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0))
        return f"pid {holder['pid']}, started {holder['started']}, command {holder['command']!r}"
    except (ValueError, TypeError, KeyError):
        return "pid not recorded yet: it has just started"


def _parse(line: bytes) -> dict[str, Any] | None:
    """A record from one line, or None when the line is not one."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: deeply nested garbage
        return None
    if (isinstance(record, dict) and isinstance(record.get("key"), str) and record.get("status") in ("ok", "failed")
            and isinstance(record.get("metrics"), dict)):
        return record
    return None


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, recursively: strict JSON has no token for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _nan(value: Any) -> Any:
    return math.nan if value is None else value
