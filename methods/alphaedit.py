"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025).

Implemented from the official code ``jianghoucheng/AlphaEdit@f5248d3`` (``AlphaEdit/AlphaEdit_main.py``,
``experiments/evaluate.py::get_project`` and the driver loop; ``../shared/reference/field-anchors-2026-12.md``
§2) and EasyEdit's port (``easyeditor/models/alphaedit``).  Everything but the solve is MEMIT's, and is
MEMIT's code here (``AlphaEdit`` subclasses ``methods.memit.MEMIT``): the target z* at the last edited
layer (``compute_z``), the keys K averaged over the context-template groups (``compute_ks``), the residual
R = (z* − z_L(current)) / (layers left) per layer, layers edited in increasing order.  What changes:

1. **Projector** (``get_project``).  Per edited layer, from the *unedited* model's second moment
   C = E[k kᵀ] (``methods.stats``: the stored C is already Σ k kᵀ / #tokens, the per-token mean that the
   original's ``SecondMoment.moment()`` returns, so the absolute threshold means the same thing), with
   C = U diag(λ) Uᵀ:  Û = the columns of U whose λ < ``nullspace_threshold``, P = Û Ûᵀ.
   P is written beside C (``…/layer<L>_n<n>_<dtype>[_model-…]_nullspace<threshold>.safetensors``), so it
   is keyed by everything C is keyed by (model, revision, layer, corpus, n, dtype, model dtype) plus the
   threshold, and it records the size and mtime of the C file it came from (a recomputed C invalidates
   it).  The original takes ``torch.linalg.svd`` of the float32 C; for a symmetric PSD matrix that is its
   eigendecomposition, done here with ``eigh`` in float64 so that float32 rounding does not decide which
   eigenvalues lie under the threshold.
2. **Update** (``AlphaEdit_main.py``), per layer, in float32 as the original:

       ΔWᵀ = solve( P (K Kᵀ + K_p K_pᵀ) + α I,  P K Rᵀ ),    α = ``L2``

   MEMIT's λC term is gone (``mom2_update_weight`` is not a setting here: the original's config carries it
   unused); preservation comes from ΔW's rows lying in P's range (ΔW (I − P) = 0 exactly), where C has
   little energy.  How little depends on the model: at 2e-2, 19–34% of C's trace on SmolLM2's layers 4–8
   (the YAML).  It is the minimiser of ‖ΔW K − R‖² + ‖ΔW K_p‖² + α‖ΔW‖² over ΔW = ΔW P.  On one call this
   is no better a trade-off than MEMIT's λC for the corpus keys (``tests/test_alphaedit.py`` measures
   both); what MEMIT lacks is the K_p term below.
3. **Earlier edits** (``cache_c``): K_p K_pᵀ per layer starts at 0 and, after every edit call, gains K Kᵀ
   for that call's keys *recomputed on the edited model* (the original's second loop over the layers).
   ``restore`` zeroes it, so a new stream is not constrained by rolled-back edits.

