"""Where benchmark files are read from, and reading them with errors that name the file."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from kebench.core.errors import KebenchError

DATA_ENV = "KEBENCH_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--data-dir``, else ``$KEBENCH_DATA``, else ``../shared/data`` beside the checkout."""
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
    raise KebenchError(
        f"no benchmark data directory: pass --data-dir or set ${DATA_ENV} "
        f"(looked for ../shared/data beside {_REPO_ROOT})"
    )


def data_file(data_dir: Path, relative: str, source_hint: str) -> Path:
    path = data_dir / relative
    if not path.is_file():
        raise KebenchError(f"data file {relative} not found in {data_dir}; get it from {source_hint}")
    return path


@lru_cache(maxsize=32)
def _read_json_cached(path: str, mtime_ns: int) -> Any:
    opener = gzip.open if path.endswith(".gz") else open
    line_number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            if path.endswith(".jsonl"):
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


@lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return _sha256_cached(str(path), path.stat().st_mtime_ns)


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


def require_text(record: Any, key: str, where: str) -> str:
    """``record[key]`` as a string that is not empty or blank: a prompt, rephrase or target that would
    otherwise fail as "produced no tokens" deep inside a run (or be scored silently as empty)."""
    value = require(record, key, str, where)
    if not value.strip():
        raise KebenchError(f"{where}: field '{key}' is empty")
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
    return values
