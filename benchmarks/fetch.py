"""``kebench data fetch`` and ``kebench data status``: benchmark files from their pinned sources, checked.

Hub files go through ``huggingface_hub.hf_hub_download`` (``repo_type="dataset"``, the manifest's
``revision``, an explicit ``endpoint``); GitHub files through ``huggingface_hub``'s HTTP download
(``http_get``: retries, ``Range`` resume, size check).  The client checks sizes only, so every file is
checked here against the manifest's sha256 (or git blob id) before it is moved into place; a file that
differs is deleted.  Downloads are staged under ``<dest>/.downloads``: a file is either absent from
``dest`` or verified there.

An interrupted download is completed by the next fetch: within one call the client retries a dropped
connection with a ``Range`` request; across calls a GitHub file resumes from its ``.incomplete`` part,
and a Hub file is downloaded again (``huggingface_hub`` 2.x discards a partial file, 1.x resumes it).
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit

from benchmarks.data import (DATA_DIRECTORY, EMBEDDED, EMBEDDED_DIR, FETCH_CACHE, cache_data_dir, file_sha256, locate,
                             search_roots, verify)
from benchmarks.manifest import (MANIFEST, STATS_CORPUS, DataFile, GitHubFile, HubFile, entries_for, fetch_command,
                                 group_names)
from kebench.core.errors import KebenchError

#: the Hub endpoint for downloads; huggingface_hub reads HF_ENDPOINT once, at import, so the endpoint is
#: passed to each call instead (which is also how the tests point it at a local server)
ENDPOINT_ENV = "KEBENCH_HF_ENDPOINT"
GITHUB_ENV = "KEBENCH_GITHUB_RAW"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_GITHUB_RAW = "https://raw.githubusercontent.com"
STAGING = ".downloads"
HEAD_TIMEOUT_S = 10.0

Report = Callable[[str], None]


def hub_endpoint() -> str:
    return (os.environ.get(ENDPOINT_ENV) or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def github_raw() -> str:
    return (os.environ.get(GITHUB_ENV) or DEFAULT_GITHUB_RAW).rstrip("/")


def source_url(entry: DataFile) -> str:
    return entry.source.url(hub_endpoint() if isinstance(entry.source, HubFile) else github_raw())


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (read now, and as huggingface_hub read it at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


# --------------------------------------------------------------------------- choosing files

def select_entries(groups: Sequence[str], everything: bool) -> tuple[DataFile, ...]:
    """The manifest entries of ``groups`` (benchmarks, ``piqa``, the statistics corpus), or all of them."""
    if everything:
        return MANIFEST
    if not groups:
        raise KebenchError("name what to fetch: --benchmark NAME (repeatable) or --all; "
                           f"known: {', '.join(group_names())}")
    unknown = [group for group in groups if group not in group_names()]
    if unknown:
        raise KebenchError(f"--benchmark: no data files for '{unknown[0]}'; known: {', '.join(group_names())}")
    chosen = {entry.name for group in groups for entry in entries_for(group)}
    return tuple(entry for entry in MANIFEST if entry.name in chosen)


# --------------------------------------------------------------------------- fetch

@dataclass(frozen=True)
class FetchSummary:
    fetched: tuple[str, ...]
    present: tuple[str, ...]
    dest: Path


def fetch(entries: Iterable[DataFile], dest: Path | None = None, report: Report = print) -> FetchSummary:
    """Bring every entry into ``dest`` (default: the fetch cache), verified; stop at the first failure
    with a one-line KebenchError (the files fetched before it stay)."""
    root = (dest if dest is not None else cache_data_dir()).expanduser()
    if root.exists() and not root.is_dir():
        raise KebenchError(f"--dest {root} is not a directory")
    fetched, present = [], []
    for entry in entries:
        outcome = fetch_one(entry, root, report, default_dest=dest is None)
        (fetched if outcome == "fetched" else present).append(entry.name)
    if not fetched:
        report(f"nothing to fetch: {len(present)} file(s) present and verified ({root})")
    else:
        report(f"fetched {len(fetched)} file(s) into {root}; {len(present)} already present")
    return FetchSummary(tuple(fetched), tuple(present), root)


def fetch_one(entry: DataFile, root: Path, report: Report, default_dest: bool = True) -> str:
    """``"present"`` or ``"fetched"``; raises KebenchError naming the file on any failure."""
    target = root / entry.name
    if target.is_file():
        problem = verify(target, entry)
        if problem is None:
            report(f"present  {entry.name}  ({target}, verified)")
            return "present"
        report(f"replace  {entry.name}: {target}: {problem}")
        target.unlink()
    embedded = EMBEDDED_DIR / entry.name
    if entry.embedded and embedded.is_file():
        if verify(embedded, entry) is not None:
            raise KebenchError(f"{embedded}: {verify(embedded, entry)}: the installed kebench package is damaged; "
                               "reinstall it")
        if default_dest:  # the cache would only duplicate it: reads fall back to the package's copy
            report(f"present  {entry.name}  (embedded in the package, verified)")
            return "present"
        _install_copy(embedded, target)
        report(f"copied   {entry.name}  from the package's embedded copy (verified)")
        return "fetched"
    if offline():
        raise KebenchError(f"{entry.name} is not in {root} and HF_HUB_OFFLINE is set, so it cannot be downloaded: "
                           f"{_how_to_get(entry, target)}")
    staged = _download(entry, root / STAGING, target)
    problem = verify(staged, entry)
    if problem is not None:
        staged.unlink(missing_ok=True)  # nothing of a file that differs is kept
        raise KebenchError(f"{entry.name}: the file downloaded from {source_url(entry)} has {problem}; deleted it")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)
    detail = (f"{target.stat().st_size:,} bytes, sha256 verified" if entry.sha256 is not None else
              f"git blob id verified; {target.stat().st_size:,} bytes, sha256 {file_sha256(target)}")
    report(f"fetched  {entry.name}  from {entry.source.label()} ({detail})")
    return "fetched"


def _install_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".copying")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def _how_to_get(entry: DataFile, target: Path) -> str:
    return (f"run `{fetch_command(entry.name)}` with a network (add --dest DIR to fetch elsewhere and copy DIR "
            f"here), or download {source_url(entry)} to {target}")


def _download(entry: DataFile, staging: Path, target: Path) -> Path:
    """The downloaded, not yet verified file (under ``staging``)."""
    errors = _transport_errors()
    url = source_url(entry)
    try:
        size = _remote_size(entry, url)
        if entry.size is not None and size is not None and size != entry.size:
            raise KebenchError(f"{entry.name}: {url} serves {size:,} bytes, the manifest expects {entry.size:,} "
                               "(another revision of the file?); nothing downloaded")
        if isinstance(entry.source, HubFile):
            return _download_hub(entry.source, staging)
        return _download_github(entry, url, staging)
    except errors as exc:
        raise KebenchError(f"{entry.name}: download from {url} failed ({_reason(exc)}); "
                           f"{_retry_hint(entry, target)}") from None


def _remote_size(entry: DataFile, url: str) -> int | None:
    """One HEAD request without retries, so that an unreachable host fails at once (the client's own
    retries back off for about 20 s), and a size that differs from the manifest costs no download."""
    if isinstance(entry.source, HubFile):
        from huggingface_hub import get_hf_file_metadata

        return get_hf_file_metadata(url, token=False, timeout=HEAD_TIMEOUT_S, endpoint=hub_endpoint()).size
    from huggingface_hub.utils import get_session, hf_raise_for_status

    response = get_session().request("HEAD", url, headers={"Accept-Encoding": "identity"}, timeout=HEAD_TIMEOUT_S,
                                     follow_redirects=True)
    hf_raise_for_status(response)
    length = response.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None


def _download_hub(source: HubFile, staging: Path) -> Path:
    from huggingface_hub import hf_hub_download

    local_dir = staging / "hf" / source.repo / source.revision
    # local_dir: the file lands at local_dir/<path> (moved into place after verification); cache_dir: the
    # client would otherwise copy from (and lock in) the user's own Hugging Face cache.
    path = hf_hub_download(source.repo, source.path, repo_type="dataset", revision=source.revision,
                           endpoint=hub_endpoint(), local_dir=local_dir, cache_dir=staging / "hf-cache", token=False)
    return Path(path)


def _download_github(entry: DataFile, url: str, staging: Path) -> Path:
    from huggingface_hub.file_download import http_get

    assert isinstance(entry.source, GitHubFile)
    part = staging / "github" / entry.source.repo / entry.source.commit / (entry.source.path + ".incomplete")
    part.parent.mkdir(parents=True, exist_ok=True)
    done = part.stat().st_size if part.is_file() else 0
    if entry.size is not None and done > entry.size:
        part.unlink()
        done = 0
    with open(part, "ab") as handle:  # resume a part left by an interrupted fetch (Range: bytes=<done>-)
        http_get(url, handle, resume_size=done, headers={"Accept-Encoding": "identity"}, expected_size=entry.size,
                 displayed_filename=entry.name)
    return part


def _transport_errors() -> tuple[type[BaseException], ...]:
    """OSError covers the client's HTTP, metadata, offline and size-check errors; the HTTP library's own
    transport errors (connection refused or dropped, timeouts) are not OSErrors."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = " ".join(str(exc).split()) or type(exc).__name__
    if cause is not None and type(exc).__name__ in {"LocalEntryNotFoundError", "ValueError"}:
        text = " ".join(str(cause).split()) or type(cause).__name__
    return text[:300]


