"""Where data files are read from (``--data-dir``, ``$KEBENCH_DATA``, ``../shared/data`` beside the checkout,
the fetch cache, the embedded file), that the manifest covers every file anything reads, and that the
managed copies are checked."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import benchmarks.data as data
from benchmarks.data import DATA_DIRECTORY, EMBEDDED, FETCH_CACHE, locate, resolve_data_dir
from benchmarks.fetch import file_status
from benchmarks.manifest import EMBEDDED as ZSRE, MANIFEST, STATS_CORPUS, entries_for, entry_for, group_names
from benchmarks.registry import SPLITS, benchmark_names, benchmark_source, get_benchmark, select_cases
from kebench.core.errors import KebenchError

ROOT = Path(__file__).resolve().parents[1]


def test_the_manifest_lists_exactly_the_files_each_benchmark_reads():
    from benchmarks.piqa import PIQA_ITEMS, PIQA_LABELS
    from methods.stats import COUNTERFACT_FILE, WIKIBIO_FILE, ZSRE_FILE

    read: dict[str, set[str]] = {"piqa": {PIQA_ITEMS, PIQA_LABELS}, STATS_CORPUS: {WIKIBIO_FILE, COUNTERFACT_FILE, ZSRE_FILE}}
    for name in benchmark_names():
        if benchmark_source(name) != "kebench":
            continue
        for split in SPLITS:
            try:
                read.setdefault(name, set()).update(get_benchmark(name).files(split))
            except KebenchError:
                continue  # a split the benchmark does not offer
    assert set(group_names()) == set(read)
    for group, names in read.items():
        assert {entry.name for entry in entries_for(group)} == names, group
    assert len({entry.name for entry in MANIFEST}) == len(MANIFEST)
    for entry in MANIFEST:
        assert (entry.sha256 is None) == (entry.size is None) and len(entry.git_sha1) == 40
        assert entry.sha256 is not None or "git blob id" in entry.hash_source  # where a missing hash's check comes from
    assert entry_for("knowedit/wiki_counterfact_test_cf.json.gz") is entry_for("knowedit/wiki_counterfact_test_cf.json")


def test_the_manifest_matches_the_files_here():
    """Every size and hash is the data directory's copy (the recent_test.json split is not in shared/data)."""
    root = resolve_data_dir()
    states = {entry.name: file_status(entry, root) for entry in MANIFEST}
    if all(status.state == "missing" for name, status in states.items() if name != ZSRE):
        pytest.skip(f"the benchmark data is not here ({root})")
    for name, status in states.items():
        expected = ("missing", "verified") if name == "knowedit/wiki_recent_test.json" else ("verified",)
        assert status.state in expected, (name, status.detail)
        if status.path is not None and entry_for(name).size is not None and status.path.suffix != ".gz":
            assert status.path.stat().st_size == entry_for(name).size


