"""Second-moment statistics C = E[k kᵀ] of the MLP down-projection inputs, computed once and cached on disk.

ROME (with ``mom2_adjustment``) and MEMIT need, per edited layer, the uncentered second moment of the
keys k, the input of ``mlp.down_proj`` (the MLP hidden activations act(gate(x)) ⊙ up(x)), over the
tokens of a text corpus (``rome/layer_stats.py`` in kmeng01/memit and EasyEdit: 100,000 Wikipedia
articles, truncated to the model's context, accumulated in ``mom2_dtype``).

Here a run forwards the corpus once through the model up to the highest requested layer (the forward
pass is cut there, as ``Trace(stop=True)`` does), accumulates Σ k kᵀ in float64 for every requested
layer at once, and stores C = Σ k kᵀ / #tokens per layer as a safetensors file under
``kebench.core.models.cache_root()/"stats"``, keyed by (model, model revision, layer, corpus, n, dtype,
model dtype):

    <cache>/stats/<model>/<revision>/<corpus>/layer<L>_n<n>_<dtype>[_model-<model dtype>].safetensors

``dtype`` is the precision the statistic is stored in (the original ``mom2_dtype``); the model dtype is
the precision the activations were computed in (a bfloat16 model's keys are not a float32 model's); it
is left out of the file name for float32 models, whose files predate it.  A second request for
the same key reads the file; ``ensure_stats`` reports which layers it computed and which it reused.

Corpora (the corpus name is part of the key and of every result row's provenance):

* ``shared-offline`` (v1): built deterministically from text under the benchmark data directory, with no
  network.  Only texts that no benchmark reports on: the WikiBio passages of
  ``knowedit/wikibio_train_all.json`` (``text`` + ``labels``; the WikiBio *test* file is an evaluation
  split), the CounterFact prompts of ``counterfact/counterfact-train.json`` with their true answers
  (edit, paraphrase and neighbourhood prompts), and the ZsRE questions of the *dev* split of
  ``zsre/zsre_mend_eval_portability_gpt4.json`` with their true answers (the test split's questions are
  the reported ones).  Each source is put in a fixed order (SHA-256 of the text), the sources are
  interleaved round-robin, and the first ``n`` texts are taken; they are packed, in order and separated
  by a blank line, into sequences of at most 256 tokens, so that short prompts do not over-represent
  the first positions of a sequence as they would one prompt per row.  ``n`` counts texts, as the
  papers' ``mom2_n_samples`` counts articles.
* ``wikipedia`` = ``hf:wikimedia/wikipedia@20231101.en`` (EasyEdit's current choice), or any
  ``hf:<dataset>[@<config>]`` with a ``text`` column, read through the optional ``datasets`` package
  (``pip install datasets``): the train split shuffled with seed 1 (``random_sample=1`` in the original),
  the first ``n`` articles, each truncated to min(model context, 4096) tokens, one article per row.

The deviation from the papers (100,000 Wikipedia articles) is recorded in every result row through
``provenance``.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from benchmarks.data import data_file, read_json, resolve_data_dir
from benchmarks.metrics import right_pad
from benchmarks.registry import split_of
from kebench.core.errors import KebenchError
from kebench.core.models import DTYPES, LoadedModel, Precision, cache_root, configure_threads, load_model, projection_shape
from methods.base import get_method

OFFLINE_CORPUS = "shared-offline"
WIKIPEDIA_ALIAS = "wikipedia"
WIKIPEDIA_DEFAULT = "hf:wikimedia/wikipedia@20231101.en"
HF_PREFIX = "hf:"
STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
PACK_TOKENS = 256  # shared-offline: texts are packed into sequences of at most this many tokens
MAX_ARTICLE_TOKENS = 4096  # hf corpora: an article is truncated to min(model context, this), as EasyEdit does
BATCH_TOKENS = 4096  # tokens per forward batch while collecting (memory, not numbers)
HF_SHUFFLE_SEED = 1

WIKIBIO_FILE = "knowedit/wikibio_train_all.json"
COUNTERFACT_FILE = "counterfact/counterfact-train.json"
ZSRE_FILE = "zsre/zsre_mend_eval_portability_gpt4.json"


# --------------------------------------------------------------------------- keys and files

@dataclass(frozen=True)
class StatsKey:
    """What a cached statistic depends on."""

    model: str
    revision: str
    layer: int
    corpus: str
    n: int
    dtype: str = "float32"
    model_dtype: str = "float32"  # the precision the model ran in while the keys were collected

    def path(self, root: Path | None = None) -> Path:
        base = root if root is not None else stats_root()
        suffix = "" if self.model_dtype == "float32" else f"_model-{self.model_dtype}"
        return (base / _slug(self.model) / _slug(self.revision) / _slug(self.corpus)
                / f"layer{self.layer}_n{self.n}_{self.dtype}{suffix}.safetensors")


def stats_root() -> Path:
    return cache_root() / "stats"


def _slug(text: str) -> str:
    """A path-safe, readable and injective-enough name: unsafe characters replaced, plus a short hash when changed."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", text)
    if safe != text:
        safe += "-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return safe


