"""Evaluation in the wild (issue 27): normalization, exact match and F1 against hand-computed strings, the
stopping rule, locality as string equality, a routing editor (GRACE) and a weight editor (FT-M) scored
under ``wild`` on the tiny model, KV-cached against re-run decoding, and a grid with two protocols whose
rows are tagged and whose tables never mix them."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks.case import EditCase, PromptAnswer
from benchmarks.decoding import greedy_decode, uses_cache
from benchmarks.evaluate import compute_pre_edit, score_cases
from benchmarks.metrics import model_logits
from benchmarks.protocols import cell_protocols, get_protocol, protocol_tag
from benchmarks.scoring import ScoredModel
from benchmarks.wild import (QA_TEMPLATE, WildSettings, answer_text, best_f1, context_tokens, exact_match,
                             normalize_answer, stop_rule, token_f1, wild_scores)
from helpers import make_editor
from kebench.core import metrics as metric_registry
from kebench.core.errors import KebenchError
from kebench.core.models import byte_tokenizer

CPU = torch.device("cpu")
VOCAB = 300

#: targets that end in "." (a stop string): once teacher forcing predicts every target token, free greedy
#: decoding follows the same path and stops right after the answer, so wild Rel must be 1 as well
DOTTED = (
    EditCase("d0", "The capital of Atlantis is", "Poseidonia.", subject="Atlantis",
             locality={"nq": (PromptAnswer("Grass is", "green"),)}, rephrase=("Atlantis has its capital in",),
             irrelevant=(PromptAnswer("The sky is", "blue"),)),
    EditCase("d1", "The inventor of the zorb is", "Quill.", subject="the zorb",
             locality={"nq": (PromptAnswer("Snow is", "white"),)}, rephrase=("Who invented the zorb?",),
             irrelevant=(PromptAnswer("Fire is", "hot"),)),
)


# --------------------------------------------------------------------------- metrics, by hand

def test_normalization_is_squads():
    assert normalize_answer("  The Quick, brown  FOX. ") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Eiffel-Tower!") == "eiffeltower"  # punctuation is dropped, not spaced
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("\n\t") == ""


def test_exact_match_against_the_answer_and_its_aliases():
    assert exact_match(" Paris", ["paris"]) == 1.0
    assert exact_match("the Paris.", ["Paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("NYC", ["New York City", "NYC"]) == 1.0
    assert exact_match("", ["Paris"]) == 0.0  # an answer that never appears scores 0


def test_token_f1_by_hand():
    # prediction {quick, brown, fox}, gold {quick, fox, jumps}: 2 shared, P = R = 2/3
    assert token_f1("the quick brown fox", "quick fox jumps") == pytest.approx(2 / 3)
    assert token_f1("fox fox", "fox") == pytest.approx(2 / 3)  # P = 1/2, R = 1: shared counts are clipped
    assert token_f1("Paris", "Paris.") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("a", "x") == 0.0  # "a" normalizes to nothing
    assert token_f1("London", "Paris") == 0.0
    assert best_f1("New York", ["Big Apple", "New York City"]) == pytest.approx(0.8)  # P = 1, R = 2/3


def test_f1_metrics_are_registered_outside_avg():
    for name in ("rel_f1", "gen_f1", "por_f1"):
        assert metric_registry.is_metric(name) and not metric_registry.counts_in_average(name)
    assert metric_registry.average({"rel": 1.0, "rel_f1": 0.0, "loc": 0.5}) == 0.75


# --------------------------------------------------------------------------- stopping and contexts

def test_stopping_rule_cuts_at_the_first_stop_string_or_end_of_text():
    tok = byte_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    finished = stop_rule(tok)
    assert not finished(ids(" Pari")) and finished(ids(" Paris.")) and finished(ids(" Paris\n"))
    assert finished(ids(" Hi") + [tok.eos_token_id])
    assert answer_text(tok, ids(" Paris. It is")) == " Paris"
    assert answer_text(tok, ids(" Paris\nNext.")) == " Paris"
    assert answer_text(tok, ids(" Hi") + [tok.eos_token_id] + ids("x.")) == " Hi"
    assert answer_text(tok, ids("\nParis")) == ""  # a newline first: an empty answer (EM 0), as the reference


def _scripted(script: list[int]):
    """A logits function that emits ``script[i]`` as the i-th token after each row's prompt (re-run style)."""
    def logits(batch):
        out = torch.zeros(*batch.input_ids.shape, VOCAB)
        for row in range(batch.size):
            for column in range(int(batch.lengths[row])):
                step = column - int(batch.prompt_lengths[row]) + 1
                out[row, column, script[min(max(step, 0), len(script) - 1)]] = 1.0
        return out
    return logits


