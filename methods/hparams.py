"""Hyperparameter loading: a method's YAML for a model, its scenario blocks, derivation for a model
without a YAML of its own, and coercion into the method's frozen dataclass.

kebench's own methods keep their YAMLs under ``methods/hparams/<name>/<model>.yaml``; a plug-in's live
next to its own module (``<plugin package>/hparams/<name>/<model>.yaml``, or wherever its ``hparams_dir``
class attribute points).  A model without a YAML gets the nearest shipped YAML with the layers the
method's ``Editor.layer_rule`` gives for its depth.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from kebench.core.errors import KebenchError
from kebench.core.models import architecture_for_type, model_facts, model_names, parse_model_spec
from kebench.core.scenarios import scenario_names
from methods.base import Editor, get_method

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"

def hparams_root(method: str) -> Path:
    """The folder holding ``<method>/<model>.yaml`` for this method (see ``Editor.hparams_dir``)."""
    cls = get_method(method)
    if cls.hparams_dir is not None:
        return Path(cls.hparams_dir)
    if cls.__module__.startswith("methods."):
        return HPARAMS_DIR
    module = sys.modules.get(cls.__module__)
    module_file = getattr(module, "__file__", None)
    return Path(module_file).resolve().parent / "hparams" if module_file else HPARAMS_DIR


def hparams_path(method: str, model: str) -> Path:
    """The method's own YAML for ``model`` (it may not exist: see ``hparams_origin``)."""
    return hparams_root(method) / method / f"{hparams_file_name(model) or '-'}.yaml"


def load_hparams(method: str, model: str, scenario: str | None = None, overrides: Mapping[str, Any] | None = None,
                 path: Path | None = None) -> Any:
    """The method's dataclass filled from its YAML for ``model``, then ``overrides``; unknown keys are errors.

    A YAML may hold blocks named after a scenario kind (``batched: {lr: 1.0e-4, max_steps: 70}``) whose
    values replace the top-level ones when that scenario runs, as the paper's Table 5 does.  Without a
    YAML for ``model`` the values are derived (``hparams_origin``): the nearest shipped YAML, with the
    layers its depth rule gives for this model and module names in this model's own naming.
    """
    editor = get_method(method)
    cls = editor.hparams_class
    origin = hparams_origin(method, model) if path is None else HparamsOrigin(Path(path))
    if origin.path is None:
        return build_hparams(cls, dict(overrides or {}), where=f"method '{method}'")
    source = origin.path
    raw = read_hparams_file(source)
    blocks = set(scenario_names())
    values = {key: value for key, value in raw.items() if key not in blocks}
    if scenario is not None:
        values.update(raw.get(scenario) or {})
    if origin.derived_for is not None:
        values = _derive(editor, values, origin)
    values.update(overrides or {})
    where = str(source) if origin.derived_for is None else f"{source} (derived for model '{model}')"
    return build_hparams(cls, values, where=where)


