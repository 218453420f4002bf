"""KnowEdit (Zhang et al. 2024, "A Comprehensive Study of Knowledge Editing for LLMs"): the five
benchmarks the BaFT paper edits besides ZsRE-MEND — WikiData_recent, WikiData_counterfact, WikiBio,
ConvSent (single editing, Table 1) — and KnowEdit's own ZsRE variant.

Files and schemas: ``shared/data/PROVENANCE.md``.  Scoring follows EasyEdit's KnowEdit drivers
(``examples/run_knowedit_llama2.py``, ``examples/run_convsent_llama2.py``) and
``editing-anchors.md`` §2.7:

* Rel is EasyEdit's teacher-forced ``rewrite_acc`` of ``target_new`` after ``prompt``; for WikiBio the
  prompt is the passage (``text``) and the target its continuation (``labels``), as
  ``KnowEditDataset`` maps them.
* Portability and locality are keyed exactly as in the files (``Reasoning``, ``Subject_Aliasing``,
  ``Logical_Generalization``; ``Relation_Specificity``, ``Forgetfulness``); ``benchmarks.evaluate``
  takes, per case, the mean over a key's prompts and then the mean over keys (KnowEdit aggregation).
* Answers that are alias lists keep every alias in ``PromptAnswer.aliases``; the scored answer is the
  first alias, as KnowEdit's driver (``ground_truth[0][0]``) does.  Where the first alias list is
  empty (``[[], ["X"]]``, on which KnowEdit's driver would fail) the first non-empty alias is scored;
  a prompt with no non-empty answer at all is dropped, and so is a key left without prompts (empty
  portability lists such as ``"Logical_Generalization": []``).
* The nesting differs between files: WikiData test files hold lists of alias lists
  (``[["Syria", "sy", ...]]``), the WikiData_counterfact train file plain strings, ZsRE and WikiBio
  flat alias lists; ``aliases_of`` accepts all three.
* No KnowEdit benchmark carries irrelevant training texts: the BaFT paper trains BaFT without its
  locality regularizer on them (§3.2).

Which metrics each benchmark reports follows the paper's Table 1: WikiData_* Rel/Por/Loc, WikiBio
Rel/Loc, ConvSent Rel only; KnowEdit-ZsRE has a rephrase prompt, so it also reports Gen.

ConvSent.  EasyEdit builds each edit as: a random target sentiment, the prompt "From the sentiment
dataset, answer <question about the topic> postively/negatively." and the first response of that
sentiment as ``target_new`` (``format_consent_for_others``, ``random.seed(0)``; we replay the same
random stream, so prompts and targets are EasyEdit's).  Its "Edit Succ." is not a classifier score but
SERAC's likelihood-based ES (``evaluate_utils.es``): over every recorded response to plain questions
about the topic, z_sent = σ(mean log-prob of target-sentiment responses − mean log-prob of the
others) under the edited model, z_topic = min(1, exp(edited − unedited mean log-prob of the
target-sentiment responses)), ES = z_sent · z_topic; its locality ("dd") is the KL(unedited ‖
edited) over the next topic's responses.  Both need the unedited model's full distributions next to
the edited model's, which the shared scorer (``benchmarks.evaluate.score_cases``: token accuracy, and
argmax agreement for locality) does not compute.  So the registered ``convsent`` benchmark reports
Rel as the teacher-forced token accuracy of the target-sentiment response after the edit prompt (the
substitute protocol ``teacher_forced_target_response``, stated in its provenance note), and
``convsent_scores`` implements ES/DD exactly for callers that hold both models (``ConvSent.probes``
gives the per-case response sets).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from benchmarks.case import EditCase, PromptAnswer
from benchmarks.data import data_file, locate, read_json, require, require_text
from benchmarks.metrics import LogitsFn, encode
from benchmarks.registry import Benchmark, register_benchmark, split_of
from kebench.core.metrics import register_metric
from kebench.core.errors import KebenchError

KNOWEDIT_SOURCE = "the KnowEdit release (huggingface.co/datasets/zjunlp/KnowEdit; benchmarks/manifest.py pins it)"
PORTABILITY_KEYS = ("Reasoning", "Subject_Aliasing", "Logical_Generalization")
LOCALITY_KEYS = ("Relation_Specificity", "Forgetfulness")
PROTOCOL_CONVSENT_PROXY = "teacher_forced_target_response"


# --------------------------------------------------------------------------- reading and parsing

def read_records(data_dir: Path, relative: str, source: str = KNOWEDIT_SOURCE) -> tuple[Path, list[Any]]:
    """The parsed file (a JSON list) and its path; a missing file names where it looked."""
    path = data_file(data_dir, relative, source)
    records = read_json(path)
    if not isinstance(records, list):
        raise KebenchError(f"{path}: expected a list of records, got {type(records).__name__}")
    return path, records


def aliases_of(value: object, where: str) -> tuple[str, ...]:
    """Every non-empty alias of a KnowEdit answer, in file order, without repeats.

    Accepts the three nestings found in the files: a string (WikiData_counterfact train), a list of
    aliases (ZsRE, WikiBio) and a list of answers, each a list of aliases (WikiData test files).
    """
    if isinstance(value, str):
        flat: list[str] = [value]
    elif isinstance(value, list):
        flat = []
        for element in value:
            if isinstance(element, str):
                flat.append(element)
            elif isinstance(element, list) and all(isinstance(alias, str) for alias in element):
                flat.extend(element)
            elif element is None:
                raise KebenchError(f"{where}: field 'ground_truth' holds a null answer")
            else:
                raise KebenchError(f"{where}: field 'ground_truth' should hold strings or lists of strings, "
                                   f"got an element of type {type(element).__name__}")
    else:
        raise KebenchError(f"{where}: field 'ground_truth' should be str/list, got {type(value).__name__}")
    seen: dict[str, None] = {}
    for alias in flat:
        alias = alias.strip()
        if alias:
            seen.setdefault(alias, None)
    return tuple(seen)


def prompt_answers(items: object, where: str) -> tuple[PromptAnswer, ...]:
    """A portability/locality list; prompts without a non-empty answer are dropped (KnowEdit drops them)."""
    if not isinstance(items, list):
        raise KebenchError(f"{where}: should be list, got {type(items).__name__}")
    out = []
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        prompt = require(item, "prompt", str, at)
        aliases = aliases_of(require(item, "ground_truth", (str, list), at), at)
        if aliases and prompt.strip():
            out.append(PromptAnswer(prompt, aliases[0], aliases))
    return tuple(out)


def answerless_prompts(record: object) -> int:
    """How many portability/locality prompts of ``record`` ``prompt_answers`` drops (no prompt text, or no
    non-empty answer); malformed sections count nothing here (parsing reports them)."""
    dropped = 0
    for section in ("portability", "locality"):
        value = record.get(section) if isinstance(record, dict) else None
        for items in (value.values() if isinstance(value, dict) else ()):
            for item in (items if isinstance(items, list) else ()):
                if not isinstance(item, dict):
                    continue
                prompt, answers = item.get("prompt"), item.get("ground_truth")
                try:
                    kept = isinstance(prompt, str) and bool(prompt.strip()) and bool(aliases_of(answers, ""))
                except KebenchError:
                    kept = True
                dropped += not kept
    return dropped


def keyed_section(record: object, section: str, where: str) -> dict[str, tuple[PromptAnswer, ...]]:
    """``portability`` / ``locality``: key -> prompts, keys kept as in the file, empty keys dropped."""
    value = require(record, section, dict, where)
    out: dict[str, tuple[PromptAnswer, ...]] = {}
    for key, items in value.items():
        found = prompt_answers(items, f"{where}: {section}.{key}")
        if found:
            out[key] = found
    return out


def _check_unique(cases: Sequence[EditCase], path: Path) -> list[EditCase]:
    ids = [case.case_id for case in cases]
    if len(set(ids)) != len(ids):
        raise KebenchError(f"{path}: duplicate case ids")
    return list(cases)


# --------------------------------------------------------------------------- benchmark shapes

class _TestDevFiles(Benchmark):
    """A benchmark with a test file (reporting) and a train/val file (dev, tuning).

    ``all`` is refused: pooling a test file with its tuning file is not a set any paper reports.
    Case ids are ``<name>-<split>-<record index in that file>``.
    """

    test_file: ClassVar[str]
    dev_file: ClassVar[str]

    def files(self, split: str) -> tuple[str, ...]:
        if split == "test":
            return (self.test_file,)
        if split == "dev":
            return (self.dev_file,)
        raise KebenchError(f"benchmark '{self.name}' has splits test ({self.test_file}) and dev ({self.dev_file}); "
                           f"'{split}' is not offered")

    def load(self, split: str, data_dir: Path) -> list[EditCase]:
        return self.load_with_drops(split, data_dir)[0]

    def load_with_drops(self, split: str, data_dir: Path) -> tuple[list[EditCase], dict[str, int]]:
        path, records = read_records(data_dir, self.files(split)[0])
        cases = [self.parse(record, f"{path}: record {index}", f"{self.name}-{split}-{index}")
                 for index, record in enumerate(records)]
        drops = {case.case_id: answerless_prompts(record) for case, record in zip(cases, records)}
        return _check_unique(cases, path), drops

    def parse(self, record: object, where: str, case_id: str) -> EditCase:
        raise NotImplementedError


class _HashSplitFile(Benchmark):
    """One file: a fixed hash of the edit prompt puts ~10% of the records in ``dev``, the rest in ``test``;
    ``all`` is the file in order.  Case ids are ``<name>-<record index>`` in every split."""

    file: ClassVar[str]

    def files(self, split: str) -> tuple[str, ...]:
        return (self.file,)

    def load(self, split: str, data_dir: Path) -> list[EditCase]:
        return self.load_with_drops(split, data_dir)[0]

    def load_with_drops(self, split: str, data_dir: Path) -> tuple[list[EditCase], dict[str, int]]:
        path, records = read_records(data_dir, self.file)
        cases = [self.parse(record, f"{path}: record {index}", f"{self.name}-{index}")
                 for index, record in enumerate(records)]
        _check_unique(cases, path)
        drops = {case.case_id: answerless_prompts(record) for case, record in zip(cases, records)}
        if split == "all":
            return cases, drops
        return [case for case in cases if split_of(case.prompt) == split], drops

    def parse(self, record: object, where: str, case_id: str) -> EditCase:
        raise NotImplementedError


def _wikidata_case(record: object, where: str, case_id: str, with_ground_truth: bool) -> EditCase:
    ground_truth: tuple[str, ...] = ()
    if with_ground_truth:
        ground_truth = aliases_of(require(record, "ground_truth", (str, list), where), where)
    return EditCase(
        case_id=case_id,
        prompt=require_text(record, "prompt", where),
        target_new=require_text(record, "target_new", where),
        ground_truth=ground_truth,
        subject=require_text(record, "subject", where),
        portability=keyed_section(record, "portability", where),
        locality=keyed_section(record, "locality", where),
    )


# --------------------------------------------------------------------------- the benchmarks

@register_benchmark("wikidata-counterfact")
class WikiDataCounterfact(_TestDevFiles):
    """KnowEdit WikiData_counterfact (RippleEdits): test_cf (885) for reporting, train_cf (1,428) as dev."""

    metrics = ("rel", "loc", "por")
    test_file = "knowedit/wiki_counterfact_test_cf.json"  # shared/data holds it gzipped (.json.gz): both are read
    dev_file = "knowedit/wiki_counterfact_train_cf.json"
    provenance_note = "KnowEdit WikiData_counterfact; no irrelevant texts (BaFT trains without R_loc, as in the paper)"

    def parse(self, record: object, where: str, case_id: str) -> EditCase:
        return _wikidata_case(record, where, case_id, with_ground_truth=True)


RECENT_TEST = "knowedit/wiki_recent_test.json"
RECENT_TRAIN = "knowedit/wiki_recent_train.json"


@register_benchmark("wikidata-recent")
class WikiDataRecent(_HashSplitFile):
    """KnowEdit WikiData_recent (knowledge insertion: no ground truth for the edit itself).

    ``test`` is the official test split ``recent_test.json`` (1,266) wherever it can be read (``kebench
    data fetch --benchmark wikidata-recent`` fetches it; case ids ``wikidata-recent-test-<index>``).  Where
    it cannot, the 570-record train file stands in as test, as before.  ``dev`` (a fixed ~10% hash slice
    of the train file) and ``all`` (the train file) read the train file either way.  Every row's
    provenance names the file its split scored."""

    metrics = ("rel", "loc", "por")
    file = RECENT_TRAIN
    provenance_note = ("WikiData_recent's official test split (recent_test.json, 1,266 records) is unavailable: its "
                       "570-record train file stands in as test, with a fixed ~10% hash slice of it held out as dev; "
                       "no irrelevant texts")

    def files(self, split: str) -> tuple[str, ...]:
        return (RECENT_TEST, RECENT_TRAIN) if split == "test" else (RECENT_TRAIN,)

    def files_read(self, split: str, data_dir: Path) -> tuple[str, ...]:
        return (RECENT_TEST,) if split == "test" and self.official_test(data_dir) else (RECENT_TRAIN,)

    def provenance(self, split: str, data_dir: Path) -> str:
        if not self.official_test(data_dir):
            return self.provenance_note
        if split == "test":
            return f"WikiData_recent test = the official test split {RECENT_TEST}; no irrelevant texts"
        return (f"WikiData_recent {split} = {'a fixed ~10% hash slice of ' if split == 'dev' else ''}the train file "
                f"{RECENT_TRAIN} (test is the official {RECENT_TEST}); no irrelevant texts")

    @staticmethod
    def official_test(data_dir: Path) -> bool:
        return locate(data_dir, RECENT_TEST) is not None

    def load_with_drops(self, split: str, data_dir: Path) -> tuple[list[EditCase], dict[str, int]]:
        if split != "test" or not self.official_test(data_dir):
            return super().load_with_drops(split, data_dir)
        path, records = read_records(data_dir, RECENT_TEST)
        cases = [self.parse(record, f"{path}: record {index}", f"{self.name}-test-{index}")
                 for index, record in enumerate(records)]
        drops = {case.case_id: answerless_prompts(record) for case, record in zip(cases, records)}
        return _check_unique(cases, path), drops

    def parse(self, record: object, where: str, case_id: str) -> EditCase:
        return _wikidata_case(record, where, case_id, with_ground_truth=False)


@register_benchmark("zsre-knowedit")
class ZsREKnowEdit(_HashSplitFile):
    """KnowEdit's ZsRE (1,304 records): locality is Relation_Specificity about the same subject, not NQ."""

    metrics = ("rel", "gen", "loc", "por")
    file = "knowedit/zsre_test_all.json"
    provenance_note = ("KnowEdit ZsRE-test-all; dev/test by the same prompt hash as 'zsre' (so a prompt in both "
                       "files is in the same split); 'all' is the whole file; no irrelevant texts")

    def parse(self, record: object, where: str, case_id: str) -> EditCase:
        return EditCase(
            case_id=case_id,
            prompt=require_text(record, "prompt", where),
            target_new=require_text(record, "target_new", where),
            ground_truth=aliases_of(require(record, "ground_truth", (str, list), where), where),
            subject=require_text(record, "subject", where),
            rephrase=(require_text(record, "rephrase_prompt", where),),
            portability=keyed_section(record, "portability", where),
            locality=keyed_section(record, "locality", where),
        )


