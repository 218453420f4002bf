"""The CounterFact loader on the real files: counts, fields of both schemas, splits, errors."""

from __future__ import annotations

import json

import pytest

from benchmarks.case import PromptAnswer
from benchmarks.data import resolve_data_dir
from benchmarks.registry import get_benchmark, select_cases
from kebench.core.errors import KebenchError


@pytest.fixture(scope="module")
def splits():
    bench = get_benchmark("counterfact")
    root = resolve_data_dir()
    return {name: bench.load(name, root) for name in ("test", "dev")}


@pytest.mark.needs_data("counterfact")
def test_record_counts_match_provenance(splits):
    assert len(splits["test"]) == 1031 and len(splits["dev"]) == 1919
    ids = [c.case_id for c in splits["test"] + splits["dev"]]
    assert len(set(ids)) == len(ids)


@pytest.mark.needs_data("counterfact")
def test_test_split_is_the_full_schema_with_portability(splits):
    first = splits["test"][0]
    assert first.case_id == "counterfact-test-4482"
    assert first.prompt == "Spike Hughes originates from" and first.subject == "Spike Hughes"
    assert first.target_new == "Philadelphia" and first.ground_truth == ("London",)
    assert len(first.rephrase) == 2 and first.rephrase[1] == "Amateur Athletic Union (AAU). Spike Hughes was born in"
    neighbours = first.locality["neighborhood"]
    assert len(neighbours) == 10 and neighbours[0] == PromptAnswer("Max Mosley originates from", "London", ("London",))
    question = "What famous food is associated with the city where Spike Hughes originates from?"
    assert first.portability == {"one_hop": (PromptAnswer(question, "Cheesesteaks", ("Cheesesteaks",)),)}
    assert all(c.portability and len(c.rephrase) == 2 and len(c.locality["neighborhood"]) == 10 for c in splits["test"])


@pytest.mark.needs_data("counterfact")
def test_dev_split_is_the_flat_easyedit_file_without_portability(splits):
    first = splits["dev"][0]
    assert first.case_id == "counterfact-dev-10"
    assert (first.prompt, first.target_new, first.ground_truth) == ("BBC One, by", "Sega", ("BBC",))
    assert first.rephrase == ("BBC One is my favorite product out of everything owned by",)
    assert first.locality == {"neighborhood": (PromptAnswer("BBC Radio, by", "BBC", ("BBC",)),)}
    assert all(not c.portability and not c.irrelevant for c in splits["dev"])
    test_ids = {c.case_id.rsplit("-", 1)[1] for c in splits["test"]}
    assert not test_ids & {c.case_id.rsplit("-", 1)[1] for c in splits["dev"]}  # disjoint CounterFact cases


def test_all_is_refused():
    with pytest.raises(KebenchError, match="'counterfact' has splits test .* 'all' is not offered"):
        select_cases("counterfact", "all", n=1)


def test_malformed_records_name_file_and_index(tmp_path):
    good = {"case_id": 1, "prompt": "p", "target_new": "t", "subject": "s", "ground_truth": "g",
            "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "m"}
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "counterfact-val.json").write_text(json.dumps([good, dict(good, case_id="2")]))
    with pytest.raises(KebenchError, match=r"counterfact-val.json: record 1: field 'case_id' should be int, got str"):
        select_cases("counterfact", "dev", data_dir=tmp_path)
    full = {"case_id": 3, "requested_rewrite": {"prompt": "{} is from", "subject": "s", "target_new": {"str": "a"},
                                                "target_true": {"str": "b"}},
            "paraphrase_prompts": ["x"], "neighborhood_prompts": ["y"], "portability": {"New Question": "q"}}
    (tmp_path / "counterfact" / "counterfact_portability_gpt4.json").write_text(json.dumps([full]))
    with pytest.raises(KebenchError, match=r"portability_gpt4.json: record 0 portability: missing field 'New Answer'"):
        select_cases("counterfact", "test", data_dir=tmp_path)


def test_missing_file_names_where_it_looked(tmp_path):
    with pytest.raises(KebenchError) as error:
        select_cases("counterfact", "test", n=1, data_dir=tmp_path)
    message = str(error.value)
    assert "counterfact/counterfact_portability_gpt4.json" in message and str(tmp_path) in message
