"""What planning needs to know of a model beyond its sizes: its decoder-layer classes, every parameter's size
in construction order and the modules ZeRO-3 hooks, read from the architecture on the meta device (imports
transformers and torch when called; allocates nothing), and kept on disk per architecture and transformers
version, so that the next plan of the same model (zi-plan, a sweep's jobs) reads them instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from zi_app.config.schema import thaw


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs to know of a model: its leaf classes and parameter sizes in construction order."""

    leaf_classes: Tuple[str, ...]
    param_numels: Tuple[int, ...]
    # Modules whose forward ZeRO-3 hooks (one fetch each), without and with decoder layers as leaf modules.
    modules: int = 0
    modules_with_leaves: int = 0
    # Per parameter: the name of the Linear or Embedding module it is the weight of ("" for any other), what
    # DeepSpeed's post-init quantization matches its keys against.
    weight_modules: Tuple[str, ...] = ()
    # Elements zero.Init partitions while the model is built: a tied weight once per module built with it.
    constructed_numel: int = 0


def auto_config(arch: Mapping[str, Any]):
    """The transformers config object of an architecture (a spec's frozen ``model.arch``)."""
    from transformers import AutoConfig

    arch = thaw(arch)
    return AutoConfig.for_model(arch.pop("model_type"), **arch)


def model_facts(arch: Mapping[str, Any], cache_dir: Optional[str] = None) -> ModelFacts:
    """Decoder-layer classes (from ``_no_split_modules``), parameter sizes and the modules ZeRO-3 hooks,
    read on the meta device; remembered per architecture (a sweep plans many jobs of one model), and with
    ``cache_dir`` kept in its ``model-facts`` folder for other processes (a file that cannot be read or
    written there is read from the model again)."""
    key = json.dumps(arch, sort_keys=True)
    if key not in _FACTS:
        path = _facts_file(cache_dir, key) if cache_dir else None
        facts = _load(path) if path else None
        if facts is None:
            facts = _read_facts(arch)
            if path:
                _store(path, facts)
        _FACTS[key] = facts
    return _FACTS[key]


_FACTS: Dict[str, ModelFacts] = {}


def _facts_file(cache_dir: str, key: str) -> Path:
    # The facts are transformers' modelling code's (another version may build the model differently) and fill
    # this ModelFacts (a field added since must not be read as its default).
    names = " ".join(field.name for field in dataclasses.fields(ModelFacts))
    digest = hashlib.sha256(f"{key} transformers {version('transformers')} {names}".encode()).hexdigest()[:24]
    return Path(cache_dir).expanduser() / "model-facts" / f"{digest}.json"


def _load(path: Path) -> Optional[ModelFacts]:
    try:
        fields = json.loads(path.read_text())
        return ModelFacts(**{name: tuple(value) if isinstance(value, list) else value
                             for name, value in fields.items()})
    except (OSError, ValueError, TypeError):
        return None


def _store(path: Path, facts: ModelFacts) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(dataclasses.asdict(facts)))
        partial.replace(path)  # whole or absent for a process reading it at the same time
    except OSError:
        pass  # a cache that cannot be written costs the next plan a second, nothing else


def _read_facts(arch: Mapping[str, Any]) -> ModelFacts:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(auto_config(arch))
    layer_names = set(type(model)._no_split_modules or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_names]
    leaf = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in layers})
    inside = {id(sub) for layer in layers for sub in layer.modules() if sub is not layer}
    modules = list(model.modules())
    # DeepSpeed's post-init quantization replaces modules of exactly these types (not subclasses such as
    # OPT's learned position embedding); a tied weight is named after its first module, as parameters() yields it.
    weight_of: Dict[int, str] = {}
    for name, module in model.named_modules():
        if type(module) in (torch.nn.Linear, torch.nn.Embedding):
            weight_of.setdefault(id(module.weight), name)
    params = list(model.parameters())
    return ModelFacts(leaf_classes=tuple(leaf), param_numels=tuple(p.numel() for p in params),
                      modules=len(modules), modules_with_leaves=sum(id(m) not in inside for m in modules),
                      weight_modules=tuple(weight_of.get(id(p), "") for p in params),
                      constructed_numel=sum(p.numel() for m in modules for p in m.parameters(recurse=False)))
