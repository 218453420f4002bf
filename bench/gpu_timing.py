"""Seconds per edit of BaFT, ROME and MEMIT on a randomly initialised LLaMA-2-7B-shaped model, on a GPU.

The timing of an edit depends on the model's shape, the precision and the method's hyperparameters, not on
what the weights have learned, so no 13 GB download is needed: the model is ``transformers.LlamaConfig``'s
LLaMA-2-7B shape (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocabulary 32000) with random weights
made on the device, in bfloat16, and each method runs with its ``llama2-7b`` YAML under ``dtype: auto`` (as a
grid on that model runs: bfloat16, with ROME's and MEMIT's edited modules in float32).  ROME's and MEMIT's
second-moment statistics are a synthetic positive-definite matrix of the right size (their values do not
change the time of an edit; computing real ones is a one-time ``kebench stats`` pass, not part of an edit).
Tokens come from kebench's byte-level tokenizer (ids < 259 are valid rows of the 32000-row embedding).

The cases are ZsRE test cases (single editing); the first edit warms up allocator and kernels and is not
timed; each edit is bracketed by ``torch.cuda.synchronize()``.  The JSON is what ``kebench plan --edit-speed
FILE`` reads (``bench/edit_speed.py --json``'s records: model, method, scenario, seconds_per_edit, device),
under the model name ``llama2-7b``, with ``weights: random`` saying how it was measured.

    python bench/gpu_timing.py --json runs/bench/gpu-speed.json               # on a GPU (bench/gpu_check.sh)
    python bench/gpu_timing.py --shape tiny --device cpu --n 1 --json x.json  # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (the hyperparameter YAML's model, its checkpoint dtype, the LlamaConfig arguments)
SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama2-7b": ("llama2-7b", "float16", {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                                          "num_hidden_layers": 32, "num_attention_heads": 32,
                                          "num_key_value_heads": 32, "max_position_embeddings": 4096}),
    # the unit-test model's shape and YAMLs: the script's own check on a CPU (tests/test_gpu.py)
    "tiny": ("tiny-random-llama", "float32", {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128,
                                              "num_hidden_layers": 2, "num_attention_heads": 4,
                                              "num_key_value_heads": 2, "max_position_embeddings": 512}),
}
DEFAULT_METHODS = "baft,rome,memit"


def random_model(shape: str, device: str, dtype: str = "auto") -> tuple[Any, Any]:
    """A LoadedModel of ``shape`` with random weights made on ``device``, and the precision ``dtype`` resolves to
    for a weight-editing method (``kebench.core.models.resolve_precision``, the checkpoint's dtype as given)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kebench.core.models import DTYPES, LoadedModel, ModelInfo, byte_tokenizer, resolve_precision

    name, checkpoint_dtype, config_args = SHAPES[shape]
    on_gpu = torch.device(device).type != "cpu"
    precision = resolve_precision(dtype, True, checkpoint_dtype, on_gpu)
    model_dtype = DTYPES[precision.model]
    config = LlamaConfig(**config_args, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(model_dtype)  # 7B parameters are made in bfloat16 on the GPU, never in float32 on the host
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    info = ModelInfo(f"random-{shape}", f"random-init {shape}-shaped LLaMA (timing only)", "random-init seed=0")
    return LoadedModel(info, model, byte_tokenizer(), torch.device(device), model_dtype), checkpoint_dtype


@contextlib.contextmanager
def stand_in_statistics() -> Iterator[None]:
    """ROME and MEMIT read ``synthetic_moments`` instead of ``methods.stats.second_moment`` inside the block."""
    import methods.memit
    import methods.rome

    stand_in = synthetic_moments()
    saved = methods.rome.second_moment, methods.memit.second_moment
    methods.rome.second_moment = methods.memit.second_moment = stand_in
    try:
        yield
    finally:
        methods.rome.second_moment, methods.memit.second_moment = saved


def synthetic_moments() -> Callable[..., Any]:
    """A stand-in for ``methods.stats.second_moment``: a fixed positive-definite C of the down projection's input
    width (what ROME and MEMIT solve against), made once per (layer, dtype) on the model's device."""
    import torch

    from methods.stats import check_dtype, down_proj

    made: dict[tuple, Any] = {}

    def second_moment(lm: Any, layer: int, corpus: str, n: int, dtype: str = "float32", root: Any = None,
                      data_dir: Any = None) -> Any:
        key = (layer, dtype, str(lm.device))
        if key not in made:
            width = down_proj(lm, layer).in_features
            generator = torch.Generator(device="cpu").manual_seed(layer)
            basis = torch.randn(width, 64, generator=generator).to(lm.device)
            moment = basis @ basis.T / 64 + torch.eye(width, device=lm.device)
            made[key] = moment.to(check_dtype(dtype))
        return made[key]

    return second_moment


def time_method(lm: Any, hparams_model: str, checkpoint_dtype: str, method: str, n: int, seed: int = 0) -> dict[str, Any]:
    """Median seconds per single edit of ``method`` over ``n`` ZsRE test cases (after one untimed warm-up)."""
    import torch

    from benchmarks.registry import select_cases
    from kebench.core.models import resolve_precision, with_precision
    from methods.base import get_method
    from methods.hparams import load_hparams

    editor_class = get_method(method)
    precision = resolve_precision("auto", editor_class.edits_weights, checkpoint_dtype, lm.device.type != "cpu")
    marked = with_precision(lm, precision)
    hparams = load_hparams(method, hparams_model, "single")
    cases = select_cases("zsre", "test", n=n + 1).cases
    seconds, steps = [], []
    for index, case in enumerate(cases):
        torch.manual_seed(seed)
        editor = editor_class(marked, hparams, seed)
        _synchronize(lm.device)
        started = time.perf_counter()
        stats = editor.apply([case])
        _synchronize(lm.device)
        elapsed = time.perf_counter() - started
        editor.restore()
        if index > 0:
            seconds.append(elapsed)
            steps.append(stats.steps)
    device = str(lm.device)
    peak = None
    if lm.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(lm.device)})"
        peak = torch.cuda.max_memory_allocated(lm.device) / 2**30
    return {"model": hparams_model, "method": method, "scenario": "single",
            "seconds_per_edit": statistics.median(seconds), "device": device, "dtype": precision.key,
            "weights": "random", "variant": "fast", "mean_s_per_edit": statistics.fmean(seconds),
            "mean_steps": statistics.fmean(steps), "n": len(seconds),
            **({"peak_gpu_gib": round(peak, 2)} if peak is not None else {})}


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--n", type=int, default=3, help="timed edits per method (after one warm-up)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, default=None, help="write the records here (kebench plan --edit-speed)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    lm, checkpoint_dtype = random_model(args.shape, args.device)
    print(f"random {args.shape} on {lm.device} in {str(lm.dtype).replace('torch.', '')}: "
          f"{time.perf_counter() - started:.1f} s to build", file=sys.stderr, flush=True)
    hparams_model = SHAPES[args.shape][0]
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        with stand_in_statistics():  # see the module docstring
            row = time_method(lm, hparams_model, checkpoint_dtype, method, args.n)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every method: a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