def read_hparams_file(source: Path) -> dict[str, Any]:
    """A hyperparameter YAML as a mapping (scenario blocks checked); one-line errors naming the file."""
    if not source.is_file():
        raise KebenchError(f"{source}: hyperparameter file not found")
    try:
        with open(source, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:
        raise KebenchError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError as exc:
        raise KebenchError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise KebenchError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise KebenchError(f"{source}: expected a mapping of hyperparameters")
    for block in scenario_names():  # a block per declared scenario kind (kebench.core.scenarios)
        if block in raw and not isinstance(raw[block], dict):
            raise KebenchError(f"{source}: '{block}' should be a mapping of hyperparameters for that scenario")
    return raw


# --------------------------------------------------------------------------- derived hyperparameters

@dataclass(frozen=True)
class HparamsOrigin:
    """Where a method's hyperparameters for a model come from: ``path`` (None: the dataclass defaults), and
    for a model without its own YAML the facts the layers are derived for (``derived_for``)."""

    path: Path | None
    derived_for: Any = None  # kebench.core.models.ModelFacts of the target model
    source_facts: Any = None  # ... of the model whose YAML ``path`` is

    def describe(self, method: str) -> str:
        """One line for every result row's provenance."""
        if self.path is None:
            return f"hparams: defaults of {method}"
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        shown = _shown_path(self.path)
        if self.derived_for is None:
            return f"hparams: {shown} (sha256 {digest})"
        depth = self.derived_for.num_layers
        rule = get_method(method).layer_rule(depth)
        layers = ", ".join(f"{key}={value}" for key, value in (rule or {}).items())
        how = f"{layers} by {method}'s depth rule for {depth} layers" if rule else f"for a {depth}-layer model"
        return f"hparams: derived from {shown} (sha256 {digest}), {how}"


def _shown_path(path: Path) -> str:
    """A shipped YAML relative to the project (``methods/hparams/...``: the same on every machine; the sha256
    beside it identifies the content), any other file as it is."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def at_depth(num_layers: int, *fractions: float) -> list[int]:
    """The layers at these fractions of the depth, rounded half up, clipped to 0..num_layers-1, deduplicated
    (what the methods' ``Editor.layer_rule`` overrides are written in)."""
    return sorted({min(num_layers - 1, max(0, math.floor(f * num_layers + 0.5))) for f in fractions})


def _module_field(name: str) -> bool:
    return name in ("module", "target_modules") or name.endswith("_module") or name.endswith("_modules")


def _derive(editor: type[Editor], values: dict[str, Any], origin: HparamsOrigin) -> dict[str, Any]:
    """Another model's values re-fitted: the method's layers for this depth, module names in its naming."""
    target, source = origin.derived_for, origin.source_facts
    out = dict(values)
    out.update(editor.layer_rule(target.num_layers) or {})
    target_arch = architecture_for_type(target.model_type)
    source_arch = architecture_for_type(getattr(source, "model_type", "llama"))
    if target_arch is not None and target_arch != source_arch:
        for field in dataclasses.fields(editor.hparams_class):  # a default module name needs translating too
            if _module_field(field.name) and field.name not in out and field.default is not dataclasses.MISSING:
                out[field.name] = field.default
        for key, value in list(out.items()):
            if not _module_field(key):
                continue
            if isinstance(value, str):
                out[key] = target_arch.translate(value)
            elif isinstance(value, (list, tuple)):
                out[key] = list(dict.fromkeys(target_arch.translate(v) if isinstance(v, str) else v for v in value))
    return out


def hparams_file_name(model: str) -> str:
    """The YAML stem for a model: its registered name; ``hf:org/name[@rev]`` → ``org--name`` (the Hub cache's
    spelling); a ``path:`` folder has none (its hyperparameters are derived or given with ``--hparams``)."""
    if model.startswith("hf:"):
        return model[3:].partition("@")[0].replace("/", "--")
    if model.startswith("path:"):
        return ""
    return model


def hparams_origin(method: str, model: str) -> HparamsOrigin:
    """Where ``load_hparams(method, model)`` takes its values from: the method's YAML for the model, else
    (for a model whose depth is known) the nearest shipped YAML with derived layers, else an error."""
    editor = get_method(method)
    stem = hparams_file_name(model)
    own = hparams_root(method) / method / f"{stem}.yaml" if stem else None
    if own is not None and own.is_file():
        return HparamsOrigin(own)
    if not editor.needs_hparams_file:
        return HparamsOrigin(None)
    try:
        parse_model_spec(model)
    except KebenchError:  # not a model kebench knows: nothing to derive from
        facts = None
    else:
        facts = model_facts(model)  # a spec whose config cannot be read fails here, in one line
    nearest = nearest_hparams_file(method, facts, exclude=model) if facts is not None else None
    if nearest is None:
        where = own if own is not None else hparams_root(method) / method
        raise KebenchError(f"no hyperparameters for method '{method}' on model '{model}': {where} is missing"
                           + ("" if facts is not None else " (and the model's depth is not known to derive them)"))
    return HparamsOrigin(nearest[0], facts, nearest[1])


def nearest_hparams_file(method: str, facts: Any, exclude: str = "") -> tuple[Path, Any] | None:
    """The method's shipped ``<registered model>.yaml`` whose model is nearest in width and depth
    (|log2 hidden ratio| + |log2 layer ratio|; ties: by name), with that model's facts."""
    folder = hparams_root(method) / method
    best: tuple[float, str, Path, Any] | None = None
    for name in model_names():
        path = folder / f"{name}.yaml"
        other = model_facts(name) if name != exclude and path.is_file() else None
        if other is None:
            continue
        distance = abs(math.log2(facts.hidden_size / other.hidden_size)) + abs(math.log2(facts.num_layers / other.num_layers))
        if best is None or (distance, name) < best[:2]:
            best = (distance, name, path, other)
    return None if best is None else (best[2], best[3])


def describe_hparams(method: str, model: str, scenario: str | None = None,
                     overrides: Mapping[str, Any] | None = None, path: Path | None = None) -> tuple[str, Any]:
    """(provenance line, hyperparameters) as ``load_hparams`` would use them (``kebench hparams``)."""
    hparams = load_hparams(method, model, scenario, overrides, path)
    origin = HparamsOrigin(Path(path)) if path is not None else hparams_origin(method, model)
    return origin.describe(method), hparams


def build_hparams(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise KebenchError(f"{where}: unknown hyperparameter '{unknown[0]}' for {cls.__name__}; known: {', '.join(fields)}")
    coerced = {key: _coerce(value, hints[key], f"{where}: {key}") for key, value in values.items()}
    missing = [n for n, f in fields.items() if n not in coerced and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise KebenchError(f"{where}: missing hyperparameter '{missing[0]}' for {cls.__name__}")
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as exc:
        raise KebenchError(f"{where}: {exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """YAML 1.1 reads ``5e-4`` as a string and lists where tuples are wanted; fix both, reject the rest."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise KebenchError(f"{where} should be a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, where) for v in value)
    if hint is float:
        if isinstance(value, bool):
            raise KebenchError(f"{where} should be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise KebenchError(f"{where} should be a number, got {value!r}") from None
        if not math.isfinite(number):  # nan/inf would only fail deep inside an optimizer or a Ray task
            raise KebenchError(f"{where} should be a finite number, got {value!r}")
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KebenchError(f"{where} should be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise KebenchError(f"{where} should be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise KebenchError(f"{where} should be a string, got {value!r}")
        return value
    return value


def hparams_dict(hparams: Any) -> dict[str, Any]:
    """JSON-ready resolved hyperparameters (tuples as lists), for result rows and the cell hash."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(hparams).items()}
