"""The Parquet result store: one immutable file per finished cell attempt, hive-partitioned.

Layout under a store directory::

    artifacts/benchmark=<b>/model=<m>/method=<x>/<cell_id>-a<attempt>.json  drill-down details, gate weights
    cases/benchmark=<b>/model=<m>/method=<x>/<cell_id>-a<attempt>.parquet   one row per case x metric
    cells/benchmark=<b>/model=<m>/method=<x>/<cell_id>-a<attempt>.parquet   one row per cell attempt

Why this shape:
- Only the driver process writes (DuckDB allows one writer; Ray workers return rows instead), and it
  writes a new file per attempt instead of rewriting anything, so a crash can never corrupt results
  that are already stored, and re-runs need no deletes: readers pick the latest attempt per cell.
- Each file is written under a temporary name (``.tmp-…parquet.tmp``) in its final directory and then
  ``os.replace``d, so a file's presence means its attempt finished. Readers glob ``**/*.parquet``,
  which never matches a temporary file.
- The artifact and cases files are written before the cells file, so a cell row implies that its case
  rows (and artifact, when the cell has one) exist.
- Metric names are validated against the metric registry (``kebench.core.metrics``): a benchmark that
  registers a new metric stores it with no change here.
- Partition values are percent-encoded (``urllib.parse.quote``), which DuckDB's hive reader decodes, so
  a model called ``meta-llama/Llama-2-7b-hf`` round-trips exactly and never escapes its directory.

Faults (``scan_store``): a ``*.parquet`` file that cannot be read (truncated, junk) is reported by name;
``kebench table`` renders the rest, ``kebench grid`` moves it aside as ``*.parquet.corrupt`` (no reader
globs it) and re-runs its cell as a new attempt.  An ``ok`` cell whose cases file is gone (a deleted
partition) counts as missing too.  One driver at a time: ``StoreLock`` holds ``<store>/.kebench.lock``
(``flock``, with the holder's PID and host written inside) for the whole run; a second driver gets a
one-line error naming the holder; the kernel releases the lock when its holder dies, so a stale lock
file is simply taken over.  Taking the lock also removes temporary files that killed writers left
(``.tmp-*`` not touched for ``STALE_TMP_SECONDS``): every writer holds the lock, so none of them is live.

A full disk (issue 31): ``check_store_writable`` checks the free space and writes a real probe of
``PROBE_BYTES`` (an empty file is created on a full file system), and a write that runs out of space
mid-grid is a ``StoreFullError`` (a ``KebenchError``: one line, exit 2) naming the store and the file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import importlib.metadata
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from kebench.core import metrics
from kebench.core.errors import KebenchError
from kebench.core.scenarios import scenario_names

SCHEMA_VERSION = 1

CASES_DIR = "cases"
CELLS_DIR = "cells"
ARTIFACTS_DIR = "artifacts"
PARTITION_KEYS = ("benchmark", "model", "method")
TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".parquet.tmp"
CORRUPT_SUFFIX = ".corrupt"
LOCK_NAME = ".kebench.lock"
#: the probe ``check_store_writable`` writes: a cell attempt's files are well under this
PROBE_BYTES = 1 << 20
#: a cell attempt creates up to three files and nine partition folders
MIN_FREE_INODES = 64
#: a temporary file untouched this long is a killed writer's (a live write rewrites it continuously; a probe
#: lives for milliseconds), so the lock holder may remove it
STALE_TMP_SECONDS = 60.0
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

STATUSES = ("ok", "failed")

_UTC_US = pa.timestamp("us", tz="UTC")

CASES_SCHEMA = pa.schema(
    [
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("scenario", pa.string(), nullable=False),
        pa.field("T", pa.int32(), nullable=False),
        pa.field("B", pa.int32(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("stream", pa.int32(), nullable=False),
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("protocol", pa.string(), nullable=False),
        # The edits made in the stream when the row was scored, for a scenario that scores a stream at several
        # checkpoints (lifelong); NULL where a stream is scored once (and in stores written before the column).
        pa.field("checkpoint", pa.int32(), nullable=True),
    ]
)

CELLS_SCHEMA = pa.schema(
    [
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=True),
        pa.field("model", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("offset", pa.int32(), nullable=False),
        pa.field("scenario", pa.string(), nullable=False),
        pa.field("T", pa.int32(), nullable=False),
        pa.field("B", pa.int32(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("hparams", pa.string(), nullable=False),
        pa.field("seconds_per_edit", pa.float64(), nullable=True),
        pa.field("trainable_params", pa.int64(), nullable=True),
        # The same count under the paper's Table 3 convention where the method has one (BaFT), else NULL.
        pa.field("paper_params", pa.int64(), nullable=True),
        pa.field("peak_rss_mb", pa.float64(), nullable=True),
        # The scenario's downstream check (paper Table 8), NULL when the scenario has none: its name, the
        # items scored, the unedited model's score and the edited model's mean over streams.
        pa.field("downstream", pa.string(), nullable=True),
        pa.field("downstream_items", pa.int32(), nullable=True),
        pa.field("downstream_unedited", pa.float64(), nullable=True),
        pa.field("downstream_edited", pa.float64(), nullable=True),
        pa.field("device", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("code_version", pa.string(), nullable=False),
        pa.field("data_sha256", pa.string(), nullable=False),
        pa.field("provenance", pa.string(), nullable=False),
        pa.field("packages", pa.string(), nullable=False),
        pa.field("started_at", _UTC_US, nullable=False),
        pa.field("finished_at", _UTC_US, nullable=False),
        pa.field("schema_version", pa.int32(), nullable=False),
        # Ray Tune trials stored beside grid cells (orchestrator/sweep.py): kind NULL or "grid" for grid
        # cells, "tune" for a trial; the sweep's name and Tune's trial id (NULL for grid cells).
        pa.field("kind", pa.string(), nullable=True),
        pa.field("sweep", pa.string(), nullable=True),
        pa.field("trial_id", pa.string(), nullable=True),
        # How many times the driver started this attempt again because its worker process or node died
        # (orchestrator/runner.py); NULL for sweep trials and in stores written before the column.
        pa.field("retries", pa.int32(), nullable=True),
        # What the numbers were computed on (issue 30; NULL in stores written before, and for a cell that failed
        # before it ran): the hardware record of ``kebench.core.numerics.hardware_record`` as JSON (CPU model, the
        # ISA torch dispatched to, BLAS/MKL/oneDNN versions, MKL's branch, the numerics environment, threads; the
        # GPU and its settings), the numerics setting (``native`` | ``portable``), and the provenance notes one
        # by one as a JSON list (``provenance`` joins them with "; ", which a note may contain itself).
        pa.field("hardware", pa.string(), nullable=True),
        pa.field("numerics", pa.string(), nullable=True),
        pa.field("notes", pa.string(), nullable=True),
    ]
)

# Case rows inherit these from their cell row (they may repeat them, but must agree), so the driver
# cannot store a case under a different cell, model or seed than the cell row says.
INHERITED_CASE_COLUMNS = ("cell_id", "attempt", "model", "benchmark", "split", "scenario", "T", "B",
                          "method", "label", "seed")
_JSON_COLUMNS = ("hparams", "packages")
_NULLABLE_JSON_COLUMNS = ("hardware", "notes")
_TIMESTAMP_COLUMNS = ("started_at", "finished_at")
#: columns whose values come from a fixed list; the scenario kinds are whatever is declared
#: (``kebench.core.scenarios``), read at write time so a plug-in's kind is stored like a built-in one
_CHOICES: dict[str, Callable[[], Sequence[str]]] = {"scenario": scenario_names, "status": lambda: STATUSES}
_PACKAGES = ("torch", "transformers", "peft", "ray", "duckdb", "pyarrow", "kebench")


def path_safe(value: str) -> str:
    """Percent-encode a partition value or file stem so it is one safe path component.

    ``quote(safe="")`` encodes ``/``, ``=``, glob characters and non-ASCII; a leading dot is encoded
    too so that no value can spell ``.``/``..`` or look like a hidden temporary file.
    """
    text = quote(value, safe="")
    return "%2E" + text[1:] if text.startswith(".") else text


def partition_dir(store: Path, dataset: str, row: Mapping[str, Any]) -> Path:
    """The leaf directory ``<store>/<dataset>/benchmark=…/model=…/method=…`` for a row."""
    path = Path(store) / dataset
    for key in PARTITION_KEYS:
        path = path / f"{key}={path_safe(str(row[key]))}"
    return path


def attempt_filename(cell_id: str, attempt: int) -> str:
    return f"{path_safe(cell_id)}-a{int(attempt)}.parquet"


def parquet_glob(store: Path, dataset: str) -> str:
    """The glob readers use; it matches finished files only (temporary files end in ``.tmp``)."""
    return str(Path(store) / dataset / "**" / "*.parquet")


def has_files(store: Path, dataset: str) -> bool:
    directory = Path(store) / dataset
    return directory.is_dir() and any(directory.rglob("*.parquet"))


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that change results; a package not installed is left out."""
    versions: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def write_cell_attempt(store: Path, cell_row: dict, case_rows: list[dict], artifact: Mapping[str, Any] | None = None) -> None:
    """Validate and atomically store one finished cell attempt: the artifact (JSON) and cases files first,
    then the cell file.

    Raises ``ValueError`` naming the offending column for a missing, unknown, null, mistyped or
    out-of-range value, and ``FileExistsError`` if this (cell_id, attempt) is already stored: attempts
    are immutable, use ``next_attempt`` for a re-run.
    """
    store = Path(store)
    cell = _complete_cell_row(cell_row)
    cases = [_complete_case_row(cell, row, index) for index, row in enumerate(case_rows)]
    _check_unique_cases(cases)
    cells_table = _to_table(CELLS_SCHEMA, [cell], "cell row")
    cases_table = _to_table(CASES_SCHEMA, cases, "case rows")

    name = attempt_filename(cell["cell_id"], cell["attempt"])
    targets = [(partition_dir(store, CASES_DIR, cell) / name, cases_table)] if cases else []
    targets.append((partition_dir(store, CELLS_DIR, cell) / name, cells_table))
    for path, _ in targets:
        if path.exists():
            raise FileExistsError(f"{path} already exists: attempt {cell['attempt']} of cell {cell['cell_id']} "
                                  "is stored; use next_attempt() for a re-run")
    if artifact:
        _atomic_write_bytes(artifact_path(store, cell), json.dumps(artifact, ensure_ascii=False, allow_nan=False,
                                                                  separators=(",", ":")).encode("utf-8"))
    for path, table in targets:
        _atomic_write(path, table)