def test_decoding_stops_on_the_rule_and_within_the_budget():
    tok = byte_tokenizer()
    text = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = tok("Q", add_special_tokens=True)["input_ids"]
    dotted = _scripted(text(" Oslo. And more"))
    (tokens,) = greedy_decode(dotted, [prompt], 50, 0, CPU, stop=stop_rule(tok))
    assert tok.decode(tokens) == " Oslo."  # the step that produced "." was the last
    endless = _scripted(text(" la"))  # " la" then "a" forever: never stops
    (tokens,) = greedy_decode(endless, [prompt], 7, 0, CPU, stop=stop_rule(tok))
    assert len(tokens) == 7 and tok.decode(tokens) == " laaaaa"


def test_contexts():
    tok = byte_tokenizer()
    assert context_tokens(tok, "Who?", "question") == tok("Who?")["input_ids"]
    assert context_tokens(tok, "Who?", "qa") == tok(QA_TEMPLATE.format(question="Who?"))["input_ids"]
    with pytest.raises(KebenchError, match="chat template"):
        context_tokens(tok, "Who?", "chat")
    chatty = copy.deepcopy(tok)
    chatty.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>{% endif %}")
    expected = "<system>You are a helpful assistant.<user>Who?<assistant>"
    assert context_tokens(chatty, "Who?", "chat") == chatty(expected, add_special_tokens=False)["input_ids"]


def test_settings_are_named_and_only_non_defaults_enter_the_tag():
    assert protocol_tag("wild") == protocol_tag("wild(context=question,max_new_tokens=50)") == "wild"
    assert protocol_tag("wild(max_new_tokens=32, context=chat)") == "wild(context=chat,max_new_tokens=32)"
    assert protocol_tag("wild(intervene_generated=false)") == "wild(intervene_generated=false)"
    assert get_protocol("wild(context=qa)").settings == WildSettings(context="qa")
    assert cell_protocols(["teacher_forced", "wild(context=question)"]) == ("teacher_forced", "wild")
    for bad, message in (("wild(context=poem)", "context must be one of"), ("wild(max_new_tokens=0)", ">= 1"),
                         ("wild(temperature=1)", "unknown setting"), ("wild(max_new_tokens=x)", "must be int"),
                         ("judge", "unknown protocol")):
        with pytest.raises(KebenchError, match=message):
            get_protocol(bad)
    assert "context=qa" in get_protocol("wild(context=qa)").describe()


# --------------------------------------------------------------------------- locality as strings

def test_locality_is_string_equality_with_the_unedited_answer():
    tok = byte_tokenizer()
    text = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    case = EditCase("c", "Q", "Oslo", rephrase=("Q2",),
                    locality={"a": (PromptAnswer("L1", "x"),), "b": (PromptAnswer("L2", "y"), PromptAnswer("L3", "z"))},
                    portability={"hop": (PromptAnswer("P", "Norway", ("Norway", "Kingdom of Norway")),)})
    model = ScoredModel(_scripted(text(" Oslo.")), tok, 0, CPU)
    references = {("c", "a", 0): " Oslo", ("c", "b", 0): " Oslo", ("c", "b", 1): " Bergen"}
    (scores,) = wild_scores(model, [case], references)
    values = scores.as_dict()
    assert values["rel"] == values["gen"] == 1.0 and values["rel_f1"] == 1.0
    assert values["por"] == 0.0 and values["por_f1"] == 0.0
    assert values["loc"] == pytest.approx((1.0 + 0.5) / 2)  # key a: 1; key b: one of two unchanged
    details = dict(scores.details)
    assert details["rel_output"] == " Oslo" and details["loc_unedited"] == " Bergen" and details["loc_output"] == " Oslo"
    assert scores.protocol == "wild"


