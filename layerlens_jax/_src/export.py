"""Export a plan's LoRA part as a Hugging Face PEFT ``LoraConfig`` (``adapter_config.json``).

Site paths (``encoder/layers_0/attention/mha/query``) become PyTorch module names through a
``module_name_map``; :func:`hf_bert_module_name` is the map for the BERT of
:mod:`layerlens_jax.models` to HF ``BertModel`` names (other models pass their own map).
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Callable, Mapping

from layerlens_jax._src.fileio import atomic_write_text
from layerlens_jax._src.plan import Plan

__all__ = ["HF_BERT_NAMES", "HF_BERT_LAYER_NAMES", "hf_bert_module_name", "to_peft_config",
           "save_peft_config"]

ModuleNameMap = Mapping[str, str] | Callable[[str], "str | None"]

# The default map for HF BERT-style names: site paths of layerlens_jax.models' BERT -> module
# names in HF ``BertModel`` / ``BertForSequenceClassification``.
#: Sites outside the encoder layers, by full path.
HF_BERT_NAMES: Mapping[str, str] = {
    "embeddings/word": "embeddings.word_embeddings",
    "embeddings/position": "embeddings.position_embeddings",
    "embeddings/token_type": "embeddings.token_type_embeddings",
    "pooler": "pooler.dense",
    "classifier": "classifier",
}
#: Sites inside encoder layer ``i`` (``encoder/layers_<i>/<key>`` -> ``encoder.layer.<i>.<value>``).
HF_BERT_LAYER_NAMES: Mapping[str, str] = {
    "attention/mha/query": "attention.self.query",
    "attention/mha/key": "attention.self.key",
    "attention/mha/value": "attention.self.value",
    "attention/mha/out": "attention.output.dense",
    "mlp/intermediate": "intermediate.dense",
    "mlp/output": "output.dense",
}
_LAYER_PATH = re.compile(r"encoder/layers_(\d+)/(.+)")


def hf_bert_module_name(path: str) -> str | None:
    """Site path of :mod:`layerlens_jax.models`' BERT -> module name in HF ``BertModel``, by the
    default HF BERT-style map (:data:`HF_BERT_NAMES`, :data:`HF_BERT_LAYER_NAMES`).

    ``encoder/layers_3/attention/mha/query`` -> ``encoder.layer.3.attention.self.query``; sites
    without a PyTorch counterpart give None.
    """
    if path in HF_BERT_NAMES:
        return HF_BERT_NAMES[path]
    m = _LAYER_PATH.fullmatch(path)
    if not m:
        return None
    layer, rest = m.groups()
    sub = HF_BERT_LAYER_NAMES.get(rest)
    return None if sub is None else f"encoder.layer.{layer}.{sub}"


def _name_function(module_name_map: ModuleNameMap | None) -> Callable[[str], str | None]:
    if module_name_map is None:
        return lambda path: path.replace("/", ".")
    if callable(module_name_map):
        return module_name_map
    return module_name_map.get


def _lora_targets(plan: Plan, name_of: Callable[[str], str | None], alphas: Mapping[str, float]
                  ) -> tuple[dict[str, int], dict[str, float], list[dict[str, Any]]]:
    """``(rank by module name, alpha by module name where it differs, dropped sites)``."""
    alpha = float(plan.peft_options["lora_alpha"])
    dropped, ranks, alpha_of, site_of = [], {}, {}, {}
    for a in plan.allocations:
        if a.method == "none":
            continue
        if a.method != "lora":
            dropped.append({"site": a.site, "method": a.method, "size": a.size,
                            "reason": f"{a.method} is not expressible in a LoraConfig"})
            continue
        name = name_of(a.site)
        if not name:
            dropped.append({"site": a.site, "method": a.method, "size": a.size,
                            "reason": "no PyTorch module name for this site"})
            continue
        if name in site_of:
            raise ValueError(f"sites {site_of[name]!r} and {a.site!r} map to one module name {name!r}")
        site_of[name] = a.site
        ranks[name] = a.size
        if a.site in alphas and float(alphas[a.site]) != alpha:
            alpha_of[name] = float(alphas[a.site])
    return ranks, alpha_of, dropped


def to_peft_config(plan: Plan, module_name_map: ModuleNameMap | None = None, *,
                   task_type: str | None = None, base_model_name_or_path: str | None = None,
                   alpha_pattern: Mapping[str, float] | None = None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """HF PEFT ``LoraConfig``-compatible ``adapter_config.json`` content for the plan's LoRA part.

    Args:
      plan: the plan; its ``peft_options`` give ``lora_alpha``, ``lora_dropout``, ``use_rslora``.
      module_name_map: site path -> PyTorch module name: a mapping, or a callable returning None
        for sites without one. Default: ``/`` -> ``.``; :func:`hf_bert_module_name` for the BERT
        of :mod:`layerlens_jax.models`.
      task_type: PEFT's ``task_type`` (``"SEQ_CLS"``, ...).
      base_model_name_or_path: recorded as is.
      alpha_pattern: site -> alpha, for sites whose alpha differs from ``lora_alpha`` (PEFT's
        scaling is ``alpha / r`` per module, or ``alpha / sqrt(r)`` with ``use_rslora``, as ours).

    Returns:
      ``(config, dropped)``: ``config`` has ``r`` = the most common rank (the smallest on ties;
      8 without LoRA sites) and the other ranks in ``rank_pattern``; ``dropped`` lists
      ``{"site", "method", "size", "reason"}`` for adapted sites not in the config (non-LoRA
      methods, sites without a module name).

    Raises:
      ValueError: ``alpha_pattern`` names sites not in the plan, or two sites map to one name.
    """
    alphas = dict(alpha_pattern or {})
    unknown = sorted(set(alphas) - set(plan.sites))
    if unknown:
        raise ValueError(f"alpha_pattern names site(s) {unknown} not in the plan")
    ranks, alpha_of, dropped = _lora_targets(plan, _name_function(module_name_map), alphas)
    counts = collections.Counter(ranks.values())
    r0 = min(counts, key=lambda r: (-counts[r], r)) if counts else 8
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": False,
        "r": int(r0),
        "lora_alpha": float(plan.peft_options["lora_alpha"]),
        "lora_dropout": float(plan.peft_options.get("lora_dropout", 0.0)),
        "use_rslora": bool(plan.peft_options["use_rslora"]),
        "target_modules": sorted(ranks),
        "rank_pattern": {n: int(r) for n, r in sorted(ranks.items()) if r != r0},
        "alpha_pattern": dict(sorted(alpha_of.items())),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return config, dropped


def save_peft_config(plan: Plan, directory: str | os.PathLike,
                     module_name_map: ModuleNameMap | None = None, **kwargs) -> list[dict[str, Any]]:
    """Write ``directory/adapter_config.json`` (crash-safely) from :func:`to_peft_config`
    (``kwargs`` go to it); returns what was dropped."""
    config, dropped = to_peft_config(plan, module_name_map, **kwargs)
    atomic_write_text(os.path.join(os.fspath(directory), "adapter_config.json"),
                      json.dumps(config, indent=2) + "\n")
    return dropped