def artifact_path(store: Path, cell_row: Mapping[str, Any]) -> Path:
    return partition_dir(store, ARTIFACTS_DIR, cell_row) / attempt_filename(
        cell_row["cell_id"], cell_row["attempt"]).replace(".parquet", ".json")


def read_artifact(store: Path, cell_row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cell attempt's artifact, or None when it has none (failed cells, older stores) or it is unreadable."""
    return load_artifact(store, cell_row)[0]


def load_artifact(store: Path, cell_row: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """``(artifact, None)``, or ``(None, why)``: "missing", or "unreadable (<reason>)" for a truncated or junk
    file, so that a reader can say what it left out instead of showing empty values."""
    path = artifact_path(store, cell_row)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({' '.join(str(exc).split())[:120] or type(exc).__name__})"
    if not isinstance(data, dict):
        return None, f"unreadable (a JSON {type(data).__name__}, not an object)"
    return data, None


def latest_attempts(store: Path) -> dict[str, tuple[int, str]]:
    """cell_id -> (attempt, status) of its latest finished attempt; {} for an empty or missing store.

    Unreadable files are skipped (``scan_store`` names them)."""
    return scan_store(store).latest


@dataclass
class StoreScan:
    """What ``scan_store`` found: the latest readable attempt per cell, and the files that are not sound."""

    latest: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: ``(path, reason)`` of every ``*.parquet`` file under cells/ or cases/ that cannot be read
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    #: cell ids whose latest attempt is ``ok`` but whose cases file is missing or unreadable
    incomplete: set[str] = field(default_factory=set)

    def usable(self) -> dict[str, tuple[int, str]]:
        """``latest`` without the incomplete cells: what a grid may skip."""
        return {cell_id: value for cell_id, value in self.latest.items() if cell_id not in self.incomplete}


def _reason(path: Path, exc: BaseException) -> str:
    """A short reason for an unreadable file (pyarrow's messages repeat the path and run long)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    size = path.stat().st_size if path.exists() else 0
    if "magic bytes" in text or "minimum file footer" in text:
        return f"not a complete Parquet file ({size} bytes): truncated or not Parquet"
    return text.replace(f"'{path}'", "").replace(str(path), "")[:160]


def _read_problem(path: Path, columns: Sequence[str] | None = None) -> tuple[pa.Table | None, str | None]:
    try:
        return pq.read_table(path, columns=list(columns) if columns else None), None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for truncated or junk files
        return None, _reason(path, exc)


def scan_store(store: Path) -> StoreScan:
    """Read every finished file's header and the cell rows, one file at a time, so that one bad file
    is named instead of failing the whole store."""
    store = Path(store)
    scan = StoreScan()
    cases_files: dict[tuple[str, int], Path] = {}
    cases_dir = store / CASES_DIR
    if cases_dir.is_dir():
        for path in sorted(cases_dir.rglob("*.parquet")):
            try:
                pq.read_metadata(path)
            except Exception as exc:  # noqa: BLE001
                scan.unreadable.append((path, _reason(path, exc)))
                continue
            stem, _, number = path.stem.rpartition("-a")
            if number.isdigit():
                cases_files[(stem, int(number))] = path
    cells_dir = store / CELLS_DIR
    if not cells_dir.is_dir():
        return scan
    for path in sorted(cells_dir.rglob("*.parquet")):
        table, problem = _read_problem(path, ("cell_id", "attempt", "status"))
        if table is None:
            scan.unreadable.append((path, problem or "unreadable"))
            continue
        for cell_id, attempt, status in zip(*(table.column(name).to_pylist() for name in ("cell_id", "attempt", "status"))):
            if cell_id is None or attempt is None:
                continue
            if cell_id not in scan.latest or int(attempt) > scan.latest[cell_id][0]:
                scan.latest[cell_id] = (int(attempt), status)
    for cell_id, (attempt, status) in scan.latest.items():
        if status == "ok" and (path_safe(cell_id), attempt) not in cases_files:
            scan.incomplete.add(cell_id)
    return scan


def quarantine(path: Path) -> Path:
    """Move an unreadable store file aside as ``<name>.corrupt`` (kept for inspection, never globbed)."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    counter = 1
    while target.exists():
        counter += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{counter}")
    os.replace(path, target)
    return target


class StoreFullError(KebenchError):
    """The store's file system ran out of space (or quota) during a write."""


def _no_space(exc: OSError) -> bool:
    # pyarrow's write errors are OSErrors that carry the text, not always the errno
    return exc.errno in _NO_SPACE or "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


@dataclass(frozen=True)
class Room:
    """Free space of a file system: bytes, and inodes where it counts them (None: no inode limit)."""

    bytes: int
    inodes: int | None

    @property
    def enough(self) -> bool:
        return self.bytes >= PROBE_BYTES and (self.inodes is None or self.inodes >= MIN_FREE_INODES)

    def __str__(self) -> str:
        return f"{self.bytes:,} bytes" + ("" if self.inodes is None else f" and {self.inodes:,} inodes") + " free"


def _room(path: Path) -> Room | None:
    try:
        info = os.statvfs(path)
    except (OSError, AttributeError):  # not POSIX, or the call is refused: the probe write still decides
        return None
    # f_files == 0: the file system has no inode limit (btrfs, some network file systems)
    return Room(info.f_bavail * info.f_frsize, info.f_favail if info.f_files else None)


def _full_message(store: Path, room: Room | None) -> str:
    return (f"store {store} is on a full file system ({room or 'no space left'}; a run needs at least "
            f"{PROBE_BYTES:,} bytes and {MIN_FREE_INODES} inodes); free some space or choose another --store")


def check_store_writable(store: Path) -> Path:
    """Create the store directory if needed and prove a file can be written there; a one-line error if not
    (a path that is a file or lies under one, a read-only directory or file system, a full one).

    The probe is ``PROBE_BYTES`` of real data, synced: on a full file system an empty file can still be
    created, and every write after the cells were computed would fail."""
    store = Path(store)
    for parent in [store, *store.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == store else f"lies under {parent}, which is a file"
                raise KebenchError(f"store {store} {what}; choose a directory")
            break
    probe = store / f"{TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        store.mkdir(parents=True, exist_ok=True)
        room = _room(store)
        if room is not None and not room.enough:
            raise KebenchError(_full_message(store, room))
        with open(probe, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())  # a network or delayed-allocation file system reports ENOSPC here
    except OSError as exc:
        if _no_space(exc):
            raise KebenchError(_full_message(store, _room(store))) from None
        reason = exc.strerror or str(exc)
        raise KebenchError(f"store {store} is not writable ({reason}); choose another --store or fix its "
                           "permissions") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return store


def clean_stale_temporaries(store: Path, older_than: float = STALE_TMP_SECONDS) -> list[Path]:
    """Remove ``.tmp-*`` files (of killed writes and probes) not modified for ``older_than`` seconds; only
    the holder of the store's lock may call this (``StoreLock.acquire`` does), as every writer holds it."""
    store = Path(store)
    cutoff = time.time() - older_than
    removed: list[Path] = []
    candidates = list(store.glob(f"{TMP_PREFIX}*"))
    for dataset in (CASES_DIR, CELLS_DIR, ARTIFACTS_DIR):
        if (store / dataset).is_dir():
            candidates += (store / dataset).rglob(f"{TMP_PREFIX}*")
    for path in candidates:
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:  # gone already, or not ours to remove: leave it
            continue
    return removed


class StoreLock:
    """An advisory lock on a store for one driver (``with StoreLock(store): ...``).

    ``flock`` on ``<store>/.kebench.lock``; the holder's PID, host and start time are written into the
    file so that a second driver can say who holds it.  The kernel drops the lock when the holding
    process dies, so a lock file left by a dead driver is taken over without any clean-up.
    """

    def __init__(self, store: Path, command: str = "grid", remedy: str = "use another --store") -> None:
        self.path = Path(store) / LOCK_NAME
        #: who takes the lock (written for a second driver to read) and how that one chooses another store
        self.command, self.remedy = command, remedy
        self._fd: int | None = None
        #: stale temporary files removed when the lock was taken
        self.cleaned: list[Path] = []

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise KebenchError(f"store {self.path.parent}: cannot lock {self.path}: {exc.strerror or exc}") from None
            info = self.holder()
            who = (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')}"
                   if info else "another process")
            holder = info.get("command", "grid") if info else "run"  # a lock file from before the field: a grid
            raise KebenchError(f"store {self.path.parent} is in use by another kebench {holder} ({who}); wait for it "
                               f"to finish or {self.remedy}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": self.command}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode("utf-8"))
        self._fd = fd
        # No other writer is live now: what killed writes left behind can go.
        self.cleaned = clean_stale_temporaries(self.path.parent)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def next_attempt(store: Path, cell_id: str) -> int:
    """1 + the highest attempt number on disk for the cell (1 for a new cell).

    File names are scanned in both datasets, so an attempt that crashed after writing its cases file
    but before its cell file still consumes its number and is never overwritten.
    """
    prefix = f"{path_safe(cell_id)}-a"
    highest = 0
    for dataset in (CASES_DIR, CELLS_DIR):
        for path in (Path(store) / dataset).glob(f"*/*/*/{prefix}*.parquet"):
            number = path.name[len(prefix):-len(".parquet")]
            if number.isdigit():
                highest = max(highest, int(number))
    return highest + 1


# --- validation ---------------------------------------------------------------------------------


def _complete_cell_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Check the columns of a cell row and normalise JSON and timestamp values."""
    names = set(CELLS_SCHEMA.names)
    _reject_unknown(row, names, "cell row")
    out: dict[str, Any] = {}
    for column in CELLS_SCHEMA:
        if column.name == "schema_version":
            out[column.name] = SCHEMA_VERSION
        elif column.name in row:
            out[column.name] = row[column.name]
        elif column.nullable:
            out[column.name] = None
        else:
            raise ValueError(f"cell row: missing column {column.name!r}")
    for name in _JSON_COLUMNS:
        out[name] = _json_text(name, out[name])
    for name in _NULLABLE_JSON_COLUMNS:
        if out[name] is not None:
            out[name] = _json_text(name, out[name])
    for name in _TIMESTAMP_COLUMNS:
        out[name] = _utc_timestamp(name, out[name])
    _check_values(CELLS_SCHEMA, out, "cell row")
    return out


def _complete_case_row(cell: Mapping[str, Any], row: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A case row with its inherited columns filled from the cell row (and checked against it)."""
    where = f"case row {index}"
    _reject_unknown(row, set(CASES_SCHEMA.names), where)
    out: dict[str, Any] = {}
    for column in CASES_SCHEMA:
        if column.name in INHERITED_CASE_COLUMNS:
            if column.name in row and row[column.name] != cell[column.name]:
                raise ValueError(f"{where}: column {column.name!r} is {row[column.name]!r} "
                                 f"but the cell row says {cell[column.name]!r}")
            out[column.name] = cell[column.name]
        elif column.name in row:
            out[column.name] = row[column.name]
        elif column.nullable:
            out[column.name] = None
        else:
            raise ValueError(f"{where}: missing column {column.name!r}")
    _check_values(CASES_SCHEMA, out, where)
    return out


def _reject_unknown(row: Mapping[str, Any], names: set[str], where: str) -> None:
    # A misspelt column would otherwise be dropped silently.
    unknown = sorted(set(row) - names)
    if unknown:
        raise ValueError(f"{where}: unknown column {unknown[0]!r}")


def _check_values(schema: pa.Schema, row: Mapping[str, Any], where: str) -> None:
    for column in schema:
        value = row[column.name]
        if value is None:
            if not column.nullable:
                raise ValueError(f"{where}: column {column.name!r} must not be null")
            continue
        if column.name in _CHOICES and value not in (choices := _CHOICES[column.name]()):
            raise ValueError(f"{where}: column {column.name!r} is {value!r}, expected one of {', '.join(choices)}")
        if column.name == "metric" and not metrics.is_metric(value):
            raise ValueError(f"{where}: column 'metric' is {value!r}, not a registered metric "
                             f"(kebench.register_metric); registered: {', '.join(metrics.metric_names())}")
        if column.name in PARTITION_KEYS + ("cell_id",) and (not isinstance(value, str) or not value):
            # Empty partition values become NULL in hive paths, and names must be strings.
            raise ValueError(f"{where}: column {column.name!r} must be a non-empty string")


def _check_unique_cases(cases: Sequence[Mapping[str, Any]]) -> None:
    # Duplicates would double-count a case in every mean.  A case may be scored under several protocols
    # (GRACE: teacher-forced and generation) and at several checkpoints (lifelong); the tables never average
    # across either.
    seen: set[tuple[str, str, str, int | None]] = set()
    for row in cases:
        key = (row["case_id"], row["metric"], row["protocol"], row["checkpoint"])
        if key in seen:
            raise ValueError(f"case rows: duplicate (case_id, metric, protocol, checkpoint) {key!r}")
        seen.add(key)


def _json_text(name: str, value: Any) -> str:
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"cell row: column {name!r} is not valid JSON: {exc}") from None
        return value
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=isinstance(value, Mapping), default=str)
    raise ValueError(f"cell row: column {name!r} must be a JSON string, a dict or a list, got {type(value).__name__}")


