"""CounterFact (Meng et al., NeurIPS 2022, ROME) with EasyEdit's portability field.

Splits (decided here; no paper this project reproduces reports CounterFact, so nothing is inherited):

* ``test`` = ``counterfact/counterfact_portability_gpt4.json``: the 1,031 full-ROME-schema records that
  EasyEdit ships with a GPT-4-written portability question (Yao et al. 2023).  All four metrics:
  Rel on ``requested_rewrite``, Gen on both ``paraphrase_prompts``, Loc on all ten
  ``neighborhood_prompts``, Por on ``portability["New Question"]`` / ``["New Answer"]``.  Its case ids all
  lie in EasyEdit's ``counterfact-edit.json`` (the evaluation split).
* ``dev`` = ``counterfact/counterfact-val.json``: EasyEdit's flat validation split (1,919 records,
  case ids disjoint from the test file), one rephrase and one locality prompt each and no portability,
  so dev cases report Rel/Gen/Loc and Por is left empty ("Por where present").
* ``all`` is not offered: the two files have different schemas and roles.

Locality is teacher-forced on ``neighbourhood prompt + " " + true object`` (a neighbourhood prompt is a
different subject with the same relation and the same *true* object as the edited subject); as
everywhere in kebench, the answer only supplies the prefix and the score is the edited model's argmax
agreement with the unedited model's.  Case ids are ``counterfact-<split>-<CounterFact case_id>``.
CounterFact carries no irrelevant training texts here (BaFT trains without its locality regularizer).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.case import EditCase, PromptAnswer
from benchmarks.data import require, require_text, require_texts
from benchmarks.knowedit import _check_unique, read_records
from benchmarks.registry import Benchmark, register_benchmark
from kebench.core.errors import KebenchError

TEST_FILE = "counterfact/counterfact_portability_gpt4.json"
DEV_FILE = "counterfact/counterfact-val.json"
SOURCE = "EasyEdit's editing-data release (portability/One Hop/ and counterfact/; see shared/data/PROVENANCE.md)"


@register_benchmark("counterfact")
class CounterFact(Benchmark):
    metrics = ("rel", "gen", "loc", "por")
    provenance_note = ("CounterFact: test = counterfact_portability_gpt4.json (1,031, with Por), dev = counterfact-val.json "
                       "(1,919, no Por); no irrelevant texts")

    def files(self, split: str) -> tuple[str, ...]:
        if split == "test":
            return (TEST_FILE,)
        if split == "dev":
            return (DEV_FILE,)
        raise KebenchError(f"benchmark 'counterfact' has splits test ({TEST_FILE}) and dev ({DEV_FILE}); "
                           f"'{split}' is not offered")

    def load(self, split: str, data_dir: Path) -> list[EditCase]:
        path, records = read_records(data_dir, self.files(split)[0], SOURCE)
        parse = _parse_full if split == "test" else _parse_flat
        return _check_unique([parse(record, f"{path}: record {index}", split) for index, record in enumerate(records)], path)


def _strings(record: object, key: str, where: str) -> tuple[str, ...]:
    return tuple(require_texts(record, key, where))


def _parse_full(record: object, where: str, split: str) -> EditCase:
    """The full ROME schema (requested_rewrite, paraphrase/neighborhood prompts) plus ``portability``."""
    case_id = require(record, "case_id", int, where)
    rewrite = require(record, "requested_rewrite", dict, where)
    at = f"{where} requested_rewrite"
    template = require_text(rewrite, "prompt", at)
    subject = require_text(rewrite, "subject", at)
    if template.count("{}") != 1:
        raise KebenchError(f"{at}: field 'prompt' should contain exactly one '{{}}' for the subject, got {template!r}")
    target_new = require_text(require(rewrite, "target_new", dict, at), "str", f"{at} target_new")
    target_true = require_text(require(rewrite, "target_true", dict, at), "str", f"{at} target_true")
    neighbours = _strings(record, "neighborhood_prompts", where)
    portability = require(record, "portability", dict, where)
    question = require(portability, "New Question", str, f"{where} portability")
    answer = require(portability, "New Answer", str, f"{where} portability")
    locality = tuple(PromptAnswer(prompt, target_true, (target_true,)) for prompt in neighbours)
    has_portability = bool(question.strip() and answer.strip())
    return EditCase(
        case_id=f"counterfact-{split}-{case_id}",
        prompt=template.format(subject),
        target_new=target_new,
        ground_truth=(target_true,),
        subject=subject,
        rephrase=_strings(record, "paraphrase_prompts", where),
        locality={"neighborhood": locality} if locality else {},
        portability={"one_hop": (PromptAnswer(question, answer, (answer,)),)} if has_portability else {},
    )


def _parse_flat(record: object, where: str, split: str) -> EditCase:
    """EasyEdit's flat split: one rephrase, one locality prompt, no portability."""
    case_id = require(record, "case_id", int, where)
    truth = require_text(record, "ground_truth", where)
    loc_prompt = require_text(record, "locality_prompt", where)
    loc_answer = require_text(record, "locality_ground_truth", where)
    return EditCase(
        case_id=f"counterfact-{split}-{case_id}",
        prompt=require_text(record, "prompt", where),
        target_new=require_text(record, "target_new", where),
        ground_truth=(truth,),
        subject=require_text(record, "subject", where),
        rephrase=(require_text(record, "rephrase_prompt", where),),
        locality={"neighborhood": (PromptAnswer(loc_prompt, loc_answer, (loc_answer,)),)},
    )