# --------------------------------------------------------------------------- the tiny model, real editors

def test_kv_cached_and_rerun_decodings_give_the_same_tokens(tiny_lm):
    tok = tiny_lm.tokenizer
    prompts = [tok(text)["input_ids"] for text in ("The capital of France is", "Snow", "A much longer prompt about x")]
    plain = model_logits(tiny_lm.model)
    assert uses_cache(plain) and not uses_cache(plain, "rerun")
    cached = greedy_decode(plain, prompts, 12, 0, CPU, decoding="cache")
    assert cached == greedy_decode(plain, prompts, 12, 0, CPU, decoding="rerun")
    assert cached == [greedy_decode(plain, [p], 12, 0, CPU)[0] for p in prompts]  # padding changes nothing
    editor = make_editor(tiny_lm, "baft", max_steps=5)
    try:
        editor.apply(DOTTED[:1])
        assert uses_cache(editor.logits)
        for intervene in (True, False):
            runs = [greedy_decode(editor.logits, prompts, 12, 0, CPU, intervene_answer=intervene, decoding=mode)
                    for mode in ("cache", "rerun")]
            assert runs[0] == runs[1], intervene
    finally:
        editor.restore()


def test_weight_editor_under_wild(tiny_lm):
    """FT-M: plain weights, decoded with the KV cache; teacher-forced Rel 1 and a dotted target give wild Rel 1."""
    editor = make_editor(tiny_lm, "ft-m")
    assert uses_cache(editor.logits)
    pre = compute_pre_edit(model_logits(tiny_lm.model), tiny_lm.tokenizer, 0, CPU, DOTTED[:1],
                           protocols=("teacher_forced", "wild"))
    try:
        editor.apply(DOTTED[:1])
        (forced,) = score_cases(editor.logits, tiny_lm.tokenizer, 0, CPU, DOTTED[:1], pre)
        (wild,) = score_cases(editor.logits, tiny_lm.tokenizer, 0, CPU, DOTTED[:1], pre, protocol="wild")
    finally:
        editor.restore()
    assert forced.rel == 1.0
    assert wild.protocol == "wild" and wild.rel == 1.0 and wild.get("rel_f1") == 1.0
    assert dict(wild.details)["rel_output"] == " Poseidonia"
    assert set(wild.as_dict()) == {"rel", "rel_f1", "gen", "gen_f1", "loc"}


def test_routing_editor_routes_at_every_decoding_step(tiny_lm):
    """GRACE is re-run on the whole sequence at every step, keyed on the last prompt token each time: every
    forward of the edited prompt hits the codebook (its first generated token is the target's, which the
    unedited model does not produce), and an unrelated prompt never hits and keeps its unedited answer."""
    editor = make_editor(tiny_lm, "grace")
    assert not uses_cache(editor.logits)
    pre = compute_pre_edit(model_logits(tiny_lm.model), tiny_lm.tokenizer, 0, CPU, DOTTED[:1], protocols=("wild",))
    hits: list[list[bool]] = []

    def spy(batch):
        logits = editor.logits(batch)
        hits.append(editor.adapter.last_hits.tolist())
        return logits

    settings = WildSettings(max_new_tokens=6)
    model = ScoredModel(spy, tiny_lm.tokenizer, 0, CPU)
    try:
        editor.apply(DOTTED[:1])
        (rel,) = wild_scores(model, DOTTED[:1], {}, ("rel",), settings)
        edited_steps, hits[:] = list(hits), []
        (loc,) = wild_scores(model, DOTTED[:1], pre.reference("wild"), ("loc",), settings)
    finally:
        editor.restore()
    assert len(edited_steps) >= 2 and edited_steps == [[True]] * len(edited_steps)
    assert hits and hits == [[False]] * len(hits)
    space = tiny_lm.tokenizer(" P", add_special_tokens=False)["input_ids"][0]  # the target's first token
    prompt = tiny_lm.tokenizer(DOTTED[0].prompt)["input_ids"]
    assert greedy_decode(model_logits(tiny_lm.model), [prompt], 1, 0, CPU)[0] != [space]
    assert dict(rel.details)["rel_output"].startswith(" ")
    assert loc.loc == 1.0