def _utc_timestamp(name: str, value: Any) -> dt.datetime:
    # Naive datetimes are refused: stored as UTC they would silently shift by the local offset.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"cell row: column {name!r} must be timezone-aware (e.g. datetime.now(timezone.utc))")
        return value.astimezone(dt.timezone.utc)
    raise ValueError(f"cell row: column {name!r} must be a datetime or epoch seconds, got {type(value).__name__}")


def _to_table(schema: pa.Schema, rows: Sequence[Mapping[str, Any]], where: str) -> pa.Table:
    """Build the table column by column so a type error names its column."""
    arrays = []
    for column in schema:
        try:
            arrays.append(pa.array([row[column.name] for row in rows], type=column.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
            raise ValueError(f"{where}: column {column.name!r} does not fit type {column.type}: {exc}") from None
    return pa.Table.from_arrays(arrays, schema=schema)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.stem}-{uuid.uuid4().hex[:8]}.json.tmp")
    _atomic(path, tmp, lambda: tmp.write_bytes(data))


def _atomic_write(path: Path, table: pa.Table) -> None:
    """Write to a temporary file in the target directory, then rename it into place."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.stem}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    _atomic(path, tmp, lambda: pq.write_table(table, tmp))


def _atomic(path: Path, tmp: Path, write: Callable[[], Any]) -> None:
    """``write`` the temporary file, rename it to ``path``; a full disk is one ``StoreFullError`` naming the
    store and the file, and the temporary file never stays behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write()
        os.replace(tmp, path)
    except OSError as exc:
        if not _no_space(exc):
            raise
        store = _store_of(path)
        raise StoreFullError(f"store {store} ran out of space writing {path.relative_to(store)} "
                             f"({_room(store) or 'no space left'}): this cell was computed but not stored; the cells "
                             "stored before it are kept; free some space and run the same command again to "
                             "resume") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _store_of(path: Path) -> Path:
    """The store directory a data file lies in: the parent of its cells/, cases/ or artifacts/ folder."""
    for parent in path.parents:
        if parent.name in (CASES_DIR, CELLS_DIR, ARTIFACTS_DIR):
            return parent.parent
    return path.parent