def test_the_embedded_file_is_the_only_data_file_in_the_repository():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    data_like = [p for p in listed if p.endswith((".json", ".jsonl", ".gz", ".lst", ".parquet", ".csv", ".tsv", ".arrow"))]
    assert data_like == ["benchmarks/embedded/zsre/zsre_mend_eval_portability_gpt4.json"]
    assert (ROOT / "benchmarks/embedded/README.md").is_file()  # its provenance and licence note
    assert "embedded/zsre/zsre_mend_eval_portability_gpt4.json" in (ROOT / "pyproject.toml").read_text()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $KEBENCH_DATA, a checkout and working directory with no ../shared beside them, an empty fetch cache."""
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.delenv("KEBENCH_DATA", raising=False)
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_REPO_ROOT", repo)
    monkeypatch.chdir(repo)
    return tmp_path


def _zsre_variant(folder: Path, records: int) -> Path:
    path = folder / ZSRE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json.loads((data.EMBEDDED_DIR / ZSRE).read_text())[:records]))
    return path


def test_resolution_order(isolated, monkeypatch):
    tmp = isolated
    cache = tmp / "cache" / "data"
    assert resolve_data_dir() == cache  # nothing else configured: the fetch cache (which need not exist)
    assert locate(resolve_data_dir(), ZSRE).origin == EMBEDDED

    shared = tmp / "shared" / "data"
    _zsre_variant(shared, 30)
    assert resolve_data_dir() == shared  # ../shared/data beside the checkout
    env = tmp / "env"
    _zsre_variant(env, 20)
    monkeypatch.setenv("KEBENCH_DATA", str(env))
    assert resolve_data_dir() == env
    explicit = tmp / "explicit"
    _zsre_variant(explicit, 10)
    assert resolve_data_dir(explicit) == explicit
    assert locate(resolve_data_dir(explicit), ZSRE) == data.Located(ZSRE, explicit / ZSRE, DATA_DIRECTORY)
    assert sum(len(get_benchmark("zsre").load(split, explicit)) for split in ("dev", "test")) == 10

    # A file the data directory lacks comes from the fetch cache, then from the package.
    empty = tmp / "empty"
    empty.mkdir()
    (cache / ZSRE).parent.mkdir(parents=True)
    shutil.copyfile(data.EMBEDDED_DIR / ZSRE, cache / ZSRE)
    assert locate(empty, ZSRE).origin == FETCH_CACHE
    (cache / ZSRE).unlink()
    assert locate(empty, ZSRE).origin == EMBEDDED
    assert select_cases("zsre", "test", n=20, data_dir=empty).n == 20


def test_a_damaged_managed_copy_is_an_error_naming_it(isolated, monkeypatch):
    tmp = isolated
    empty = tmp / "empty"
    empty.mkdir()
    cached = _zsre_variant(tmp / "cache" / "data", 5)  # the cache holds only exact copies: this one is not
    with pytest.raises(KebenchError, match=rf"{cached}: sha256 [0-9a-f]{{64}} differs from the manifest's "
                                           rf"{entry_for(ZSRE).sha256}; `kebench data fetch --benchmark zsre` replaces it"):
        select_cases("zsre", "test", n=1, data_dir=empty)
    cached.unlink()
    package = tmp / "package"
    _zsre_variant(package, 5)
    monkeypatch.setattr(data, "EMBEDDED_DIR", package)
    with pytest.raises(KebenchError, match="the installed kebench package is damaged; reinstall it"):
        select_cases("zsre", "test", n=1, data_dir=empty)


def test_a_gzipped_copy_hashes_as_its_content(isolated):
    record = {"subject": "Anna", "prompt": "Anna was born in", "target_new": "Oslo", "ground_truth": ["Lima"],
              "portability": {}, "locality": {"Relation_Specificity": [{"prompt": "Bob was born in", "ground_truth": [["Rome"]]}]}}
    content = json.dumps([record]).encode()
    plain, packed = isolated / "plain", isolated / "packed"
    (plain / "knowedit").mkdir(parents=True)
    (packed / "knowedit").mkdir(parents=True)
    (plain / "knowedit/wiki_counterfact_test_cf.json").write_bytes(content)
    (packed / "knowedit/wiki_counterfact_test_cf.json.gz").write_bytes(gzip.compress(content))
    one = select_cases("wikidata-counterfact", "test", data_dir=plain)
    other = select_cases("wikidata-counterfact", "test", data_dir=packed)
    assert one.cases == other.cases and one.data_sha256 == other.data_sha256


def test_wikidata_recent_scores_the_official_test_split_where_it_is_present(isolated):
    record = {"subject": "Anna", "prompt": "The gender of Anna is", "target_new": "female", "portability": {},
              "locality": {"Relation_Specificity": [{"prompt": "The place of birth of Anna is", "ground_truth": [["Cēsis"]]}]}}
    folder = isolated / "data"
    (folder / "knowedit").mkdir(parents=True)
    train = [dict(record, prompt=f"The gender of Anna {i} is") for i in range(40)]
    (folder / "knowedit/wiki_recent_train.json").write_text(json.dumps(train))
    stand_in = select_cases("wikidata-recent", "test", data_dir=folder)
    assert "official test split (recent_test.json, 1,266 records) is unavailable" in stand_in.provenance_note
    assert stand_in.cases[0].case_id.startswith("wikidata-recent-") and "-test-" not in stand_in.cases[0].case_id

    (folder / "knowedit/wiki_recent_test.json").write_text(json.dumps([record, dict(record, prompt="The sex of Anna is")]))
    official = select_cases("wikidata-recent", "test", data_dir=folder)
    assert [case.case_id for case in official.cases] == ["wikidata-recent-test-0", "wikidata-recent-test-1"]
    assert "official test split knowedit/wiki_recent_test.json" in official.provenance_note
    assert official.data_sha256 != stand_in.data_sha256
    dev = select_cases("wikidata-recent", "dev", data_dir=folder)
    assert "knowedit/wiki_recent_train.json" in dev.provenance_note and "unavailable" not in dev.provenance_note
    assert [c.case_id for c in dev.cases] == [c.case_id for c in get_benchmark("wikidata-recent").load("dev", folder)]


def test_the_readme_table_is_the_manifest():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for entry in MANIFEST:
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{entry.name}` |")), None)
        assert row is not None, entry.name
        pin = entry.source.revision if hasattr(entry.source, "revision") else entry.source.commit
        assert f"`{pin[:7]}`" in row and entry.source.path in row, row
        if entry.sha256 is not None:
            assert f"{entry.size:,}" in row and f"`{entry.sha256[:8]}…{entry.sha256[-4:]}`" in row, row
        else:
            assert entry.git_sha1[:8] in row, row


def test_fetch_needs_a_known_name_or_all():
    from benchmarks.fetch import select_entries

    with pytest.raises(KebenchError, match="name what to fetch: --benchmark NAME .* or --all; known: convsent"):
        select_entries([], False)
    with pytest.raises(KebenchError, match="--benchmark: no data files for 'nope'; known: "):
        select_entries(["zsre", "nope"], False)
    assert [e.name for e in select_entries(["piqa"], False)] == ["piqa/valid.jsonl", "piqa/valid-labels.lst"]
    assert select_entries([], True) == MANIFEST


def test_needs_data_names_exactly_the_files_a_data_directory_lacks(tmp_path, monkeypatch):
    """The ``needs_data`` marker's check (tests/conftest.py): the embedded ZsRE file counts as present."""
    from helpers import missing_data

    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data" / "piqa").mkdir(parents=True)
    (tmp_path / "data" / "piqa" / "valid.jsonl").write_text("{}\n")
    assert missing_data(("piqa", "zsre"), tmp_path / "data") == ["piqa/valid-labels.lst",
                                                                 "knowedit/sanitation_trivia_qa_train.json"]
    assert missing_data(("piqa/valid.jsonl", "piqa"), tmp_path / "data") == ["piqa/valid-labels.lst"]
    with pytest.raises(ValueError, match="'nosuch' is neither a data group"):
        missing_data(("nosuch",), tmp_path / "data")
