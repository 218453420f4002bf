"""The KnowEdit loaders on the real files: counts (PROVENANCE.md), alias lists, empty portability, the
train/test nesting differences, splits, errors, and the ConvSent ES/DD scorer."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from benchmarks.case import PromptAnswer
from benchmarks.data import resolve_data_dir
from benchmarks.knowedit import ConvSentProbe, aliases_of, convsent_scores
from benchmarks.registry import get_benchmark, select_cases
from kebench.core.errors import KebenchError
from orchestrator.scenarios import plain_logits

NAMES = ("zsre-knowedit", "wikidata-recent", "wikidata-counterfact", "wikibio", "convsent")
# What the `loaded` fixture reads; WikiData_recent's test file is optional (its train split stands in).
LOADED_FILES = ("zsre-knowedit", "knowedit/wiki_recent_train.json", "wikidata-counterfact", "wikibio", "convsent")


@pytest.fixture(scope="module")
def loaded():
    root = resolve_data_dir()
    out = {}
    for name in NAMES:
        bench = get_benchmark(name)
        for split in ("test", "dev", "all"):
            try:
                out[name, split] = bench.load(split, root)
            except KebenchError:
                pass
    return out


def by_id(cases):
    return {case.case_id: case for case in cases}


@pytest.mark.needs_data(*LOADED_FILES)
def test_record_counts_match_provenance(loaded):
    assert len(loaded["wikidata-counterfact", "test"]) == 885
    assert len(loaded["wikidata-counterfact", "dev"]) == 1428
    assert len(loaded["wikibio", "test"]) == 306 and len(loaded["wikibio", "dev"]) == 464
    assert len(loaded["convsent", "test"]) == 800 and len(loaded["convsent", "dev"]) == 799
    for name, total in (("zsre-knowedit", 1304), ("wikidata-recent", 570)):
        assert len(loaded[name, "all"]) == total
        dev, test = loaded[name, "dev"], loaded[name, "test"]
        assert len(dev) + len(test) == total and 0.05 * total <= len(dev) <= 0.15 * total
        assert not {c.case_id for c in dev} & {c.case_id for c in test}


@pytest.mark.needs_data(*LOADED_FILES)
def test_case_ids_unique_and_stable(loaded):
    for cases in loaded.values():
        assert len({c.case_id for c in cases}) == len(cases)
    assert loaded["wikibio", "test"][17].case_id == "wikibio-test-17"
    assert loaded["wikidata-recent", "all"][3].case_id == "wikidata-recent-3"
    again = get_benchmark("wikidata-recent").load("dev", resolve_data_dir())
    assert [c.case_id for c in again] == [c.case_id for c in loaded["wikidata-recent", "dev"]]


def test_all_is_refused_for_benchmarks_with_separate_files():
    for name in ("wikidata-counterfact", "wikibio", "convsent"):
        with pytest.raises(KebenchError, match=f"'{name}' has splits test .* and dev .*; 'all' is not offered"):
            select_cases(name, "all", n=1)


@pytest.mark.needs_data(*LOADED_FILES)
def test_alias_lists_keep_every_alias_and_score_the_first(loaded):
    case = loaded["wikidata-counterfact", "test"][0]  # Leonardo DiCaprio -> Syria
    assert case.ground_truth == ("United States of America",)
    alias = case.portability["Subject_Aliasing"][0]
    assert alias.answer == "Syria" and alias.aliases[:5] == ("Syria", "sy", "🇸🇾", "Syrian Arab Republic", "SYR")
    assert case.locality["Relation_Specificity"][0].answer == "Irmelin DiCaprio"
    assert "Irmelin Indenbirken-DiCaprio" in case.locality["Relation_Specificity"][0].aliases
    # a prompt with several answers (each an alias list): the first alias of the first answer is scored
    several = loaded["wikidata-counterfact", "test"][30].locality["Forgetfulness"][0]
    assert several.answer == "tennis player" and "television presenter" in several.aliases


@pytest.mark.needs_data(*LOADED_FILES)
def test_empty_answers_and_empty_portability_are_dropped(loaded):
    test_cf = loaded["wikidata-counterfact", "test"]
    # record 288: "2022 ATP Finals is followed by" has ground_truth [[]]
    assert all(item.prompt != "2022 ATP Finals is followed by" for item in test_cf[288].locality["Relation_Specificity"])
    # record 43: [[], ["Hero of the Democratic Republic of Afghanistan"], ...] scores the first non-empty alias
    award = [i for i in test_cf[43].locality["Relation_Specificity"] if i.prompt.startswith("The name of the award")]
    assert award[0].answer == "Hero of the Democratic Republic of Afghanistan"
    recent = loaded["wikidata-recent", "all"]
    assert recent[0].portability == {}  # Ingrīda Amantova: "portability": {}
    assert recent[0].locality["Relation_Specificity"][0] == PromptAnswer(
        "The place of birth of Ingrīda Amantova is", "Cēsis", ("Cēsis",))
    # 35 records carry "Logical_Generalization": [] — never an empty key, never an empty answer
    for cases in loaded.values():
        for case in cases:
            for section in (case.portability, case.locality):
                assert all(items for items in section.values())
                assert all(item.answer and item.answer == item.aliases[0] for items in section.values() for item in items)
    raw = json.load(open(resolve_data_dir() / "knowedit/wiki_recent_train.json", encoding="utf-8"))
    emptied = [i for i, r in enumerate(raw) if r["portability"].get("Logical_Generalization") == []]
    assert len(emptied) == 35 and all("Logical_Generalization" not in recent[i].portability for i in emptied)


def test_dropped_prompts_are_counted_in_the_selection_note(tmp_path):
    """A prompt without an answer is dropped as KnowEdit drops it, and the selection says how many (issue 15)."""
    record = {"subject": "Anna", "prompt": "Anna was born in", "target_new": "Oslo", "ground_truth": ["Lima"],
              "rephrase": "The birthplace of Anna is",
              "portability": {"Reasoning": [{"prompt": "Anna's country is", "ground_truth": [["Norway"]]},
                                            {"prompt": "Anna's river is", "ground_truth": [[]]}]},
              "locality": {"Relation_Specificity": [{"prompt": "", "ground_truth": [["x"]]},
                                                    {"prompt": "Bob was born in", "ground_truth": [["Rome"]]}]}}
    _write(tmp_path / "knowedit/wiki_counterfact_test_cf.json.gz", [record, dict(record, prompt="Anna lives in")], gz=True)
    selection = select_cases("wikidata-counterfact", "test", data_dir=tmp_path)
    assert [len(case.portability["Reasoning"]) for case in selection.cases] == [1, 1]
    assert [len(case.locality["Relation_Specificity"]) for case in selection.cases] == [1, 1]
    assert "dropped 4 portability/locality prompt(s)" in selection.provenance_note
    assert "from 2 of the 2 selected records" in selection.provenance_note
    one = select_cases("wikidata-counterfact", "test", n=1, data_dir=tmp_path)
    assert "dropped 2 portability/locality prompt(s) with an empty prompt or no non-empty answer from 1 of the 1" \
        in one.provenance_note


@pytest.mark.needs_data(*LOADED_FILES)
def test_train_and_test_nesting_both_parse(loaded):
    dev = loaded["wikidata-counterfact", "dev"]  # train_cf: plain strings
    first = dev[0]
    assert first.locality["Relation_Specificity"][0] == PromptAnswer(
        "The name of the founder of Goursez Vreizh is", "Jean Le Fustec", ("Jean Le Fustec",))
    assert first.portability["Subject_Aliasing"][0].answer == "Franche-Comté"
    assert "Forgetfulness" not in dev[326].locality  # its only Forgetfulness answer is ""
    zsre = loaded["zsre-knowedit", "all"][0]  # flat alias lists and plain-string portability
    assert zsre.rephrase == ("What family are Epaspidoceras?",) and zsre.ground_truth == ("Aspidoceratidae",)
    assert zsre.locality["Relation_Specificity"][0].answer == "genus"
    assert zsre.portability["Reasoning"][0].answer == "Owlet moths"
    assert aliases_of([["a", " "], [], ["b", "a"]], "x") == ("a", "b")


@pytest.mark.needs_data(*LOADED_FILES)
def test_wikibio_and_knowedit_carry_no_irrelevant_texts(loaded):
    bio = loaded["wikibio", "test"][0]
    assert bio.prompt.startswith("This is a Wikipedia passage about john russell reynolds.")
    assert bio.target_new.startswith("He received general education from his father")
    assert bio.subject == "john russell reynolds" and set(bio.locality) == {"Relation_Specificity"}
    assert bio.locality["Relation_Specificity"][0].answer == "medicine"
    assert all(not case.irrelevant for cases in loaded.values() for case in cases)
    assert get_benchmark("wikibio").metrics == ("rel", "loc")
    assert get_benchmark("convsent").metrics == ("rel",)
    assert "official test split" in get_benchmark("wikidata-recent").provenance_note
    # ConvSent's Rel is a teacher-forced proxy: its rows carry their own protocol tag, never pooled with others.
    assert get_benchmark("convsent").row_protocol("teacher_forced") == "teacher_forced_target_response"
    assert get_benchmark("convsent").row_protocol("generation") == "generation"
    assert get_benchmark("wikibio").row_protocol("teacher_forced") == "teacher_forced"


@pytest.mark.needs_data(*LOADED_FILES)
def test_convsent_cases_follow_easyedit(loaded):
    root = resolve_data_dir()
    probes = get_benchmark("convsent").probes("test", root)
    raw = json.load(open(root / "knowedit/convsent_blender_test.json", encoding="utf-8"))
    targets = set()
    for index, case in enumerate(loaded["convsent", "test"]):
        probe, record = probes[case.case_id], raw[index]
        targets.add(probe.target)
        word = "postively" if probe.target == "pos" else "negatively"  # EasyEdit's spelling
        assert case.prompt.startswith("From the sentiment dataset, answer ") and case.prompt.endswith(f" {word}.")
        assert record["ent"] in case.prompt and case.subject == record["ent"]
        assert case.target_new == record[probe.target][0].strip()
        assert [r.answer for r in probe.responses] == [t.strip() for t in record["pos"] + record["neg"]]
        assert sum(probe.on_target) == len(record[probe.target])
        nxt = raw[(index + 1) % len(raw)]
        assert [r.answer for r in probe.outer] == [t.strip() for t in nxt["pos"] + nxt["neg"]]
        assert all(nxt["ent"] in r.prompt for r in probe.outer)
    assert targets == {"pos", "neg"}


def test_convsent_scores_are_easyedit_es_and_kl(tiny_lm):
    probe = ConvSentProbe("c", "tea", "pos",
                          tuple(PromptAnswer("What do you think of tea?", t, (t,))
                                for t in ("I love it.", "So good!", "Awful.")),
                          (True, True, False),
                          tuple(PromptAnswer("How do you view rain?", t, (t,)) for t in ("Nice.", "Too wet.")))
    flipped = ConvSentProbe("c", "tea", "neg", probe.responses, (False, False, True), probe.outer)
    base = plain_logits(tiny_lm)
    args = (tiny_lm.tokenizer, tiny_lm.pad_token_id, tiny_lm.device)
    same = convsent_scores(base, base, *args, probe)
    same_flipped = convsent_scores(base, base, *args, flipped)
    assert same.dd == 0.0 and same.z_topic == 1.0  # unedited: no topic shift, no KL
    assert 0.0 < same.es < 1.0 and math.isclose(same.es + same_flipped.es, 1.0, abs_tol=1e-9)  # σ(x) + σ(−x)
    def drained(batch):  # a different model that moves probability mass to one unused token
        logits = base(batch).clone()
        logits[..., tiny_lm.pad_token_id] += 5.0
        return logits

    changed = convsent_scores(drained, base, *args, probe)
    assert changed.dd > 0.0 and changed.z_topic < 1.0


def _write(path, records, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_malformed_records_name_file_and_index(tmp_path):
    bio = {"text": "t", "labels": "l", "concept": "c",
           "locality": {"Relation_Specificity": [{"prompt": "p", "ground_truth": ["a"]}]}}
    _write(tmp_path / "knowedit/wikibio_test_all.json", [bio, {k: v for k, v in bio.items() if k != "labels"}])
    with pytest.raises(KebenchError, match=r"wikibio_test_all.json: record 1: missing field 'labels'"):
        select_cases("wikibio", "test", data_dir=tmp_path)
    cf = {"subject": "s", "prompt": "p", "target_new": "t", "ground_truth": "g", "portability": {},
          "locality": {"Forgetfulness": [{"prompt": "q", "ground_truth": [[7]]}]}}
    _write(tmp_path / "knowedit/wiki_counterfact_test_cf.json.gz", [cf], gz=True)
    with pytest.raises(KebenchError, match=r"wiki_counterfact_test_cf.json.gz: record 0: locality.Forgetfulness\[0\]: "
                                           r"field 'ground_truth' should hold strings"):
        select_cases("wikidata-counterfact", "test", data_dir=tmp_path)
    _write(tmp_path / "knowedit/wiki_recent_train.json", [dict(cf, portability=[])])
    with pytest.raises(KebenchError, match=r"record 0: field 'portability' should be dict, got list"):
        select_cases("wikidata-recent", "all", data_dir=tmp_path)
    _write(tmp_path / "knowedit/convsent_blender_val.json", [{"ent": "x", "pos": ["a"], "neg": [3]}])
    with pytest.raises(KebenchError, match=r"convsent_blender_val.json: record 0: neg\[0\] should be str, got int"):
        select_cases("convsent", "dev", data_dir=tmp_path)


def test_missing_file_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))  # an empty fetch cache
    data = tmp_path / "data"
    data.mkdir()
    for name, relative in (("zsre-knowedit", "knowedit/zsre_test_all.json"), ("wikibio", "knowedit/wikibio_train_all.json"),
                           ("wikidata-counterfact", "knowedit/wiki_counterfact_test_cf.json")):
        split = "test" if name == "wikidata-counterfact" else "dev"
        with pytest.raises(KebenchError) as error:
            select_cases(name, split, n=1, data_dir=data)
        message = str(error.value)
        assert relative in message and str(data) in message and "\n" not in message
        assert str(tmp_path / "cache" / "data") in message and f"`kebench data fetch --benchmark {name}`" in message