@register_benchmark("wikibio")
class WikiBio(_TestDevFiles):
    """KnowEdit WikiBio hallucination editing: the edit is the passage's continuation (``labels``) after ``text``."""

    metrics = ("rel", "loc")
    test_file = "knowedit/wikibio_test_all.json"
    dev_file = "knowedit/wikibio_train_all.json"
    provenance_note = "KnowEdit WikiBio (prompt = text, target = labels); no irrelevant texts"

    def parse(self, record: object, where: str, case_id: str) -> EditCase:
        return EditCase(
            case_id=case_id,
            prompt=require_text(record, "text", where),
            target_new=require_text(record, "labels", where),
            subject=require_text(record, "concept", where),
            locality=keyed_section(record, "locality", where),
        )


# --------------------------------------------------------------------------- ConvSent

# examples/run_convsent_llama2.py: the question templates and the two edit instructions ("postively" sic).
CONVSENT_TEMPLATES = (
    "What do you think of {}?",
    "What do you feel about {}?",
    "How do you view {}?",
    *(f"What is your {position} {{}}?" for position in (
        "opinion of", "stance on", "position on", "attitude about", "view on",
        "take on", "impression of", "assessment of", "judgment of", "sentiment of",
    )),
)
CONVSENT_INSTRUCTIONS = {
    "pos": "From the sentiment dataset, answer {} postively.",
    "neg": "From the sentiment dataset, answer {} negatively.",
}
CONVSENT_SEED = 0  # run_convsent_llama2.py seeds Python's random with 0 before building the requests


