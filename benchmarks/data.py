"""Where benchmark files are read from, and reading them with errors that name the file."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
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
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in handle if line.strip()]
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise KebenchError(f"{path}: cannot parse: {exc}") from None


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