# --------------------------------------------------------------------------- a grid with two protocols

def test_grid_with_two_protocols_writes_tagged_rows_and_tables_never_mix(tmp_path: Path, monkeypatch):
    from orchestrator.grid import expand, parse_grid
    from orchestrator.runner import ModelCache, execute_cell
    from results.leaderboard import leaderboard_groups, write_leaderboard
    from results.store import write_cell_attempt
    from results.tables import render
    from results.views import connect, records

    monkeypatch.setenv("KEBENCH_CODE_VERSION", "test")
    spec = {"name": "two", "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
            "scenarios": [{"kind": "single"}], "protocols": ["teacher_forced", {"wild": {"max_new_tokens": 8}}],
            "methods": ["unedited", {"name": "ft-m", "hparams": {"max_steps": 3}}], "seeds": [0]}
    cells = expand(parse_grid(spec, "two.yaml"))
    assert {cell.protocols for cell in cells} == {("teacher_forced", "wild(max_new_tokens=8)")}
    default = expand(parse_grid({**spec, "protocols": ["teacher_forced"]}, "two.yaml"))
    assert {c.cell_id for c in default}.isdisjoint(c.cell_id for c in cells)  # another protocol set, other ids
    cache = ModelCache()
    for cell in cells:
        outcome = execute_cell(cell, 1, cache)
        assert outcome.cell_row["status"] == "ok", outcome.cell_row["error"]
        assert "protocol wild(max_new_tokens=8): context=question, max_new_tokens=8" in outcome.cell_row["provenance"]
        assert {row["protocol"] for row in outcome.case_rows} == {"teacher_forced", "wild(max_new_tokens=8)"}
        wild_metrics = {row["metric"] for row in outcome.case_rows if row["protocol"] != "teacher_forced"}
        assert {"rel", "rel_f1", "gen", "gen_f1", "loc"} <= wild_metrics
        assert not any(row["metric"].endswith("_f1") for row in outcome.case_rows if row["protocol"] == "teacher_forced")
        assert "rel_output" in next(iter(outcome.artifact["cases"].values()))["details"]["wild(max_new_tokens=8)"]
        write_cell_attempt(tmp_path, outcome.cell_row, outcome.case_rows, outcome.artifact)

    with connect(tmp_path) as con:
        means = {(r["label"], r["protocol"], r["metric"]): r["mean"] for r in records(
            con, "SELECT label, protocol, metric, avg(value) AS mean FROM cases_latest GROUP BY ALL")}
        groups = leaderboard_groups(con, resamples=50)
    assert sorted(g.key["protocol"] for g in groups) == ["teacher_forced", "wild(max_new_tokens=8)"]
    lines = render(tmp_path, "single", "md").splitlines()
    for label in ("ft-m", "unedited"):
        for protocol in ("teacher_forced", "wild(max_new_tokens=8)"):
            found = {m: means[(label, protocol, m)] for m in ("rel", "gen", "loc", "por") if (label, protocol, m) in means}
            avg = sum(found.values()) / len(found)  # within the protocol; the F1s stay out
            row = next(line for line in lines if line.startswith(f"| {label} [{protocol}] |"))
            assert f"{round(avg, 2) + 0.0:.2f}" in row.split("|")[-2]
    gap = render(tmp_path, "protocols", "md")
    assert "teacher_forced vs wild(max_new_tokens=8)" in gap and "| ft-m |" in gap
    pages = write_leaderboard(tmp_path, tmp_path / "board", resamples=50)
    text = pages[0].read_text()
    assert "Rel./Gen. under teacher_forced and wild(max_new_tokens=8)" in text
    assert list((tmp_path / "board" / "plots").glob("protocol-gap-*.png"))
    assert "generated: '" in text  # the drill-down shows what the model generated under wild