@dataclass(frozen=True)
class ConvSentProbe:
    """What EasyEdit's ConvSent metric scores for one case (``metric_kwargs`` of run_convsent_llama2.py).

    ``responses``: a plain question about the topic with each recorded response (positive then
    negative), ``on_target[i]`` whether response i has the target sentiment; ``outer``: the same for
    the next record's topic (the locality set).
    """

    case_id: str
    topic: str
    target: str  # "pos" or "neg"
    responses: tuple[PromptAnswer, ...]
    on_target: tuple[bool, ...]
    outer: tuple[PromptAnswer, ...]


def _responses(record: object, key: str, where: str) -> list[str]:
    values = require(record, key, list, where)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise KebenchError(f"{where}: {key}[{index}] should be str, got {type(value).__name__}")
    # Responses carry the dialogue's padding spaces (" I really like his style. "); the scorer joins
    # prompt and answer with one space, so the padding is stripped.
    return [value.strip() for value in values]


def convsent_build(records: list[Any], path: Path, split: str,
                   name: str = "convsent") -> list[tuple[EditCase, ConvSentProbe]]:
    """Cases and probes, replaying ``format_consent_for_others``'s random draws in its order."""
    rng = random.Random(CONVSENT_SEED)
    parsed = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        topic = require_text(record, "ent", where)
        pos, neg = _responses(record, "pos", where), _responses(record, "neg", where)
        if not pos or not neg or not all(pos + neg):
            raise KebenchError(f"{where}: 'pos' and 'neg' must be non-empty lists of non-empty responses")
        parsed.append((topic, pos, neg))
    out = []
    for index, (topic, pos, neg) in enumerate(parsed):
        target = "pos" if rng.choice([0, 1]) == 0 else "neg"
        prompt = CONVSENT_INSTRUCTIONS[target].format(rng.choice(CONVSENT_TEMPLATES).format(topic))
        outer_topic, outer_pos, outer_neg = parsed[(index + 1) % len(parsed)]
        inner_texts = pos + neg
        on_target = tuple((i < len(pos)) == (target == "pos") for i in range(len(inner_texts)))
        rng.choice(CONVSENT_TEMPLATES)  # EasyEdit's inner_q: drawn (and used only for fluency), kept for the stream
        inner = tuple(PromptAnswer(rng.choice(CONVSENT_TEMPLATES).format(topic), text, (text,)) for text in inner_texts)
        outer = tuple(PromptAnswer(rng.choice(CONVSENT_TEMPLATES).format(outer_topic), text, (text,))
                      for text in outer_pos + outer_neg)
        case_id = f"{name}-{split}-{index}"
        target_text = (pos if target == "pos" else neg)[0]
        case = EditCase(case_id=case_id, prompt=prompt, target_new=target_text, subject=topic)
        out.append((case, ConvSentProbe(case_id, topic, target, inner, on_target, outer)))
    return out


