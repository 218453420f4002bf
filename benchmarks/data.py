"""Where benchmark files are read from, and reading them with errors that name the file."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from benchmarks.manifest import DataFile, entry_for, fetch_command
from kebench.core.errors import KebenchError

DATA_ENV = "KEBENCH_DATA"
CACHE_ENV = "KEBENCH_CACHE"
_REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"

#: where a file was found, in the order the roots are searched
DATA_DIRECTORY, FETCH_CACHE, EMBEDDED = "data directory", "fetch cache", "embedded"


def cache_root() -> Path:
    """``$KEBENCH_CACHE``, else ``$XDG_CACHE_HOME/kebench`` or ``~/.cache/kebench``: the root the SmolLM2
    weights use (``kebench.core.models.cache_root``, not imported here because that module loads torch)."""
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "kebench")
    return Path(base).expanduser()


def cache_data_dir() -> Path:
    """Where ``kebench data fetch`` puts files by default."""
    return cache_root() / "data"


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``--data-dir``, else ``$KEBENCH_DATA``, else ``../shared/data`` beside the checkout
    (this repository's development), else the fetch cache (which need not exist yet).

    A file missing from it is then looked for in the fetch cache and, last, in the embedded package data
    (``data_file``): both hold only sha256-checked copies, so falling back to them never changes a number."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise KebenchError(f"--data-dir {path} is not a directory")
        return path
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise KebenchError(f"${DATA_ENV}={env} is not a directory")
        return path
    for candidate in (_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return cache_data_dir()


def search_roots(data_dir: Path) -> list[tuple[Path, str]]:
    """The directories a file is looked for in, in order, each with what it is."""
    roots = [(data_dir, DATA_DIRECTORY)]
    cache = cache_data_dir()
    if _same_dir(cache, data_dir):
        roots = [(data_dir, FETCH_CACHE)]
    else:
        roots.append((cache, FETCH_CACHE))
    return [*roots, (EMBEDDED_DIR, EMBEDDED)]


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


@dataclass(frozen=True)
class Located:
    """A data file found under one of the search roots."""

    name: str
    path: Path
    origin: str  # DATA_DIRECTORY, FETCH_CACHE or EMBEDDED


def locate(data_dir: Path, relative: str) -> Located | None:
    """The first copy of ``relative`` (or of it gzipped, ``relative + ".gz"``) under the search roots.

    Copies in the fetch cache and the embedded data are checked against the manifest's hash (cached per
    modification time, so a file is hashed once per process): they are meant to be exact copies, and a
    damaged one is an error naming it.  A data directory is the user's to fill and is read as it is."""
    for root, origin in search_roots(data_dir):
        for name in (relative, relative + ".gz"):
            path = root / name
            if path.is_file():
                if origin != DATA_DIRECTORY:
                    check_managed_copy(path, relative, origin)
                return Located(relative, path, origin)
    return None


def check_managed_copy(path: Path, relative: str, origin: str) -> None:
    entry = entry_for(relative)
    if entry is None:
        return
    problem = verify(path, entry)
    if problem is None:
        return
    if origin == EMBEDDED:
        raise KebenchError(f"{path}: {problem}: the installed kebench package is damaged; reinstall it")
    raise KebenchError(f"{path}: {problem}; `{fetch_command(relative)}` replaces it")


def verify(path: Path, entry: DataFile) -> str | None:
    """None when ``path``'s content matches the manifest ``entry``; else what differs (one phrase)."""
    if entry.sha256 is not None:
        got = file_sha256(path)
        return None if got == entry.sha256 else f"sha256 {got} differs from the manifest's {entry.sha256}"
    got = file_git_sha1(path)
    return None if got == entry.git_sha1 else f"git blob id {got} differs from the manifest's {entry.git_sha1}"


def data_file(data_dir: Path, relative: str, source_hint: str = "") -> Path:
    """The path ``relative`` is read from (see ``locate``); a missing file says where it looked and which
    command fetches it."""
    found = locate(data_dir, relative)
    if found is not None:
        return found.path
    raise KebenchError(missing_message(data_dir, relative, source_hint))


def missing_message(data_dir: Path, relative: str, source_hint: str = "") -> str:
    places = " or ".join(f"{root} ({origin})" for root, origin in search_roots(data_dir) if origin != EMBEDDED)
    command = fetch_command(relative)
    how = f"fetch it with `{command}`" if command else f"get it from {source_hint or 'its publisher'}"
    return f"data file {relative} not found in {places}; {how}"


