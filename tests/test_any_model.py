"""Any Hugging Face causal LM (issue 14): ``hf:``/``path:`` model specs, pinned revisions, derived
hyperparameters and the precision policy, tested for real on small checkpoints of two other
architectures (a 2-layer Qwen2 and a 2-layer GPT-2, seeded random weights saved with ``save_pretrained``).
Nothing here needs the Hub: the ``hf:`` tests run with ``HF_HUB_OFFLINE=1`` and an empty ``HF_HOME``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TOY_CASES
from kebench.core.errors import KebenchError
from kebench.core.models import (GPT2_STYLE, LLAMA_STYLE, Precision, PrecisionIsland, byte_tokenizer, load_model,
                                  model_facts, model_revision, parse_model_spec, projection_weight, resolve_precision,
                                  with_precision)
from methods.base import get_method, method_names
from methods.hparams import hparams_origin, hparams_path, load_hparams
from orchestrator.scenarios import Scenario, run_scenario

ROOT = Path(__file__).resolve().parents[1]
TINY_SEED = 7


def save_tiny(folder: Path, kind: str, seed: int = TINY_SEED) -> Path:
    """A 2-layer, d=64 ``qwen2`` or ``gpt2`` checkpoint with the byte tokenizer, saved like any HF model."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tokenizer = byte_tokenizer()
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    if kind == "qwen2":
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=False, **ids)
        model_class = Qwen2ForCausalLM
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids)
        model_class = GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: save_tiny(root / kind, kind) for kind in ("qwen2", "gpt2")}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {kind: load_model(f"path:{folder}", device="cpu") for kind, folder in checkpoints.items()}


# --------------------------------------------------------------------------- specs and revisions

def test_spec_syntax_and_errors(tmp_path: Path) -> None:
    assert parse_model_spec("tiny-random-llama").kind == "registered"
    spec = parse_model_spec("hf:Qwen/Qwen2-0.5B@v1.0")
    assert (spec.kind, spec.repo, spec.revision) == ("hf", "Qwen/Qwen2-0.5B", "v1.0")
    for bad, message in (("hf:", "expected hf:<repo id>"), ("hf:a/b@", "expected hf:<repo id>"),
                         (f"path:{tmp_path}", "is not a folder with a config.json"), ("gpt-9", "unknown model 'gpt-9'")):
        with pytest.raises(KebenchError, match=message):
            parse_model_spec(bad)


def test_architecture_found_by_type_not_by_name(loaded) -> None:
    qwen, gpt2 = loaded["qwen2"], loaded["gpt2"]
    assert qwen.architecture is LLAMA_STYLE and gpt2.architecture is GPT2_STYLE
    assert gpt2.backbone is gpt2.model.transformer and qwen.backbone is qwen.model.model
    assert gpt2.down_proj(1) is gpt2.model.transformer.h[1].mlp.c_proj
    assert gpt2.lm_head is gpt2.model.lm_head and gpt2.final_norm is gpt2.model.transformer.ln_f
    assert (gpt2.num_layers, gpt2.hidden_size, gpt2.activation) == (2, 64, "gelu_new")
    assert projection_weight(gpt2.down_proj(0)).shape == (64, 256)  # [out, in] although Conv1D stores [in, out]
    with torch.no_grad():  # the backbone + head reproduce the model's logits
        ids = torch.tensor([[5, 6, 7, 8]])
        for lm in loaded.values():
            assert torch.equal(lm.lm_head(lm.backbone(input_ids=ids).last_hidden_state), lm.model(input_ids=ids).logits)


