"""``kebench data fetch`` against a local stand-in of the Hub and of raw GitHub (tests/fake_hub.py), with the
real ``huggingface_hub`` client: files land verified, a rerun is a no-op, altered bytes are refused and
deleted, a dropped connection is completed, a stopped server or HF_HUB_OFFLINE is one line and exit 2."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from urllib.parse import unquote

import pytest

from benchmarks.data import locate, resolve_data_dir
from benchmarks.fetch import fetch
from benchmarks.manifest import MANIFEST, DataFile, HubFile, entry_for
from fake_hub import FakeHub
from orchestrator.cli import main

TRIVIA = "knowedit/sanitation_trivia_qa_train.json"  # zsre's second file (87 kB), from the Hub
PIQA_ITEMS = "piqa/valid.jsonl"  # from raw GitHub (496 kB)
PIQA_LABELS = "piqa/valid-labels.lst"


def _url_path(entry: DataFile) -> str:
    return unquote(entry.source.url(""))


def _content(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running fake Hub serving every manifest file the data directory holds; the client pointed at it and
    the fetch cache in tmp_path."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was set when huggingface_hub was imported")
    source = resolve_data_dir()
    files = {}
    for entry in MANIFEST:
        found = locate(source, entry.name)
        if found is not None:
            files[_url_path(entry)] = _content(found.path)
    if _url_path(entry_for(TRIVIA)) not in files or _url_path(entry_for(PIQA_ITEMS)) not in files:
        pytest.skip(f"the benchmark data is not here ({source})")
    server = FakeHub(files)
    monkeypatch.setenv("KEBENCH_HF_ENDPOINT", server.url)
    monkeypatch.setenv("KEBENCH_GITHUB_RAW", server.url)
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    yield server
    server.stop()
    if not bars_were_off:
        enable_progress_bars()


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.startswith("kebench: error:")]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_files_land_verified_and_a_rerun_is_a_no_op(hub, tmp_path, capsys):
    code, out, errors = _run(["data", "fetch", "--benchmark", "zsre", "--benchmark", "piqa"], capsys)
    assert code == 0 and not errors
    cache = tmp_path / "cache" / "data"
    for name in (TRIVIA, PIQA_ITEMS, PIQA_LABELS):
        assert _sha256(cache / name) == entry_for(name).sha256
    assert not (cache / "zsre").exists() and "embedded in the package" in out  # the package's copy serves reads
    staged = [p for p in (cache / ".downloads").rglob("*") if p.suffix in {".json", ".jsonl", ".lst", ".incomplete"}]
    assert not staged, "nothing staged is left behind"
    asked = len(hub.requests)

    code, out, _ = _run(["data", "fetch", "--benchmark", "zsre", "--benchmark", "piqa"], capsys)
    assert code == 0 and "nothing to fetch: 4 file(s) present and verified" in out
    assert len(hub.requests) == asked  # no network at all

    # Read through the resolution order: an empty data directory, then the fetch cache, then the package.
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, _ = _run(["data", "status", "--data-dir", str(empty), "--benchmark", "zsre"], capsys)
    assert code == 0
    assert any(TRIVIA in line and "verified" in line and "fetch cache" in line for line in out.splitlines())
    assert any("zsre_mend_eval_portability_gpt4.json" in line and "embedded:" in line for line in out.splitlines())
    from benchmarks.registry import select_cases

    assert select_cases("zsre", "all", n=3, data_dir=empty).n == 3  # K_R pairs from the cache, cases from the package


def test_dest_gets_every_file_including_the_embedded_one(hub, tmp_path, capsys):
    dest = tmp_path / "folder"
    code, out, errors = _run(["data", "fetch", "--benchmark", "zsre", "--dest", str(dest)], capsys)
    assert code == 0 and not errors
    assert _sha256(dest / "zsre/zsre_mend_eval_portability_gpt4.json") == entry_for("zsre/zsre_mend_eval_portability_gpt4.json").sha256
    assert _sha256(dest / TRIVIA) == entry_for(TRIVIA).sha256
    assert not (tmp_path / "cache" / "data" / TRIVIA).exists()


@pytest.mark.parametrize("name, group", [(TRIVIA, "zsre"), (PIQA_ITEMS, "piqa")])
def test_altered_bytes_are_one_line_and_nothing_is_kept(hub, tmp_path, capsys, name, group):
    entry = entry_for(name)
    hub.altered.add(_url_path(entry))
    code, _, errors = _run(["data", "fetch", "--benchmark", group], capsys)
    assert code == 2 and len(errors) == 1
    altered = bytearray(hub.files[_url_path(entry)])
    altered[0] ^= 0x01
    assert name in errors[0] and entry.sha256 in errors[0] and hashlib.sha256(altered).hexdigest() in errors[0]
    assert not list((tmp_path / "cache").rglob(Path(name).name + "*"))


def test_a_dropped_connection_is_retried_within_the_fetch(hub, tmp_path, capsys):
    path = _url_path(entry_for(TRIVIA))
    hub.drop_once.add(path)
    code, _, errors = _run(["data", "fetch", "--benchmark", "zsre"], capsys)
    assert code == 0 and not errors and len(hub.gets(path)) == 2
    assert _sha256(tmp_path / "cache" / "data" / TRIVIA) == entry_for(TRIVIA).sha256


@pytest.mark.parametrize("name, group", [(TRIVIA, "zsre"), (PIQA_ITEMS, "piqa")])
def test_an_interrupted_download_is_completed_by_the_next_fetch(hub, tmp_path, capsys, name, group):
    path = _url_path(entry_for(name))
    hub.drop_then_fail.add(path)  # the connection drops mid-file and every retry of this run fails
    code, _, errors = _run(["data", "fetch", "--benchmark", group], capsys)
    assert code == 2 and len(errors) == 1 and name in errors[0] and "again" in errors[0]
    target = tmp_path / "cache" / "data" / name
    assert not target.exists()

    hub.drop_then_fail.clear()
    code, _, errors = _run(["data", "fetch", "--benchmark", group], capsys)
    assert code == 0 and not errors and _sha256(target) == entry_for(name).sha256


def test_a_part_left_behind_is_resumed_with_a_range_request(hub, tmp_path, capsys):
    """The part of a GitHub file an interrupted fetch wrote is completed from where it stopped."""
    entry = entry_for(PIQA_ITEMS)
    path = _url_path(entry)
    half = len(hub.files[path]) // 2
    part = tmp_path / "cache/data/.downloads/github" / entry.source.repo / entry.source.commit / (entry.source.path + ".incomplete")
    part.parent.mkdir(parents=True)
    part.write_bytes(hub.files[path][:half])
    code, _, errors = _run(["data", "fetch", "--benchmark", "piqa"], capsys)
    assert code == 0 and not errors
    assert hub.gets(path) == [f"bytes={half}-"] and not part.exists()
    assert _sha256(tmp_path / "cache" / "data" / PIQA_ITEMS) == entry.sha256


def test_a_stopped_server_is_one_line_and_exit_2(hub, capsys):
    hub.stop()
    code, _, errors = _run(["data", "fetch", "--benchmark", "zsre"], capsys)
    host = hub.url.removeprefix("http://")
    assert code == 2 and len(errors) == 1 and TRIVIA in errors[0] and f"once {host} can be reached" in errors[0]


def test_offline_is_one_line_naming_the_file_and_the_command(hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, errors = _run(["data", "fetch", "--benchmark", "zsre"], capsys)
    assert code == 2 and len(errors) == 1
    assert TRIVIA in errors[0] and "HF_HUB_OFFLINE" in errors[0] and "kebench data fetch --benchmark zsre" in errors[0]
    assert not hub.requests


def test_a_file_known_only_by_its_git_blob_id_is_verified_by_it(hub, tmp_path):
    """WikiData_recent's recent_test.json has no sha256 here: its git blob id (the id a Hub ETag carries for a
    non-LFS file) checks it, and the fetch prints the sha256 to record."""
    data = b'[{"subject": "x"}]'
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    entry = DataFile("knowedit/wiki_recent_test.json", HubFile("zjunlp/KnowEdit", "benchmark/wiki_recent/recent_test.json",
                     "6d218881e60c7c8be836bd2befd598eb3b318be4"), None, None, blob, ("wikidata-recent",), "1", "MIT")
    hub.files[_url_path(entry)] = data
    lines: list[str] = []
    fetch([entry], tmp_path / "d", report=lines.append)
    assert (tmp_path / "d" / entry.name).read_bytes() == data
    assert any("git blob id verified" in line and hashlib.sha256(data).hexdigest() in line for line in lines)
    hub.altered.add(_url_path(entry))
    (tmp_path / "d" / entry.name).unlink()
    from kebench.core.errors import KebenchError

    with pytest.raises(KebenchError, match=f"git blob id [0-9a-f]{{40}} differs from the manifest's {blob}"):
        fetch([entry], tmp_path / "d", report=lines.append)
