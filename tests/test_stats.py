"""Second-moment statistics: the definition, the on-disk cache, corpora, and the grid's pre-pass helpers."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

import methods.stats as stats
from methods.stats import (OFFLINE_CORPUS, StatsKey, StatsNeed, canonical_corpus, corpus_texts, ensure_stats,
                            missing_jobs, offline_pool, read_metadata, run_job, second_moment)
from kebench.core.errors import KebenchError


class _Counter:
    """Wraps ``collect_second_moments`` to count the corpus passes."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = stats.collect_second_moments

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(stats, "collect_second_moments", counted)


@pytest.mark.needs_data("shared-offline")
def test_offline_corpus_is_fixed_and_never_holds_reported_texts():
    from benchmarks.registry import select_cases

    pool = offline_pool()
    assert pool == offline_pool() and len(pool) == len(set(pool)) > 1000
    assert pool[0].startswith("This is a Wikipedia passage")  # sources interleaved: WikiBio, CounterFact, ZsRE
    assert corpus_texts(OFFLINE_CORPUS, 7) == pool[:7]
    reported = [case.prompt for case in select_cases("zsre", "test").cases]
    joined = "\n".join(pool)
    assert not any(prompt in joined for prompt in reported[:200])  # the ZsRE test questions stay out
    dev = select_cases("zsre", "dev", n=5).cases
    assert all(case.prompt in joined for case in dev)


@pytest.mark.needs_data("shared-offline")
def test_moment_is_the_mean_outer_product_of_down_proj_inputs(tiny_lm, tmp_path: Path):
    n = 12
    (outcome,) = ensure_stats(tiny_lm, [1], OFFLINE_CORPUS, n, root=tmp_path)
    moment = second_moment(tiny_lm, 1, OFFLINE_CORPUS, n, root=tmp_path).double()
    # Recompute from the definition: every real token's down_proj input, one row at a time.
    keys = []
    handle = tiny_lm.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: keys.append(a[0][0].double()))
    try:
        with torch.no_grad():
            for row in stats._sequences(tiny_lm, OFFLINE_CORPUS, corpus_texts(OFFLINE_CORPUS, n)):
                tiny_lm.model(input_ids=torch.tensor([row]))
    finally:
        handle.remove()
    k = torch.cat(keys)
    assert outcome.tokens == k.shape[0]
    torch.testing.assert_close(moment, k.T @ k / k.shape[0], rtol=1e-5, atol=1e-6)
    assert read_metadata(outcome.path)["corpus"] == OFFLINE_CORPUS


@pytest.mark.needs_data("shared-offline")
def test_cache_is_keyed_and_reused(tiny_lm, tmp_path: Path, monkeypatch):
    counter = _Counter(monkeypatch)
    first = ensure_stats(tiny_lm, [0, 1], OFFLINE_CORPUS, 10, root=tmp_path)
    assert [o.computed for o in first] == [True, True] and counter.calls == 1  # both layers in one pass
    mtimes = [o.path.stat().st_mtime_ns for o in first]
    again = ensure_stats(tiny_lm, [0, 1], OFFLINE_CORPUS, 10, root=tmp_path)
    assert [o.computed for o in again] == [False, False] and counter.calls == 1
    assert [o.path.stat().st_mtime_ns for o in again] == mtimes
    other_n = ensure_stats(tiny_lm, [0], OFFLINE_CORPUS, 11, root=tmp_path)
    assert other_n[0].computed and other_n[0].path != first[0].path and counter.calls == 2
    other_dtype = ensure_stats(tiny_lm, [0], OFFLINE_CORPUS, 10, "float64", root=tmp_path)
    assert other_dtype[0].computed and other_dtype[0].path != first[0].path
    key = StatsKey(tiny_lm.name, tiny_lm.info.revision, 0, OFFLINE_CORPUS, 10)
    assert key.path(tmp_path) == first[0].path and f"/{tiny_lm.info.revision}/" in str(first[0].path)
    forced = ensure_stats(tiny_lm, [0], OFFLINE_CORPUS, 10, root=tmp_path, force=True)
    assert forced[0].computed and counter.calls == 4