def test_folder_revision_is_a_content_hash(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", "gpt2")
    first = model_revision(f"path:{folder}")
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 32
    copy = shutil.copytree(folder, tmp_path / "elsewhere")
    assert model_revision(f"path:{copy}") == first  # the content, not the place
    save_tiny(folder, "gpt2", seed=TINY_SEED + 1)  # new weights in the same folder
    assert model_revision(f"path:{folder}") != first
    assert model_facts(f"path:{folder}").model_type == "gpt2"


def test_registered_hub_models_are_pinned_to_a_commit() -> None:
    for name in ("llama2-7b", "llama2-7b-chat", "llama3-8b-instruct", "gemma-1.1-7b-it"):
        repo, _, commit = model_revision(name).partition("@")
        assert "/" in repo and len(commit) == 40 and int(commit, 16) >= 0


def test_hf_spec_offline_without_a_cache_fails_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "edit", "--model", "hf:HuggingFaceTB/SmolLM2-135M",
                           "--n", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "HuggingFaceTB/SmolLM2-135M" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


@pytest.mark.slow  # 25 s: `make test-slow`
def test_hf_spec_resolves_from_an_offline_cache(tmp_path: Path, monkeypatch) -> None:
    """A snapshot in the cache layout (refs/main → snapshots/<sha>) resolves offline to its commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf" / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / commit
    save_tiny(snapshot, "qwen2")
    (cache / "models--someone--tiny" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert model_revision("hf:someone/tiny") == f"someone/tiny@{commit}"
    assert model_facts("hf:someone/tiny").num_layers == 2
    lm = load_model("hf:someone/tiny", device="cpu")
    assert lm.info.revision == f"someone/tiny@{commit}" and lm.architecture is LLAMA_STYLE


# --------------------------------------------------------------------------- derived hyperparameters

#: (method, model) pairs whose shipped YAML the depth rule does not reproduce (chosen by hand there)
RULE_EXCEPTIONS = {("grace", "gemma-1.1-7b-it"), ("wise", "llama3-8b-instruct"), ("wise-light", "llama3-8b-instruct")}


#: the built-in methods whose class gives a depth rule (``Editor.layer_rule``)
RULED_METHODS = ("alphaedit", "baft", "ft-l", "ft-m", "grace", "melo", "memit", "reft", "rome", "wise", "wise-light")


def test_every_depth_rule_is_checked() -> None:
    ruled = {name for name in method_names() if get_method(name).__module__.startswith("methods.")
             and get_method(name).layer_rule(30) is not None}
    assert ruled == set(RULED_METHODS)


@pytest.mark.parametrize("method", RULED_METHODS)
def test_depth_rules_reproduce_the_shipped_yamls(method: str) -> None:
    """Each rule is the relative-depth rule of the method's YAMLs for the real models (not the 2-layer test model)."""
    checked = 0
    for model in ("smollm2-135m", "llama2-7b", "llama2-7b-chat", "llama3-8b-instruct", "gemma-1.1-7b-it"):
        if (method, model) in RULE_EXCEPTIONS or not hparams_path(method, model).is_file():
            continue
        shipped = yaml.safe_load(hparams_path(method, model).read_text())
        derived = get_method(method).layer_rule(model_facts(model).num_layers)
        assert {k: shipped[k] for k in derived} == derived, (method, model)
        checked += 1
    assert checked >= 3


def test_derived_hparams_for_a_folder(checkpoints) -> None:
    model = f"path:{checkpoints['gpt2']}"
    origin = hparams_origin("rome", model)
    assert origin.path == hparams_path("rome", "tiny-random-llama")  # nearest in width and depth
    assert "derived from" in origin.describe("rome") and "layers=[0]" in origin.describe("rome")
    assert load_hparams("memit", model).layers == (0,)
    assert load_hparams("melo", model).router_module == "mlp.c_fc"  # LLaMA names in GPT-2's naming
    assert load_hparams("lora", model).target_modules == ("c_attn",)
    assert load_hparams("baft", f"path:{checkpoints['qwen2']}").layers == (1,)


def test_kebench_hparams_prints_what_would_be_used(checkpoints, capsys) -> None:
    from orchestrator.cli import main

    assert main(["hparams", "--method", "grace", "--model", f"path:{checkpoints['gpt2']}", "--set", "n_iter=3"]) == 0
    out = capsys.readouterr().out
    assert "# hparams: derived from" in out and "tiny-random-llama.yaml" in out
    values = yaml.safe_load(out)
    assert values["module"] == "mlp.c_proj" and values["n_iter"] == 3 and values["layer"] == 1


# --------------------------------------------------------------------------- every method on both architectures

@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_rome_maps_the_key_to_the_value(loaded, kind: str) -> None:
    """The rank-one update is written in the right layout (GPT-2's Conv1D stores W transposed)."""
    lm = loaded[kind]
    editor = get_method("rome")(lm, load_hparams("rome", lm.name, "single"), seed=0)
    try:
        editor.apply([TOY_CASES[0]])
        (layer, (k_star, v_star)), = editor.last_edit.items()
        with torch.no_grad():
            out = lm.down_proj(layer)(k_star[None].to(lm.dtype))[0].float()
        assert torch.allclose(out, v_star, atol=1e-3, rtol=1e-3)
    finally:
        editor.restore()


#: fewer optimisation steps than the derived (test-model) values, so 28 cells stay within the test timeout
CHEAP = {"baft": {"max_steps": 8}, "reft": {"max_steps": 8}, "ft-l": {"max_steps": 5}, "ft-m": {"max_steps": 5},
         "grace": {"n_iter": 5}, "lora": {"max_steps": 5}, "melo": {"num_iter": 5}, "memit": {"v_num_grad_steps": 5},
         "alphaedit": {"v_num_grad_steps": 5},
         "rome": {"v_num_grad_steps": 5}, "wise": {"n_iter": 5, "context_lengths": []},
         "wise-light": {"n_iter": 5, "context_lengths": []}}


@pytest.mark.needs_data("shared-offline")
@pytest.mark.timeout(1800)
def test_grid_runs_every_method_on_both_folders(checkpoints, tmp_path: Path) -> None:
    """The issue's acceptance test: every method, single editing, 2 cases, rows carry the content hash."""
    from orchestrator.grid import expand, parse_grid
    from orchestrator.cell import ModelCache, execute_cell

    models = [f"path:{checkpoints['qwen2']}", f"path:{checkpoints['gpt2']}"]
    shipped = [m for m in method_names() if get_method(m).__module__.startswith("methods.")]  # not test plug-ins
    methods = [{"name": m, "hparams": CHEAP.get(m, {})} for m in shipped]
    grid = parse_grid({"name": "any-model", "models": models, "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
                       "scenarios": [{"kind": "single"}], "methods": methods}, "any-model.yaml")
    cells = expand(grid)
    assert len(cells) == 2 * len(methods)
    cache = ModelCache()
    failures = []
    for cell in cells:
        outcome = execute_cell(cell, 1, cache)
        row = outcome.cell_row
        assert row["provenance"].startswith(f"model {model_revision(cell.model)}")
        assert row["hardware"]["threads"] == torch.get_num_threads()  # CPU numbers depend on it (issue 30)
        assert cell.model_revision == model_revision(cell.model) and cell.model_revision.startswith("sha256:")
        if row["status"] != "ok":
            failures.append((cell.title, row["error"]))
        else:
            assert outcome.case_rows and row["dtype"] == "float32"
            assert "derived from" in row["provenance"] or cell.method == "unedited"
    assert not failures, failures
    assert cache.loads == 2  # one load per model


def test_changing_a_weight_file_changes_the_cell_id(tmp_path: Path) -> None:
    from orchestrator.grid import expand, parse_grid

    folder = save_tiny(tmp_path / "m", "qwen2")
    spec = {"name": "g", "models": [f"path:{folder}"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
            "scenarios": [{"kind": "single"}], "methods": ["rome"]}
    before = expand(parse_grid(spec, "g.yaml"))[0].cell_id
    assert expand(parse_grid(spec, "g.yaml"))[0].cell_id == before
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert expand(parse_grid(spec, "g.yaml"))[0].cell_id != before


# --------------------------------------------------------------------------- precision

def test_precision_policy() -> None:
    assert resolve_precision("auto", True, "bfloat16", accelerator=False) == Precision("float32")
    assert resolve_precision("auto", True, "float32", accelerator=True) == Precision("float32")
    assert resolve_precision("auto", True, "float16", accelerator=True).key == "bfloat16+float32-edits"
    assert resolve_precision("auto", False, "bfloat16", accelerator=True).key == "bfloat16"
    assert resolve_precision("bfloat16", True, "float32", accelerator=False).key == "bfloat16"
    assert Precision.parse("bfloat16+float32-edits") == Precision("bfloat16", "float32")
    with pytest.raises(KebenchError, match="dtype must be one of"):
        resolve_precision("fp8", True, None, False)


def test_dtype_enters_the_cell_id_only_when_not_float32(tmp_path: Path) -> None:
    from orchestrator.grid import expand, parse_grid

    base = {"name": "g", "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
            "scenarios": [{"kind": "single"}]}
    plain = expand(parse_grid({**base, "methods": ["rome"]}, "g.yaml"))[0]
    assert "dtype" not in plain.identity()
    explicit = expand(parse_grid({**base, "dtype": "float32", "methods": ["rome"]}, "g.yaml"))[0]
    assert explicit.cell_id == plain.cell_id  # auto on a CPU grid is float32: old cells keep their ids
    both = expand(parse_grid({**base, "methods": ["rome", {"name": "rome", "label": "rome-bf16", "dtype": "bfloat16"}]},
                             "g.yaml"))
    assert both[1].identity()["dtype"] == "bfloat16" and both[1].cell_id != both[0].cell_id
    gpu = expand(parse_grid({**base, "resources": {"num_gpus": 1}, "models": ["llama2-7b"],
                             "methods": ["rome", "grace"]}, "g.yaml")) if _has_data() else []
    if gpu:
        assert [c.dtype for c in gpu] == ["bfloat16+float32-edits", "bfloat16"]
    with pytest.raises(KebenchError, match=r"g.yaml: dtype must be one of float32, bfloat16, float16, auto"):
        parse_grid({**base, "dtype": "fp8", "methods": ["rome"]}, "g.yaml")


def _has_data() -> bool:
    from benchmarks.data import resolve_data_dir

    try:
        resolve_data_dir()
        return True
    except KebenchError:
        return False


def test_stats_key_carries_the_model_dtype(tmp_path: Path) -> None:
    from methods.stats import StatsKey

    assert StatsKey("m", "r", 3, "c", 10).path(tmp_path).name == "layer3_n10_float32.safetensors"  # as before
    assert StatsKey("m", "r", 3, "c", 10, "float32", "bfloat16").path(tmp_path).name == \
        "layer3_n10_float32_model-bfloat16.safetensors"


@pytest.mark.parametrize("method", ["rome", "ft-l"])
def test_float32_island_in_a_bfloat16_model_restores_exactly(checkpoints, method: str) -> None:
    """Under dtype auto on a half model, ROME/FT edit float32 copies of their layers and restore bit for bit."""
    lm16 = load_model(f"path:{checkpoints['gpt2']}", device="cpu", dtype=torch.bfloat16)
    lm = with_precision(lm16, Precision("bfloat16", "float32"))
    hparams = load_hparams(method, lm.name, "single")
    result = run_scenario(lm, method, hparams, list(TOY_CASES), Scenario("single"), seed=0)  # checks the restore
    assert len(result.cases) == 2
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    island = PrecisionIsland(lm, [lm.down_proj(0)], method)
    assert lm.down_proj(0).weight.dtype == torch.float32
    island.close()
    assert lm.down_proj(0).weight.dtype == torch.bfloat16