def _retry_hint(entry: DataFile, target: Path) -> str:
    host = urlsplit(source_url(entry)).netloc
    return (f"run `{fetch_command(entry.name)}` again once {host} can be reached (an interrupted file is completed), "
            f"or download that URL to {target} yourself")


# --------------------------------------------------------------------------- status

@dataclass(frozen=True)
class FileStatus:
    entry: DataFile
    state: str  # "verified", "differs" or "missing"
    path: Path | None
    origin: str
    detail: str


def file_status(entry: DataFile, data_dir: Path) -> FileStatus:
    try:
        found = locate(data_dir, entry.name)
    except KebenchError as exc:  # a damaged copy in the cache or the package
        return FileStatus(entry, "differs", None, "", " ".join(str(exc).split()))
    if found is None:
        return FileStatus(entry, "missing", None, "", fetch_command(entry.name))
    problem = verify(found.path, entry)
    if problem is None:
        return FileStatus(entry, "verified", found.path, found.origin, "")
    return FileStatus(entry, "differs", found.path, found.origin, problem)


def status_lines(data_dir: Path, groups: Sequence[str] = ()) -> list[str]:
    """What ``kebench data status`` prints: each benchmark's files, where each is read from and whether it
    is the manifest's file."""
    roots = {origin: root for root, origin in search_roots(data_dir)}
    lines = [f"data directory: {roots.get(DATA_DIRECTORY, '(none: the fetch cache)')}",
             f"fetch cache:    {roots.get(FETCH_CACHE)}",
             f"embedded:       {roots.get(EMBEDDED)}"]
    width = max(len(entry.name) for entry in MANIFEST)
    for group in groups or group_names():
        kind = {"piqa": " (downstream check)", STATS_CORPUS: " (ROME/MEMIT statistics corpus)"}.get(group, "")
        lines.append(f"{group}{kind}")
        for entry in entries_for(group):
            status = file_status(entry, data_dir)
            if status.state == "verified":
                lines.append(f"  verified  {entry.name:<{width}}  {status.origin}: {status.path}")
            elif status.state == "differs":
                where = f"{status.origin}: {status.path}: " if status.path else ""
                lines.append(f"  differs   {entry.name:<{width}}  {where}{status.detail}")
            else:
                optional = " (optional: the train file stands in)" if entry.name.endswith("wiki_recent_test.json") else ""
                lines.append(f"  missing   {entry.name:<{width}}  `{status.detail}`{optional}")
    return lines