A call with B cases is one batch, solved jointly (AlphaEdit's natural mode); the calls of a stream
accumulate K_p.  P and K_p K_pᵀ are kept on the CPU, as in the original, and moved to the model's device
one layer at a time for the solve (on a 7B model each is d_mlp² float32 = 0.8 GB per layer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.case import EditCase
from methods.stats import ensure_stats, provenance_note, read_metadata, second_moment
from methods.base import EditStats, NonFiniteError, register_method
from methods.memit import MEMIT
from methods.rome import ValueSettings, check_locate_then_edit
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel


@dataclass(frozen=True)
class AlphaEditHParams:
    layers: tuple[int, ...]  # edited down_proj layers, in increasing order; z* lives at the last one
    nullspace_threshold: float = 2.0e-2  # eigenvalues of the per-token-mean C below this span P's range
    L2: float = 10.0  # α, the ridge term of the solve (official configs: 10; EasyEdit's Llama-3 port: 1)
    v_num_grad_steps: int = 25
    v_lr: float = 0.1
    v_loss_layer: int = -1  # -1: the last layer
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05  # compute_z stops at loss < 5e-2
    fact_token: str = "subject_last"
    n_short_templates: int = 0
    n_long_templates: int = 5
    mom2_corpus: str = "shared-offline"
    mom2_n_samples: int = 1000
    mom2_dtype: str = "float32"
    fast_forward: bool = True  # run only the live columns above the z layer (same numbers up to rounding)

    def __post_init__(self) -> None:
        check_locate_then_edit(self)
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be strictly increasing, got {list(self.layers)}")
        if self.nullspace_threshold <= 0:  # nothing lies below 0: P = 0 and no edit is ever written
            raise ValueError(f"nullspace_threshold must be > 0, got {self.nullspace_threshold}")
        if self.L2 <= 0:  # P (K Kᵀ + K_p K_pᵀ) is singular off P's range; α I is what makes the solve well posed
            raise ValueError(f"L2 must be > 0, got {self.L2}")

    def value_settings(self) -> ValueSettings:
        return ValueSettings(self.v_num_grad_steps, self.v_lr, self.v_loss_layer, self.v_weight_decay,
                             self.clamp_norm_factor, self.kl_factor, self.early_stop_loss)


# --------------------------------------------------------------------------- the null-space projector

@dataclass(frozen=True)
class Projector:
    """P = Û Ûᵀ of one layer (CPU, float32), with what it keeps of C."""

    matrix: torch.Tensor  # [d_mlp, d_mlp]
    dims: int  # rank of P: how many eigenvalues of C lie below the threshold
    energy: float  # tr(P C) / tr(C): the share of the corpus keys' squared norm inside P's range


def projector_from_moment(moment: torch.Tensor, threshold: float) -> Projector:
    """P onto the span of C's eigenvectors whose eigenvalue is below ``threshold`` (absolute, on the mean C)."""
    values, vectors = torch.linalg.eigh(moment.to(torch.float64))
    inside = values < threshold
    basis = vectors[:, inside]
    total = float(values.sum())
    energy = float(values[inside].sum()) / total if total > 0 else 0.0
    matrix = (basis @ basis.T).to(torch.float32).cpu().contiguous()
    return Projector(matrix, int(inside.sum()), energy)


def projector_path(stats_path: Path, threshold: float) -> Path:
    """P's file beside the C file it is computed from: the same key, plus the threshold."""
    return stats_path.with_name(f"{stats_path.stem}_nullspace{threshold:.6g}.safetensors")


def _source_of(stats_path: Path) -> str:
    """Identifies the C file a P came from (a recomputed C has a new mtime)."""
    status = stats_path.stat()
    return f"{status.st_size}-{status.st_mtime_ns}"


@lru_cache(maxsize=16)
def _load_projector(path: str, mtime_ns: int) -> Projector:
    from safetensors.torch import load_file

    meta = read_metadata(Path(path))
    return Projector(load_file(path)["projector"], int(meta["dims"]), float(meta["energy"]))


def _write_projector(path: Path, projector: Projector, threshold: float, source: str) -> None:
    from safetensors.torch import save_file

    metadata = {"threshold": f"{threshold:.6g}", "dims": str(projector.dims), "energy": f"{projector.energy:.8g}",
                "source": source,
                "statistic": "AlphaEdit null-space projector U U^T, eigenvalues of E[k k^T] < threshold"}
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    save_file({"projector": projector.matrix}, str(partial), metadata=metadata)
    os.replace(partial, path)  # atomic, as the statistics: concurrent writers leave one whole file


def null_space_projector(lm: LoadedModel, layer: int, corpus: str, n: int, dtype: str, threshold: float,
                         root: Path | None = None) -> Projector:
    """P for one layer, from the cached C of the unedited model; computed once and cached beside C."""
    (outcome,) = ensure_stats(lm, [layer], corpus, n, dtype, root)
    path = projector_path(outcome.path, threshold)
    source = _source_of(outcome.path)
    if path.is_file() and read_metadata(path).get("source") == source:
        return _load_projector(str(path), path.stat().st_mtime_ns)
    projector = projector_from_moment(second_moment(lm, layer, corpus, n, dtype, root), threshold)
    _write_projector(path, projector, threshold, source)
    return projector


# --------------------------------------------------------------------------- the editor

@register_method("alphaedit")
class AlphaEdit(MEMIT):
    hparams_class = AlphaEditHParams

    def __init__(self, lm: LoadedModel, hparams: AlphaEditHParams, seed: int) -> None:
        super().__init__(lm, hparams, seed)  # MEMIT's templates; it also loads C, which P replaces
        self.moments = {}  # the update never reads C (no λC term); P is all AlphaEdit keeps of it
        try:
            self.projectors = {layer: self._projector(layer) for layer in hparams.layers}
        except BaseException:
            super().restore()  # undo what WeightEditor set up (the float32 island under dtype: auto)
            raise
        width = self.projectors[hparams.layers[0]].matrix.shape[0]
        # K_p K_pᵀ per layer: the keys of this stream's earlier calls (CPU, float32, as the original's cache_c)
        self.preserved = {layer: torch.zeros(width, width, dtype=torch.float32) for layer in hparams.layers}

    def _projector(self, layer: int) -> Projector:
        hp = self.hparams
        projector = null_space_projector(self.lm, layer, hp.mom2_corpus, hp.mom2_n_samples, hp.mom2_dtype,
                                         hp.nullspace_threshold)
        if projector.dims == 0:  # P = 0 would write ΔW = 0 and every edit would silently do nothing
            raise KebenchError(f"alphaedit: no eigenvalue of layer {layer}'s C is below nullspace_threshold "
                               f"{hp.nullspace_threshold:g} on {self.lm.name}; raise the threshold")
        return projector

    # layer_rule is MEMIT's (inherited): the official Llama3-8B config edits layers 4..8 of 32, MEMIT's layers.

    @classmethod
    def provenance(cls, hparams: AlphaEditHParams) -> str:
        return (f"{provenance_note(cls.requirements(hparams)[0])}; null-space projector from C's eigenvalues "
                f"< {hparams.nullspace_threshold:g} (per-token mean), α (L2) = {hparams.L2:g}")

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        stats = super().apply(cases)  # MEMIT's loop, with the solve below
        # As the original: after the whole batch is written, its keys are read again on the edited model
        # and join K_p K_pᵀ, which constrains every later call of the stream.
        for layer in self.hparams.layers:
            keys = self._keys(cases, layer).to(torch.float32)  # [n, d_mlp]
            if not torch.isfinite(keys).all():
                raise NonFiniteError(f"alphaedit: non-finite keys at layer {layer} after the edit")
            self.preserved[layer] += (keys.T @ keys).cpu()
        return stats

    def _layer_update(self, layer: int, keys: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """ΔW [d, d_mlp] with ΔWᵀ = solve(P (K Kᵀ + K_p K_pᵀ) + α I, P K Rᵀ), float32 as the original."""
        device = keys.device
        projector = self.projectors[layer].matrix.to(device)
        keys32, share32 = keys.to(torch.float32), share.to(torch.float32)
        system = projector @ (keys32 @ keys32.T + self.preserved[layer].to(device))
        system.diagonal().add_(self.hparams.L2)
        try:
            update_t = torch.linalg.solve(system, projector @ keys32 @ share32.T)  # [d_mlp, d]
        except torch.linalg.LinAlgError as exc:  # a singular system is a numeric failure of the cell
            raise NonFiniteError(f"alphaedit: singular P(KKᵀ + K_pK_pᵀ) + αI at layer {layer}: {exc}") from None
        return update_t.T

    def restore(self) -> None:
        super().restore()
        for preserved in self.preserved.values():
            preserved.zero_()  # K_p belongs to the stream that was just rolled back

    def artifacts(self, cases: Sequence[EditCase]) -> dict[str, Any]:
        """Per layer, P's rank and the share of C's energy in its range (how much the projection preserves)."""
        return {"nullspace": {str(layer): {"dims": p.dims, "energy": round(p.energy, 6)}
                              for layer, p in self.projectors.items()}}
