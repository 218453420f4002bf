"""The ZsRE loader on the real file: counts, splits, irrelevant texts, and its errors."""

from __future__ import annotations

import json

import pytest

from benchmarks.registry import get_benchmark, select_cases
from benchmarks.data import resolve_data_dir
from kebench.core.errors import KebenchError


@pytest.fixture(scope="module")
def splits():
    bench = get_benchmark("zsre")
    root = resolve_data_dir()
    return {name: bench.load(name, root) for name in ("all", "dev", "test")}


@pytest.mark.needs_data("zsre")
def test_record_counts_match_provenance(splits):
    assert len(splits["all"]) == 1037  # PROVENANCE.md
    assert len(splits["dev"]) + len(splits["test"]) == 1037
    assert 60 <= len(splits["dev"]) <= 160  # about 10% by hash
    ids = {c.case_id for c in splits["dev"]} | {c.case_id for c in splits["test"]}
    assert len(ids) == 1037


@pytest.mark.needs_data("zsre")
def test_fields_follow_easyedit(splits):
    first = splits["all"][0]
    assert first.case_id == "zsre-0"
    assert first.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert first.target_new == "2006" and first.ground_truth == ("1998",)
    assert first.rephrase == ("When was the IAAF Combined Events Challenge launched?",)
    assert first.locality["nq"][0].prompt.startswith("nq question: what is the name of the last episode")
    assert first.locality["nq"][0].answer == "The String"
    assert first.portability["one_hop"][0].answer == "Athletics"


@pytest.mark.needs_data("zsre")
def test_irrelevant_texts_come_from_the_other_split(splits):
    test_loc = {c.locality["nq"][0].prompt for c in splits["test"]}
    dev_loc = {c.locality["nq"][0].prompt for c in splits["dev"]}
    for case in splits["test"]:
        assert case.irrelevant and case.irrelevant[0].prompt in dev_loc
        assert case.irrelevant[0].prompt not in test_loc
    # 'all' has no other split: TriviaQA pairs (KnowEdit Sanitation train, K_R), never a ZsRE locality text.
    all_loc = test_loc | dev_loc
    trivia = [c.irrelevant[0] for c in splits["all"]]
    assert len({p.prompt for p in trivia}) == 453 and not {p.prompt for p in trivia} & all_loc
    assert trivia[0].prompt == "Which year of the 18th century was called 'The Year of Victories'?"
    assert trivia[0].answer == "1759" and trivia[453] == trivia[0]  # cycled in file order


def test_selection_is_deterministic_and_sliced():
    first = select_cases("zsre", "test", n=5)
    again = select_cases("zsre", "test", n=5)
    assert first.cases == again.cases and first.data_sha256 == again.data_sha256
    shifted = select_cases("zsre", "test", n=3, offset=2)
    assert shifted.cases == first.cases[2:5]


def test_n_larger_than_the_split_is_an_error():
    with pytest.raises(KebenchError, match="exceeds the .* cases of zsre/dev"):
        select_cases("zsre", "dev", n=5000)


def test_an_empty_data_directory_reads_the_embedded_file(tmp_path, monkeypatch):
    """The package ships the ZsRE file: the same cases and data hash as the data directory's copy; the split
    that also needs KnowEdit's TriviaQA file names the command that fetches it."""
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))  # an empty fetch cache
    embedded = select_cases("zsre", "test", n=20, data_dir=tmp_path)
    here = select_cases("zsre", "test", n=20)
    assert embedded.cases == here.cases and embedded.data_sha256 == here.data_sha256
    with pytest.raises(KebenchError) as error:
        select_cases("zsre", "all", n=1, data_dir=tmp_path)
    message = str(error.value)
    assert "knowedit/sanitation_trivia_qa_train.json not found in" in message and str(tmp_path) in message
    assert "`kebench data fetch --benchmark zsre`" in message and "\n" not in message


def test_malformed_record_names_file_and_index(tmp_path):
    good = {"subject": "s", "src": "q?", "pred": "", "rephrase": "r?", "alt": "a", "answers": ["b"], "loc": "l",
            "loc_ans": "m", "cond": "", "portability": {"New Question": "n?", "New Answer": "o"}}
    bad = dict(good)
    del bad["alt"]
    (tmp_path / "zsre").mkdir()
    (tmp_path / "zsre" / "zsre_mend_eval_portability_gpt4.json").write_text(json.dumps([good, bad]))
    with pytest.raises(KebenchError, match=r"record 1: missing field 'alt'"):
        select_cases("zsre", "all", data_dir=tmp_path)
    wrong_type = dict(good, answers="b")
    (tmp_path / "zsre" / "zsre_mend_eval_portability_gpt4.json").write_text(json.dumps([wrong_type]))
    with pytest.raises(KebenchError, match=r"record 0: field 'answers' should be list, got str"):
        select_cases("zsre", "all", data_dir=tmp_path)


def test_unknown_benchmark_and_split():
    with pytest.raises(KebenchError, match="unknown benchmark 'nope'"):
        select_cases("nope")
    with pytest.raises(KebenchError, match="unknown split 'train'"):
        select_cases("zsre", "train")