@lru_cache(maxsize=32)
def _read_json_cached(path: str, mtime_ns: int) -> Any:
    opener = gzip.open if path.endswith(".gz") else open
    line_number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            if path.removesuffix(".gz").endswith(".jsonl"):
                records = []
                for line_number, line in enumerate(handle, start=1):
                    if line.strip():
                        records.append(json.loads(line))
                return records
            return json.load(handle)
    except json.JSONDecodeError as exc:
        where = f"line {line_number}, column {exc.colno}" if line_number else f"line {exc.lineno}, column {exc.colno}"
        raise KebenchError(f"{path}: cannot parse: {exc.msg} ({where})") from None
    except UnicodeDecodeError as exc:
        raise KebenchError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise KebenchError(f"{path}: truncated or damaged gzip file ({' '.join(str(exc).split()) or type(exc).__name__}); "
                           "download it again") from None
    except OSError as exc:
        raise KebenchError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_json(path: Path) -> Any:
    """Parse a .json / .json.gz / .jsonl file (cached per path and modification time)."""
    return _read_json_cached(str(path), path.stat().st_mtime_ns)


def _open_content(path: str) -> Any:
    """The file's content as a binary stream: a ``.gz`` file is decompressed, so that a file and its gzipped
    copy have one hash (``shared/data`` stores files of 5 MB or more gzipped; the sources do not)."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


@lru_cache(maxsize=64)
def _content_hash_cached(path: str, mtime_ns: int, kind: str) -> str:
    try:
        with _open_content(path) as handle:
            if kind == "sha256":
                digest = hashlib.sha256()
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
                return digest.hexdigest()
            data = handle.read()  # git's blob id hashes a header with the size first
            return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise KebenchError(f"{path}: truncated or damaged gzip file ({' '.join(str(exc).split()) or type(exc).__name__}); "
                           "download it again") from None


def file_sha256(path: Path) -> str:
    """sha256 of the file's content (of the decompressed content for ``.gz``)."""
    return _content_hash_cached(str(path), path.stat().st_mtime_ns, "sha256")


def file_git_sha1(path: Path) -> str:
    """The content's git blob id (``git hash-object``), the id a Hub ETag carries for a non-LFS file."""
    return _content_hash_cached(str(path), path.stat().st_mtime_ns, "git_sha1")


def read_text(path: Path) -> str:
    """A UTF-8 text file (decompressed when ``.gz``), with errors that name the file."""
    try:
        with _open_content(str(path)) as handle:
            return handle.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KebenchError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise KebenchError(f"{path}: truncated or damaged gzip file ({' '.join(str(exc).split()) or type(exc).__name__}); "
                           "download it again") from None
    except OSError as exc:
        raise KebenchError(f"{path}: cannot read: {exc.strerror or exc}") from None


def require(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``record[key]`` checked for presence and type; ``where`` names the file and record index."""
    if not isinstance(record, dict):
        raise KebenchError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise KebenchError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise KebenchError(f"{where}: field '{key}' should be {expected}, got {type(value).__name__}")
    return value


#: the longest text a record may hold (characters; ``$KEBENCH_MAX_TEXT_CHARS`` overrides).  The shipped
#: benchmarks' longest is under 700; one 22,000-character prompt drove cell workers to 8-12 GB (issue 31)
MAX_TEXT_CHARS = 4000
MAX_TEXT_ENV = "KEBENCH_MAX_TEXT_CHARS"


def max_text_chars() -> int:
    value = os.environ.get(MAX_TEXT_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else MAX_TEXT_CHARS


def _check_length(value: str, where: str, field: str) -> None:
    limit = max_text_chars()
    if len(value) > limit:
        raise KebenchError(f"{where}: {field} has {len(value):,} characters, more than {limit:,} (a text that long "
                           f"can take a cell to many GB of memory; shorten the record, or raise ${MAX_TEXT_ENV})")


def require_text(record: Any, key: str, where: str) -> str:
    """``record[key]`` as a string that is not empty or blank: a prompt, rephrase or target that would
    otherwise fail as "produced no tokens" deep inside a run (or be scored silently as empty); nor longer
    than ``max_text_chars()``."""
    value = require(record, key, str, where)
    if not value.strip():
        raise KebenchError(f"{where}: field '{key}' is empty")
    _check_length(value, where, f"field '{key}'")
    return value


def require_texts(record: Any, key: str, where: str, allow_empty_list: bool = True) -> list[str]:
    """``record[key]`` as a list of non-empty strings (null or blank elements are named by index)."""
    values = require(record, key, list, where)
    if not values and not allow_empty_list:
        raise KebenchError(f"{where}: field '{key}' is an empty list")
    for index, value in enumerate(values):
        if value is None:
            raise KebenchError(f"{where}: {key}[{index}] is null")
        if not isinstance(value, str):
            raise KebenchError(f"{where}: {key}[{index}] should be str, got {type(value).__name__}")
        if not value.strip():
            raise KebenchError(f"{where}: {key}[{index}] is empty")
        _check_length(value, where, f"{key}[{index}]")
    return values