def canonical_corpus(corpus: str) -> str:
    """Validate a corpus name and return the name it is cached under (``wikipedia`` is an alias)."""
    if corpus == OFFLINE_CORPUS:
        return corpus
    if corpus == WIKIPEDIA_ALIAS:
        return WIKIPEDIA_DEFAULT
    if corpus.startswith(HF_PREFIX) and len(corpus) > len(HF_PREFIX) and not corpus.endswith("@"):
        return corpus
    raise KebenchError(
        f"unknown statistics corpus '{corpus}'; known: {OFFLINE_CORPUS}, {WIKIPEDIA_ALIAS} "
        f"(= {WIKIPEDIA_DEFAULT}), hf:<dataset>[@<config>]"
    )


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in STATS_DTYPES:
        raise KebenchError(f"unknown statistics dtype '{dtype}'; known: {', '.join(STATS_DTYPES)}")
    return STATS_DTYPES[dtype]


# --------------------------------------------------------------------------- corpora

def corpus_texts(corpus: str, n: int, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The first ``n`` texts of ``corpus``, in the corpus's fixed order."""
    if n <= 0:
        raise KebenchError(f"statistics sample size n must be positive, got {n}")
    name = canonical_corpus(corpus)
    if name == OFFLINE_CORPUS:
        pool = offline_pool(data_dir)
        if n > len(pool):
            raise KebenchError(f"corpus {OFFLINE_CORPUS} has {len(pool)} texts; n={n} is too many")
        return pool[:n]
    return _hf_texts(name, n)


def offline_pool(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Every text of ``shared-offline``, in order (see the module docstring)."""
    root = resolve_data_dir(data_dir)
    hint = "the shared benchmark data (see data/PROVENANCE.md)"
    wikibio = [f"{r['text']} {r['labels']}".strip() for r in _records(read_json(data_file(root, WIKIBIO_FILE, hint)), WIKIBIO_FILE)
               if isinstance(r.get("text"), str) and isinstance(r.get("labels"), str)]
    counterfact: list[str] = []
    for r in _records(read_json(data_file(root, COUNTERFACT_FILE, hint)), COUNTERFACT_FILE):
        for prompt_key, answer_key in (("prompt", "ground_truth"), ("rephrase_prompt", "ground_truth"),
                                       ("locality_prompt", "locality_ground_truth")):
            prompt, answer = r.get(prompt_key), r.get(answer_key)
            if isinstance(prompt, str) and isinstance(answer, str):
                counterfact.append(f"{prompt} {answer}")
    zsre: list[str] = []
    for r in _records(read_json(data_file(root, ZSRE_FILE, hint)), ZSRE_FILE):
        question, answers = r.get("src"), r.get("answers")
        if not isinstance(question, str) or split_of(question) != "dev" or not answers:
            continue  # the test split's questions are what results are reported on
        zsre.append(f"{question} {answers[0]}")
        if isinstance(r.get("rephrase"), str):
            zsre.append(f"{r['rephrase']} {answers[0]}")
    return _interleave([_hash_order(source) for source in (wikibio, counterfact, zsre)])


def _records(value: Any, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise KebenchError(f"{name}: expected a list of records, got {type(value).__name__}")
    return [r for r in value if isinstance(r, dict)]


def _hash_order(texts: Iterable[str]) -> list[str]:
    unique = {text for text in texts if text.strip()}
    return sorted(unique, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())


def _interleave(sources: Sequence[list[str]]) -> list[str]:
    out, seen = [], set()
    for index in range(max(len(s) for s in sources)):
        for source in sources:
            if index < len(source) and source[index] not in seen:
                seen.add(source[index])
                out.append(source[index])
    return out


def _hf_texts(name: str, n: int) -> list[str]:
    try:
        import datasets  # an optional dependency: only users with a network have it
    except ImportError:
        raise KebenchError(
            f"statistics corpus '{name}' is read through the datasets package, which is not installed: "
            f"pip install datasets (or use the offline corpus '{OFFLINE_CORPUS}')"
        ) from None
    path, _, config = name[len(HF_PREFIX):].partition("@")
    try:
        dataset = datasets.load_dataset(path, config or None, split="train")
    except Exception as exc:  # network, unknown name or snapshot: one line naming them
        raise KebenchError(f"cannot load statistics corpus '{name}' through datasets: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if n > len(dataset):
        raise KebenchError(f"corpus {name} has {len(dataset)} articles; n={n} is too many")
    chosen = dataset.shuffle(seed=HF_SHUFFLE_SEED).select(range(n))
    return [str(row["text"]) for row in chosen]


def _sequences(lm: LoadedModel, corpus: str, texts: Sequence[str]) -> list[list[int]]:
    """Token rows to forward: packed for the offline corpus, one truncated article per row otherwise."""
    tok = lm.tokenizer
    context = int(getattr(lm.model.config, "max_position_embeddings", MAX_ARTICLE_TOKENS) or MAX_ARTICLE_TOKENS)
    if canonical_corpus(corpus) != OFFLINE_CORPUS:
        limit = min(context, MAX_ARTICLE_TOKENS)
        return [tok(text, add_special_tokens=True, truncation=True, max_length=limit)["input_ids"] for text in texts]
    limit = min(context, PACK_TOKENS)
    sep = "\n\n"
    rows, current, current_len = [], [], 0
    for text in texts:
        length = len(tok(sep + text, add_special_tokens=False)["input_ids"])
        if current and current_len + length > limit:
            rows.append(sep.join(current))
            current, current_len = [], 0
        current.append(text)
        current_len += length
    if current:
        rows.append(sep.join(current))
    return [tok(row, add_special_tokens=True, truncation=True, max_length=limit)["input_ids"] for row in rows]


def corpus_fingerprint(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


# --------------------------------------------------------------------------- collection

class _Stop(Exception):
    """Raised by a hook after the highest requested layer: nothing above it is needed."""


def down_proj(lm: LoadedModel, layer: int) -> torch.nn.Module:
    """The MLP down-projection of decoder layer ``layer``, found by the model's architecture
    (``mlp.down_proj`` on LLaMA-style models, the ``Conv1D`` ``mlp.c_proj`` on GPT-2)."""
    return lm.down_proj(layer)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Collected:
    """Σ k kᵀ (float64) and the token count, per layer."""

    sums: dict[int, torch.Tensor]
    tokens: int = 0
    seconds: float = 0.0
    fingerprint: str = ""
    texts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def collect_second_moments(lm: LoadedModel, layers: Sequence[int], corpus: str, n: int,
                           data_dir: str | os.PathLike[str] | None = None) -> Collected:
    """One forward pass over the corpus, cut after the highest layer; Σ k kᵀ over real tokens per layer."""
    started = time.perf_counter()
    layers = sorted(set(layers))
    modules = {layer: down_proj(lm, layer) for layer in layers}
    texts = corpus_texts(corpus, n, data_dir)
    rows = _sequences(lm, corpus, texts)
    width = projection_shape(modules[layers[0]])[1]
    sums = {layer: torch.zeros(width, width, dtype=torch.float64, device=lm.device) for layer in layers}
    mask_holder: dict[str, torch.Tensor] = {}
    tokens = 0

    def pre_hook(layer: int):
        def hook(module, args):
            keys = args[0][mask_holder["mask"]].float()  # [tokens, width]
            # One batch's Σ k kᵀ in float32 (as the original accumulates in mom2_dtype), summed over
            # batches in float64: fast, and the running sum does not lose precision as tokens accumulate.
            sums[layer] += (keys.T @ keys).to(torch.float64)
        return hook

    def stop_hook(module, args, output):
        raise _Stop

    handles = [modules[layer].register_forward_pre_hook(pre_hook(layer)) for layer in layers]
    handles.append(lm.layers[layers[-1]].register_forward_hook(stop_hook))
    pad = lm.pad_token_id
    try:
        with torch.no_grad():
            for batch in _batches(rows, BATCH_TOKENS):
                ids, attention = right_pad(batch, pad)
                ids, attention = ids.to(lm.device), attention.to(lm.device)
                mask_holder["mask"] = attention.bool()
                tokens += int(attention.sum())
                try:
                    lm.backbone(input_ids=ids, attention_mask=attention, use_cache=False)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    for layer, total in sums.items():
        if not torch.isfinite(total).all():
            raise KebenchError(f"second-moment statistics of layer {layer} are not finite ({lm.name}, corpus {corpus})")
    return Collected(sums, tokens, time.perf_counter() - started, corpus_fingerprint(texts), len(texts))


def _batches(rows: Sequence[list[int]], budget: int) -> Iterable[list[list[int]]]:
    """Consecutive rows, as many per batch as fit in ``budget`` padded tokens (at least one)."""
    batch: list[list[int]] = []
    longest = 0
    for row in rows:
        if batch and max(longest, len(row)) * (len(batch) + 1) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(row)
        longest = max(longest, len(row))
    if batch:
        yield batch


# --------------------------------------------------------------------------- the cache

@dataclass(frozen=True)
class StatsOutcome:
    """What ``ensure_stats`` did for one layer."""

    layer: int
    path: Path
    computed: bool
    tokens: int
    seconds: float


def ensure_stats(lm: LoadedModel, layers: Sequence[int], corpus: str, n: int, dtype: str = "float32",
                 root: Path | None = None, data_dir: str | os.PathLike[str] | None = None,
                 force: bool = False) -> list[StatsOutcome]:
    """Make sure C is cached for every layer; the missing ones are computed together in one pass."""
    check_dtype(dtype)
    name = canonical_corpus(corpus)
    keys = {layer: StatsKey(lm.name, lm.info.revision, layer, name, n, dtype, _dtype_name(lm.dtype))
            for layer in sorted(set(layers))}
    for layer in keys:
        down_proj(lm, layer)
    missing = [layer for layer, key in keys.items() if force or not key.path(root).is_file()]
    outcomes: dict[int, StatsOutcome] = {}
    if missing:
        collected = collect_second_moments(lm, missing, name, n, data_dir)
        if collected.tokens == 0:
            raise KebenchError(f"corpus {name} gave no tokens for n={n}")
        for layer in missing:
            path = keys[layer].path(root)
            _write(path, collected.sums[layer] / collected.tokens, keys[layer], lm, collected)
            outcomes[layer] = StatsOutcome(layer, path, True, collected.tokens, collected.seconds)
    for layer, key in keys.items():
        if layer not in outcomes:
            meta = read_metadata(key.path(root))
            outcomes[layer] = StatsOutcome(layer, key.path(root), False, int(meta.get("tokens", 0)), 0.0)
    return [outcomes[layer] for layer in keys]


def _write(path: Path, moment: torch.Tensor, key: StatsKey, lm: LoadedModel, collected: Collected) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "model": key.model, "revision": key.revision, "layer": str(key.layer), "corpus": key.corpus, "n": str(key.n),
        "dtype": key.dtype, "model_dtype": str(lm.dtype).replace("torch.", ""), "tokens": str(collected.tokens),
        "texts": str(collected.texts), "corpus_sha256": collected.fingerprint, "seconds": f"{collected.seconds:.2f}",
        "statistic": "E[k k^T] of mlp.down_proj inputs over tokens",
    }
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    save_file({"mom2": moment.to(STATS_DTYPES[key.dtype]).contiguous().cpu()}, str(partial), metadata=metadata)
    os.replace(partial, path)  # atomic: concurrent writers of the same key leave one whole file


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


@lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int) -> torch.Tensor:
    return load_file(path)["mom2"]


def second_moment(lm: LoadedModel, layer: int, corpus: str, n: int, dtype: str = "float32",
                  root: Path | None = None, data_dir: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """C for one layer on ``lm.device`` in the stored dtype, computed first if it is not cached."""
    (outcome,) = ensure_stats(lm, [layer], corpus, n, dtype, root, data_dir)
    tensor = _load(str(outcome.path), outcome.path.stat().st_mtime_ns)
    return tensor.to(lm.device)


# --------------------------------------------------------------------------- grids: what cells need

@dataclass(frozen=True)
class StatsNeed:
    """Statistics an editor will read: these layers of its model on ``corpus`` with ``n`` texts."""

    layers: tuple[int, ...]
    corpus: str
    n: int
    dtype: str = "float32"


@dataclass(frozen=True)
class StatsJob:
    """Missing statistics of one model, computed together in one pass (one Ray task)."""

    model: str
    layers: tuple[int, ...]
    corpus: str
    n: int
    dtype: str
    model_dtype: str = "float32"  # the precision the model is loaded in to collect them

    @property
    def title(self) -> str:
        on = "" if self.model_dtype == "float32" else f" (model in {self.model_dtype})"
        return (f"statistics {self.model} layers {','.join(map(str, self.layers))} {self.corpus} n={self.n} "
                f"{self.dtype}{on}")


def needs_of(method: str, hparams: Any) -> list[StatsNeed]:
    """The statistics a method's editor will read with these hyperparameters (its ``Editor.requirements``)."""
    return [need for need in get_method(method).requirements(hparams) if isinstance(need, StatsNeed)]


def missing_jobs(cells: Iterable[Any], root: Path | None = None) -> list[StatsJob]:
    """The statistics that the cells need and the cache lacks, grouped per (model, corpus, n, dtype, model dtype).

    ``cells`` are ``orchestrator.grid.Cell``s (model, model_revision, method, hparams_object(), dtype).
    """
    wanted: dict[tuple[str, str, int, str, str], set[int]] = {}
    for cell in cells:
        model_dtype = Precision.parse(getattr(cell, "dtype", "") or "float32").model
        for need in needs_of(cell.method, cell.hparams_object()):
            corpus = canonical_corpus(need.corpus)
            for layer in need.layers:
                key = StatsKey(cell.model, cell.model_revision, layer, corpus, need.n, need.dtype, model_dtype)
                if not key.path(root).is_file():
                    wanted.setdefault((cell.model, corpus, need.n, need.dtype, model_dtype), set()).add(layer)
    return [StatsJob(model, tuple(sorted(layers)), corpus, n, dtype, model_dtype)
            for (model, corpus, n, dtype, model_dtype), layers in sorted(wanted.items())]


def run_job(job: StatsJob, data_dir: str | None = None) -> list[dict[str, Any]]:
    """Load the job's model and compute its statistics (the body of the grid's pre-pass Ray task)."""
    configure_threads()
    lm = load_model(job.model, dtype=DTYPES[job.model_dtype])
    outcomes = ensure_stats(lm, job.layers, job.corpus, job.n, job.dtype, data_dir=data_dir)
    return [{"layer": o.layer, "path": str(o.path), "computed": o.computed, "tokens": o.tokens, "seconds": o.seconds}
            for o in outcomes]


def provenance_note(need: StatsNeed) -> str:
    """One line for result rows: which corpus and how many texts the statistics came from."""
    return (f"mom2 statistics: corpus {canonical_corpus(need.corpus)}, n={need.n} texts, {need.dtype}, "
            f"layers {','.join(map(str, need.layers))} (the ROME/MEMIT papers: 100,000 Wikipedia articles)")