@register_benchmark("convsent")
class ConvSent(_TestDevFiles):
    """KnowEdit ConvSent (SERAC's sentiment editing on BlenderBot dialogue): blender_test (800) / blender_val (799)."""

    metrics = ("rel",)
    proxy_protocol: ClassVar[str | None] = PROTOCOL_CONVSENT_PROXY
    test_file = "knowedit/convsent_blender_test.json"
    dev_file = "knowedit/convsent_blender_val.json"
    provenance_note = (f"protocol {PROTOCOL_CONVSENT_PROXY}: Rel = teacher-forced token accuracy of the target-sentiment "
                       "response after EasyEdit's edit prompt (a proxy); EasyEdit's likelihood ES and DD are reported "
                       "beside it under protocol convsent_es_dd; no irrelevant texts")

    def load(self, split: str, data_dir: Path) -> list[EditCase]:
        path, records = read_records(data_dir, self.files(split)[0])
        return _check_unique([case for case, _ in convsent_build(records, path, split, self.name)], path)

    def load_with_drops(self, split: str, data_dir: Path) -> tuple[list[EditCase], dict[str, int]]:
        return self.load(split, data_dir), {}  # no portability/locality lists: nothing is dropped

    def probes(self, split: str, data_dir: Path) -> dict[str, ConvSentProbe]:
        path, records = read_records(data_dir, self.files(split)[0])
        return {probe.case_id: probe for _, probe in convsent_build(records, path, split, self.name)}

    def extra_scorer(self, split: str, data_dir: Path) -> "ConvSentScorer":
        return ConvSentScorer(self.probes(split, data_dir))