def test_hf_corpora_go_through_datasets(tiny_lm, tmp_path: Path, monkeypatch):
    seen = {}

    class FakeSplit:
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def shuffle(self, seed):
            seen["seed"] = seed
            return FakeSplit(self.rows[::-1])

        def select(self, indices):
            return [self.rows[i] for i in indices]

    def load_dataset(path, config, split):
        seen.update(path=path, config=config, split=split)
        return FakeSplit([{"text": f"Article number {i} is about a town."} for i in range(5)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert canonical_corpus("wikipedia") == "hf:wikimedia/wikipedia@20231101.en"
    texts = corpus_texts("wikipedia", 2)
    assert seen == {"path": "wikimedia/wikipedia", "config": "20231101.en", "split": "train", "seed": 1}
    assert texts == ["Article number 4 is about a town.", "Article number 3 is about a town."]
    (outcome,) = ensure_stats(tiny_lm, [0], "hf:someone/corpus@v2", 3, root=tmp_path)
    assert outcome.computed and "hf_someone_corpus_v2" in str(outcome.path)
    assert seen["path"] == "someone/corpus" and seen["config"] == "v2"


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(KebenchError, match="pip install datasets"):
        corpus_texts("wikipedia", 10)


@pytest.mark.parametrize("call, message", [
    (lambda lm: corpus_texts("my-corpus", 5), "unknown statistics corpus 'my-corpus'"),
    pytest.param(lambda lm: corpus_texts(OFFLINE_CORPUS, 10**7), "n=10000000 is too many",
                 marks=pytest.mark.needs_data(OFFLINE_CORPUS)),
    (lambda lm: ensure_stats(lm, [7], OFFLINE_CORPUS, 5), "layer 7 is out of range"),
    (lambda lm: ensure_stats(lm, [0], OFFLINE_CORPUS, 5, "int8"), "unknown statistics dtype 'int8'"),
])
def test_bad_requests_are_one_line_errors(tiny_lm, call, message):
    with pytest.raises(KebenchError, match=message):
        call(tiny_lm)


@pytest.mark.needs_data("shared-offline")
def test_grid_prepass_finds_missing_statistics_and_computes_them(tiny_lm, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path))
    from orchestrator.grid import expand, parse_grid

    grid = parse_grid({"name": "s", "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "n": 2}],
                       "scenarios": [{"kind": "single"}],
                       "methods": [{"name": "memit", "hparams": {"layers": [1], "mom2_n_samples": 9}},
                                   {"name": "rome", "hparams": {"mom2_adjustment": False}}, {"name": "reft"}]},
                      "test")
    cells = expand(grid)
    (job,) = missing_jobs(cells)  # ROME without the adjustment and ReFT need none
    assert (job.model, job.layers, job.corpus, job.n) == ("tiny-random-llama", (1,), OFFLINE_CORPUS, 9)
    results = run_job(job)
    assert results[0]["computed"] and Path(results[0]["path"]).is_file()
    assert missing_jobs(cells) == []
    from methods.base import get_method

    note = get_method("memit").provenance(cells[0].hparams_object())
    assert "shared-offline" in note and "n=9" in note and "100,000 Wikipedia" in note
    assert (StatsNeed((1,), OFFLINE_CORPUS, 9),) == get_method("memit").requirements(cells[0].hparams_object())


@pytest.mark.needs_data("shared-offline")
@pytest.mark.integration
def test_smollm2_statistics_are_computed_once_and_reused(smol_lm, tmp_path: Path, monkeypatch):
    from methods.hparams import load_hparams

    hp = load_hparams("memit", "smollm2-135m", "single")
    layers = hp.layers[:1]  # the pass runs up to the highest layer asked for: one layer is the shortest
    counter = _Counter(monkeypatch)
    first = ensure_stats(smol_lm, layers, hp.mom2_corpus, hp.mom2_n_samples, hp.mom2_dtype, root=tmp_path)
    assert all(o.computed for o in first) and counter.calls == 1
    assert first[0].tokens > 2 * smol_lm.model.config.intermediate_size  # enough tokens for a full-rank C
    second = ensure_stats(smol_lm, layers, hp.mom2_corpus, hp.mom2_n_samples, hp.mom2_dtype, root=tmp_path)
    assert not any(o.computed for o in second) and counter.calls == 1  # the second run does not recompute
    moment = second_moment(smol_lm, hp.layers[0], hp.mom2_corpus, hp.mom2_n_samples, hp.mom2_dtype, root=tmp_path)
    assert moment.shape == (1536, 1536) and counter.calls == 1
    assert torch.linalg.eigvalsh(moment.double()).min() > 0  # positive definite: MEMIT's solve is well posed


@pytest.mark.needs_data("shared-offline")
def test_stats_command_computes_then_reuses(tmp_path: Path, monkeypatch, capsys):
    from orchestrator.cli import main

    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path))
    argv = ["stats", "--model", "tiny-random-llama", "--layers", "1,0", "--corpus", OFFLINE_CORPUS, "--n", "6"]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in first] == ["layer 0", "layer 1"] and all("computed" in l for l in first)
    assert main(argv) == 0
    assert all("cached" in line for line in capsys.readouterr().out.splitlines())
    assert main(["stats", "--model", "tiny-random-llama", "--layers", "0,x", "--n", "6"]) == 2
    assert "--layers" in capsys.readouterr().err
