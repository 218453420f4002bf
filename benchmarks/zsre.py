"""ZsRE, the MEND/ROME question-answering edit set with EasyEdit's portability field.

``zsre/zsre_mend_eval_portability_gpt4.json`` is the 1,037-case set WISE and BaFT use for continual
editing.  Locality is the NQ question in ``loc`` scored against the unedited model; portability is the
GPT-4-written ``New Question`` / ``New Answer``.

Splits: a fixed hash of the edit prompt puts about 10% of the records in ``dev`` (for tuning) and the
rest in ``test`` (for reporting); ``all`` is every record in file order, as the papers use them.
BaFT's locality regularizer needs unrelated training texts that are not the texts locality is
evaluated on: WISE draws them from ``zsre_mend_train.json``, which is not available here, so each case
gets the NQ pair of a record from the *other* split (test cases: dev records, and vice versa).  The
``all`` split has no other split: its cases get the open-domain QA pairs (question, answer) that
KnowEdit's Sanitation train file retains (``K_R``, 453 TriviaQA questions), the nearest available
stand-in for WISE's NQ training texts, which no ZsRE split scores locality on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from benchmarks.case import EditCase, PromptAnswer
from benchmarks.data import data_file, read_json, require, require_text, require_texts
from benchmarks.registry import Benchmark, register_benchmark, split_of
from kebench.core.errors import KebenchError

ZSRE_FILE = "zsre/zsre_mend_eval_portability_gpt4.json"
ZSRE_SOURCE = "EasyEdit's editing-data release (portability/One Hop/zsre_mend_eval_portability_gpt4.json)"
TRIVIA_FILE = "knowedit/sanitation_trivia_qa_train.json"
TRIVIA_SOURCE = "KnowEdit (dataset/KnowEdit-ms/benchmark_trivia_trivia_qa_train.json)"


@register_benchmark("zsre")
class ZsRE(Benchmark):
    metrics = ("rel", "gen", "loc", "por")
    provenance_note = ("irrelevant texts for training = NQ loc pairs of the other split (test/dev) or, for split all, "
                       "TriviaQA pairs of KnowEdit Sanitation train K_R (zsre_mend_train.json unavailable)")

    def files(self, split: str) -> tuple[str, ...]:
        return (ZSRE_FILE, TRIVIA_FILE) if split == "all" else (ZSRE_FILE,)

    def load(self, split: str, data_dir: Path) -> list[EditCase]:
        path = data_file(data_dir, ZSRE_FILE, ZSRE_SOURCE)
        records = read_json(path)
        if not isinstance(records, list):
            raise KebenchError(f"{path}: expected a list of records, got {type(records).__name__}")
        parsed = [_parse(record, f"{path}: record {index}", index) for index, record in enumerate(records)]
        if split == "all":
            trivia = _trivia_pairs(data_dir)
            return [_with_irrelevant(case, trivia[position % len(trivia)]) for position, (case, _) in enumerate(parsed)]
        chosen = [(case, loc) for case, loc in parsed if split_of(case.prompt) == split]
        # NQ questions repeat across records: never train on a text this split evaluates locality on.
        evaluated = {loc.prompt for _, loc in chosen}
        others = [loc for case, loc in parsed if split_of(case.prompt) != split and loc.prompt not in evaluated]
        return [
            _with_irrelevant(case, others[position % len(others)]) if others else case
            for position, (case, _) in enumerate(chosen)
        ]


def _parse(record: object, where: str, index: int) -> tuple[EditCase, PromptAnswer]:
    """One record; an empty prompt, target, rephrase, locality or portability text, or a null/empty
    answer, is an error naming the file and record index (every record of the released file has them)."""
    prompt = require_text(record, "src", where)
    target = require_text(record, "alt", where)
    answers = require_texts(record, "answers", where)
    rephrase = require_text(record, "rephrase", where)
    loc = PromptAnswer(require_text(record, "loc", where), require_text(record, "loc_ans", where))
    loc = PromptAnswer(loc.prompt, loc.answer, (loc.answer,))
    portability = require(record, "portability", dict, where)
    question = require_text(portability, "New Question", f"{where} portability")
    answer = require_text(portability, "New Answer", f"{where} portability")
    case = EditCase(
        case_id=f"zsre-{index}",
        prompt=prompt,
        target_new=target,
        ground_truth=tuple(answers),
        subject=require_text(record, "subject", where),
        rephrase=(rephrase,),
        locality={"nq": (loc,)},
        portability={"one_hop": (PromptAnswer(question, answer, (answer,)),)},
    )
    return case, loc


def _with_irrelevant(case: EditCase, irrelevant: PromptAnswer) -> EditCase:
    return replace(case, irrelevant=(irrelevant,))


def _trivia_pairs(data_dir: Path) -> list[PromptAnswer]:
    """The retained (K_R) TriviaQA pairs of KnowEdit's Sanitation train file, in file order."""
    path = data_file(data_dir, TRIVIA_FILE, TRIVIA_SOURCE)
    content = read_json(path)
    records = require(content, "K_R", list, str(path))
    pairs = []
    for index, record in enumerate(records):
        where = f"{path}: K_R record {index}"
        pairs.append(PromptAnswer(require_text(record, "question", where), require_text(record, "ground_truth", where)))
    if not pairs:
        raise KebenchError(f"{path}: K_R is empty")
    return [PromptAnswer(p.prompt, p.answer, (p.answer,)) for p in pairs]
