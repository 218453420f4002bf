"""Evaluation in the wild: QAEdit's generation-based protocol ("The Mirage of Model Editing", Yang et al.,
ACL 2025; reference code ``WanliYoung/Revisit-Editing-Evaluation``, ``test_prediction_acc_real``), offline.

For every scored prompt (reliability, generality, portability and locality alike):

1. **Context.**  ``question`` (default): the bare prompt; ``qa``: the fixed instruction
   "Please answer the question:\\n\\nQ: {question}\\nA:" (the reference's ``qa_inst``, lm-eval's NQ style);
   ``chat``: the model's own chat template with the system message "You are a helpful assistant." and
   the generation prompt (EasyEdit's generation mode; the reference hard-codes Llama-2's).
2. **Decoding.**  Greedy, at most ``max_new_tokens`` (50) new tokens, through the edited model's logits
   function (``benchmarks.decoding``: a KV cache where the editor's output at a position depends only on
   its prefix, else a full re-run per step).
3. **Stopping.**  A row stops at end-of-text (the tokenizer's EOS or any other special token) or as soon as
   its generated text contains "." or a newline; the answer is the text before the first of them (so a
   trailing stop string is stripped, as the reference does, and a token that carries text past the stop,
   such as ".\\n", cannot leak it).  This is lm-eval's ``until`` rule.
4. **Metric.**  Rel/Gen/Por: SQuAD-normalized exact match (lower-case, ASCII punctuation removed, articles
   a/an/the removed, whitespace collapsed) against the gold answer or any of its aliases: 1 or 0.  Token
   F1 (SQuAD's) beside it as ``rel_f1``/``gen_f1``/``por_f1``, registered outside Avg.  An answer that
   never appears within the budget scores 0; no case is dropped.
5. **Locality.**  The locality prompt's answer after the edit is compared, as a string (after stopping,
   before normalization), with the unedited model's answer under the same settings: 1 when identical.

The reference code's judge (an LLM grading CORRECT/INCORRECT) is not used: kebench's protocol is the
deterministic exact-match fallback, which EasyEdit files under its own comparable group; it sits below
judge numbers ("Malia and Sasha are..." fails EM).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from benchmarks.case import EditCase
from benchmarks.decoding import StopFn, greedy_decode, uses_cache
from benchmarks.metrics import LogitsFn
from benchmarks.scoring import (PAPER_METRICS, CaseScores, LocalityKey, ScoredItem, ScoredModel, aggregate,
                                locality_items, scored_items)
from kebench.core.errors import KebenchError

CONTEXTS = ("question", "qa", "chat")
QA_TEMPLATE = "Please answer the question:\n\nQ: {question}\nA:"
CHAT_SYSTEM = "You are a helpful assistant."
STOP_STRINGS = (".", "\n")
F1_METRIC = {"rel": "rel_f1", "gen": "gen_f1", "por": "por_f1"}


@dataclass(frozen=True)
class WildSettings:
    """The wild protocol's named settings; a value other than its default enters the row tag and the cell id."""

    context: str = "question"
    max_new_tokens: int = 50
    #: BaFT/ReFT: intervene on the generated tokens as on the target tokens they are trained on (README)
    intervene_generated: bool = True

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {self.context!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


# --------------------------------------------------------------------------- normalization and metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals the normalized gold answer or one of its aliases."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(answer) for answer in answers))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1 between the normalized strings (both empty: 1; one empty: 0)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def best_f1(prediction: str, answers: Sequence[str]) -> float:
    return max(token_f1(prediction, answer) for answer in answers)


# --------------------------------------------------------------------------- context and stopping

def context_tokens(tokenizer, prompt: str, context: str) -> list[int]:
    """The token ids the model is given for ``prompt`` under ``context``."""
    if context == "question":
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if context == "qa":
        return list(tokenizer(QA_TEMPLATE.format(question=prompt), add_special_tokens=True)["input_ids"])
    if context == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise KebenchError("wild protocol: context chat needs a chat template and this model's tokenizer has none "
                               "(use context question or qa)")
        messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": prompt}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template without a system role raises its own error type
            raise KebenchError(f"wild protocol: the model's chat template failed: {str(exc).splitlines()[0]}") from None
        # The template writes its own BOS where the model wants one; adding special tokens would double it.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    raise KebenchError(f"wild protocol: unknown context '{context}'; known: {', '.join(CONTEXTS)}")


def end_of_text_ids(tokenizer) -> frozenset[int]:
    """Token ids that end a generation: the tokenizer's EOS and every other special token (SmolLM2 ends a
    completion with <|endoftext|> and a chat turn with <|im_end|>; neither is ever part of an answer)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(int(i) for i in ids)


def _cut(text: str) -> tuple[str, bool]:
    """The text before the first stop string, and whether there was one."""
    positions = [index for index in (text.find(stop) for stop in STOP_STRINGS) if index >= 0]
    return (text[: min(positions)], True) if positions else (text, False)


def stop_rule(tokenizer) -> StopFn:
    """The stopping rule: end-of-text, or a stop string anywhere in the generated text."""
    ends = end_of_text_ids(tokenizer)

    def finished(tokens: Sequence[int]) -> bool:
        return tokens[-1] in ends or _cut(tokenizer.decode(list(tokens), skip_special_tokens=False))[1]

    return finished


def answer_text(tokenizer, tokens: Sequence[int]) -> str:
    """The scored answer: the generated text up to end-of-text, cut before the first stop string."""
    ends = end_of_text_ids(tokenizer)
    kept = []
    for token in tokens:
        if token in ends:
            break
        kept.append(int(token))
    return _cut(tokenizer.decode(kept, skip_special_tokens=True))[0]


# --------------------------------------------------------------------------- scoring

def generate_answers(model: ScoredModel, prompts: Sequence[str], settings: WildSettings,
                     groups: Sequence[int] | None = None, decoding: str = "auto") -> list[str]:
    """The answer text for every prompt, in order; identical prompts (of one group) are decoded once."""
    tokenizer = model.tokenizer
    keys = [(prompt, None if groups is None else groups[i]) for i, prompt in enumerate(prompts)]
    unique = list(dict.fromkeys(keys))
    ids = [context_tokens(tokenizer, prompt, settings.context) for prompt, _ in unique]
    tokens = greedy_decode(model.logits_fn, ids, settings.max_new_tokens, model.pad_token_id, model.device,
                           stop=stop_rule(tokenizer), batch_size=model.batch_size,
                           groups=None if groups is None else [group for _, group in unique],
                           intervene_answer=settings.intervene_generated, decoding=decoding)
    texts = {key: answer_text(tokenizer, generated) for key, generated in zip(unique, tokens)}
    return [texts[key] for key in keys]


def wild_references(model: ScoredModel, cases: Sequence[EditCase], settings: WildSettings,
                    decoding: str = "auto") -> dict[LocalityKey, Any]:
    """The unedited model's answer text on every locality prompt of ``cases``."""
    items = locality_items(cases)
    texts = generate_answers(model, [item.prompt for item in items], settings, decoding=decoding) if items else []
    return {item.locality_key: text for item, text in zip(items, texts)}


def wild_scores(model: ScoredModel, cases: Sequence[EditCase], references: Mapping[LocalityKey, Any],
                metrics: Sequence[str] = PAPER_METRICS, settings: WildSettings = WildSettings(), tag: str = "wild",
                grouped: bool = False, decoding: str = "auto") -> list[CaseScores]:
    """Rel/Gen/Por (exact match, F1 beside), Loc (answer unchanged) per case, tagged ``tag``.

    The drill-down details hold the generated answers: ``rel_output``, ``gen_output`` (the first rephrase),
    and the first changed locality answer with the unedited one."""
    items = scored_items(cases, metrics)
    groups = [item.case_index for item in items] if grouped else None
    texts = generate_answers(model, [item.prompt for item in items], settings, groups, decoding) if items else []
    details: dict[str, dict[str, str]] = {case.case_id: {} for case in cases}
    values: list[tuple[ScoredItem, dict[str, float]]] = []
    for item, text in zip(items, texts):
        found = details[item.case_id]
        if item.metric == "loc":
            if item.locality_key not in references:
                raise KeyError(f"no pre-edit {tag} locality output for {'/'.join(map(str, item.locality_key))}")
            reference = references[item.locality_key]
            scored = {"loc": float(text == reference)}
            if text != reference and "loc_prompt" not in found:
                found.update(loc_prompt=item.prompt, loc_output=text, loc_unedited=str(reference))
        else:
            scored = {item.metric: exact_match(text, item.answers), F1_METRIC[item.metric]: best_f1(text, item.answers)}
            if item.metric in ("rel", "gen") and f"{item.metric}_output" not in found:
                found[f"{item.metric}_output"] = text
        values.append((item, scored))
    return aggregate(cases, values, tag, details)


def describe_wild(settings: WildSettings, logits_fn: LogitsFn | None = None) -> str:
    """The provenance line of a wild-scored cell: every setting and how decoding ran."""
    parts = [f"context={settings.context}", f"max_new_tokens={settings.max_new_tokens}", "greedy",
             "stop at '.', newline or end-of-text", "SQuAD-normalized exact match over the answer and its aliases "
             "(token F1 beside it, outside Avg.)", "Loc = the unrelated answer string unchanged",
             f"intervene_generated={'true' if settings.intervene_generated else 'false'}"]
    if logits_fn is not None:
        parts.append("decoding: KV cache" if uses_cache(logits_fn) else "decoding: full re-run per step "
                     "(the editor routes on the whole sequence)")
    return ", ".join(parts)