@dataclass(frozen=True)
class ConvSentScores:
    es: float  # SERAC/EasyEdit edit success: z_sent · z_topic
    z_sent: float
    z_topic: float
    dd: float  # KL(unedited ‖ edited) per response token on the next topic's responses (lower is better)


def _answer_distributions(logits_fn: LogitsFn, tokenizer, pairs: Sequence[PromptAnswer], pad_token_id: int,
                          device: torch.device, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair: (log-softmax over the vocabulary at each answer position [k, V], the answer tokens [k])."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = encode(tokenizer, [(pair.prompt, pair.answer) for pair in chunk], pad_token_id).to(device)
        with torch.no_grad():
            logits = logits_fn(batch)
        for row in range(batch.size):
            p, n = int(batch.prompt_lengths[row]), int(batch.lengths[row])
            out.append((F.log_softmax(logits[row, p - 1 : n - 1].float(), dim=-1).cpu(), batch.input_ids[row, p:n].cpu()))
    return out


@dataclass(frozen=True)
class ConvSentReference:
    """What ES and DD need from the unedited model for one case: the pooled log-probability of the
    target-sentiment responses and the full next-token distributions over the next topic's responses."""

    pos_base: float
    outer_base: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def _pooled(distributions: list[tuple[torch.Tensor, torch.Tensor]], on_target: Sequence[bool], want: bool) -> float:
    picked = [lp.gather(-1, tok[:, None]).squeeze(-1) for (lp, tok), hit in zip(distributions, on_target) if hit == want]
    return float(torch.cat(picked).mean())


def convsent_reference(unedited: LogitsFn, tokenizer, pad_token_id: int, device: torch.device, probe: ConvSentProbe,
                       batch_size: int = 32) -> ConvSentReference:
    inner = _answer_distributions(unedited, tokenizer, probe.responses, pad_token_id, device, batch_size)
    outer = _answer_distributions(unedited, tokenizer, probe.outer, pad_token_id, device, batch_size)
    return ConvSentReference(_pooled(inner, probe.on_target, True), tuple(outer))


def convsent_scores_against(edited: LogitsFn, tokenizer, pad_token_id: int, device: torch.device, probe: ConvSentProbe,
                            reference: ConvSentReference, batch_size: int = 32) -> ConvSentScores:
    """ES and DD of the edited model against the unedited model's ``reference`` (see ``convsent_scores``)."""
    inner_edit = _answer_distributions(edited, tokenizer, probe.responses, pad_token_id, device, batch_size)
    pos_edit = _pooled(inner_edit, probe.on_target, True)
    neg_edit = _pooled(inner_edit, probe.on_target, False)
    z_sent = 1.0 / (1.0 + math.exp(-(pos_edit - neg_edit)))
    z_topic = min(1.0, math.exp(pos_edit - reference.pos_base))
    outer_edit = _answer_distributions(edited, tokenizer, probe.outer, pad_token_id, device, batch_size)
    kl = torch.cat([(base.exp() * (base - edit)).sum(-1) for (base, _), (edit, _) in zip(reference.outer_base, outer_edit)])
    return ConvSentScores(es=z_sent * z_topic, z_sent=z_sent, z_topic=z_topic, dd=float(kl.mean()))


def convsent_scores(edited: LogitsFn, unedited: LogitsFn, tokenizer, pad_token_id: int, device: torch.device,
                    probe: ConvSentProbe, batch_size: int = 32) -> ConvSentScores:
    """EasyEdit's ConvSent metric (``compute_sent_metric``: ``es`` and ``kl_loc_loss``) for one case.

    Token log-probabilities are pooled over all tokens of a group (``masked_mean``), as EasyEdit does.
    Two differences, both so that the numbers mean what the formula says: the log-probability of
    token t is read from the logits at t − 1 (EasyEdit's ``gather_log_probs`` reads position t), and
    question and response are joined by a space instead of LLaMA's literal " </s> ".
    """
    reference = convsent_reference(unedited, tokenizer, pad_token_id, device, probe, batch_size)
    return convsent_scores_against(edited, tokenizer, pad_token_id, device, probe, reference, batch_size)


# ES and DD as registered metrics, scored under their own protocol next to the teacher-forced proxy.
PROTOCOL_CONVSENT = "convsent_es_dd"
register_metric("es", "ES", protocol=PROTOCOL_CONVSENT, order=60,
                description="ConvSent edit success (SERAC/EasyEdit): z_sent * z_topic, likelihood-based")
register_metric("dd", "DD", protocol=PROTOCOL_CONVSENT, order=61, higher_is_better=False, in_average=False,
                description="ConvSent locality: KL(unedited || edited) per response token on the next topic (lower is better)")


class ConvSentScorer:
    """``Benchmark.extra_scorer`` for ConvSent: the unedited model's references are taken before a
    stream's edits (the editor may change weights in place), ES/DD after them."""

    protocol = PROTOCOL_CONVSENT

    def __init__(self, probes: dict[str, ConvSentProbe]) -> None:
        self.probes = probes

    def before(self, unedited: LogitsFn, lm, cases: Sequence[EditCase]) -> dict[str, ConvSentReference]:
        return {case.case_id: convsent_reference(unedited, lm.tokenizer, lm.pad_token_id, lm.device, self.probes[case.case_id])
                for case in cases}

    def after(self, edited: LogitsFn, lm, cases: Sequence[EditCase],
              references: dict[str, ConvSentReference]) -> dict[str, dict[str, float]]:
        out = {}
        for case in cases:
            scores = convsent_scores_against(edited, lm.tokenizer, lm.pad_token_id, lm.device, self.probes[case.case_id],
                                             references[case.case_id])
            out[case.case_id] = {"es": scores.es, "dd": scores.dd}
        return out