def test_kebench_edit_takes_protocols(capsys, monkeypatch, tmp_path):
    from orchestrator.cli import main

    monkeypatch.setenv("COLUMNS", "250")  # rich wraps a narrow table's labels
    out = tmp_path / "rows.jsonl"
    code = main(["edit", "--model", "tiny-random-llama", "--method", "unedited", "--n", "2", "--split", "dev", "--quiet",
                 "--protocol", "teacher_forced", "--protocol", "wild(max_new_tokens=4)", "--out", str(out)])
    stdout = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["case_id"], r["protocol"]) for r in rows) == sorted(
        (case, protocol) for case in {r["case_id"] for r in rows} for protocol in ("teacher_forced", "wild(max_new_tokens=4)"))
    assert all(r["loc"] == 1.0 for r in rows)  # the unedited model agrees with itself under both
    assert code == 0 and "unedited [teacher_forced]" in stdout and "unedited [wild(max_new_tokens=4)]" in stdout
    assert "Rel. F1" in stdout and "note: protocol wild(max_new_tokens=4): context=question" in stdout
    try:
        code = main(["edit", "--model", "tiny-random-llama", "--method", "unedited", "--n", "1", "--protocol",
                     "wild(context=poem)"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2 and "context must be one of question, qa, chat" in capsys.readouterr().err


def test_case_parallel_groups_are_scored_under_wild_as_one_by_one(tiny_lm):
    """BaFT's case-parallel path decodes each group's rows through their own case's interventions."""
    from methods.hparams import load_hparams
    from orchestrator.scenarios import Scenario, run_scenario

    hparams = load_hparams("baft", tiny_lm.name, "single", {"max_steps": 4})
    runs = [run_scenario(tiny_lm, "baft", hparams, DOTTED, Scenario("single", parallel_cases=k), seed=0,
                         protocols=("teacher_forced", "wild(max_new_tokens=8)")) for k in (1, 2)]
    assert any("parallel_cases=2: single edits trained" in note for note in runs[1].notes)
    scores = [sorted((c.case_id, c.scores.protocol, c.scores.values, c.scores.details) for c in run.cases) for run in runs]
    assert scores[0] == scores[1]
    assert {protocol for _, protocol, _, _ in scores[1]} == {"teacher_forced", "wild(max_new_tokens=8)"}


def test_grid_protocol_entries_are_canonical_tags_and_bad_ones_one_line_errors():
    from orchestrator.grid import parse_protocols

    assert parse_protocols(["teacher_forced", "wild(context=question)", {"wild": {"context": "chat"}}], "g.yaml",
                           "protocols") == ("teacher_forced", "wild", "wild(context=chat)")
    for entry, message in (("wild(context=poem)", "g.yaml: protocols[0]: protocol 'wild(context=poem)': context must be"),
                           ("wilde", "g.yaml: protocols[0] must be one of"), ({"wild": 3}, "g.yaml: protocols[0]: protocol entry")):
        with pytest.raises(KebenchError, match=re.escape(message)) as info:
            parse_protocols([entry], "g.yaml", "protocols")
        assert "\n" not in str(info.value)
    with pytest.raises(KebenchError, match="duplicate|twice|more than once"):
        parse_protocols(["wild", "wild(max_new_tokens=50)"], "g.yaml", "protocols")


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_kv_cached_decoding_holds_on_other_architectures(tmp_path: Path, kind: str):
    """Position ids and padding masks under the cache are the model's own: GPT-2 and Qwen2 decode alike."""
    from kebench.core.models import load_model
    from test_any_model import save_tiny

    lm = load_model(f"path:{save_tiny(tmp_path / kind, kind)}", device="cpu")
    prompts = [lm.tokenizer(text)["input_ids"] for text in ("The capital of France is", "Snow", "A longer prompt")]
    plain = model_logits(lm.model)
    cached = greedy_decode(plain, prompts, 8, lm.pad_token_id, CPU, decoding="cache")
    assert cached == greedy_decode(plain, prompts, 8, lm.pad_token_id, CPU, decoding="rerun")
