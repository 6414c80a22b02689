"""The PEFT methods, the site kinds each attaches to, and the one record of PEFT options.

The single source of truth for these names: :mod:`~layerlens_jax._src.costs` (cost formulas),
:mod:`~layerlens_jax._src.plan` (the plan record and its JSON), :mod:`~layerlens_jax._src.peft`
(the modules that apply a plan) and the application's configuration all import them from here.

* :data:`METHODS`: every method a plan may assign, ``"none"`` (leave the site alone) first; the
  column order of the cost and gain models. :data:`ADAPTER_METHODS`: the ones that add parameters.
* :data:`METHOD_KINDS`: the site kinds (:data:`~layerlens_jax._src.sites.KINDS`) each method has a
  cost formula and a module for.
* :class:`PeftOptions`: the options shared by every site of a plan. A plan records
  :data:`PLAN_OPTION_NAMES` (what shapes the adapters' maths and parameter count); the rest
  (``prefix_mode``, ``param_dtype``, ``seed``) are chosen when the plan is applied (keywords of
  ``apply_plan``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from layerlens_jax._src.kinds import KINDS

__all__ = [
    "METHODS",
    "ADAPTER_METHODS",
    "METHOD_KINDS",
    "PREFIX_MODES",
    "PeftOptions",
    "OPTION_NAMES",
    "PLAN_OPTION_NAMES",
    "default_peft_options",
    "peft_options_from_mapping",
]

METHODS = ("none", "lora", "adapter", "prefix")
#: The methods that add trainable parameters (every method but ``"none"``).
ADAPTER_METHODS = METHODS[1:]
#: The site kinds each method has a cost formula and a PEFT module for (``"none"``: every kind).
METHOD_KINDS: Mapping[str, tuple[str, ...]] = {
    "none": KINDS,
    "lora": ("linear", "embedding", "conv"),
    "adapter": ("block",),
    "prefix": ("attention",),
}
#: ``"parallel"``: the prefix term is added to the unchanged attention (identity at init);
#: ``"joint"``: one softmax over the prefix and the sequence keys.
PREFIX_MODES = ("parallel", "joint")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float, np.integer, np.floating))
            and not isinstance(x, (bool, np.bool_)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftOptions:
    """Options shared by every site of a plan (a plan's ``peft_options`` hold
    :data:`PLAN_OPTION_NAMES` of them). Construction validates every field."""

    # LoRA scale numerator: the update is (alpha / r) * x A B, or alpha / sqrt(r) with use_rslora.
    lora_alpha: float = 16.0
    # Rank-stabilised LoRA scaling alpha / sqrt(r) instead of alpha / r.
    use_rslora: bool = False
    # Dropout rate on the LoRA input (needs a dropout rng; 0 = off).
    lora_dropout: float = 0.0
    # Nonlinearity of the adapter bottleneck.
    adapter_activation: str = "gelu"
    # How prefix keys and values join the attention: one of PREFIX_MODES.
    prefix_mode: str = "parallel"
    # Hidden width of the prefix reparameterisation MLP; None = off (learn the prefixes directly).
    # Plans written before this record existed call it ``prefix_projection`` (0 = off).
    prefix_reparam_hidden: int | None = None
    # dtype of the adapter parameters.
    param_dtype: Any = jnp.float32
    # Base of the per-site initialisation keys.
    seed: int = 0

    def __post_init__(self):
        for name in ("lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(float(value)):
                raise ValueError(f"PEFT option {name!r} must be a finite number, got {value!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"PEFT option 'lora_dropout' must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, (bool, np.bool_)):
            raise ValueError(f"PEFT option 'use_rslora' must be a bool, got {self.use_rslora!r}")
        if not isinstance(self.adapter_activation, str):
            raise ValueError(f"PEFT option 'adapter_activation' must be a string, got "
                             f"{self.adapter_activation!r}")
        if self.prefix_mode not in PREFIX_MODES:
            raise ValueError(f"PEFT option 'prefix_mode' must be one of {PREFIX_MODES}, got "
                             f"{self.prefix_mode!r}")
        hidden = self.prefix_reparam_hidden
        if hidden is not None and (not _is_int(hidden) or hidden < 1):
            raise ValueError(f"PEFT option 'prefix_reparam_hidden' must be an int >= 1 or None "
                             f"(off), got {hidden!r}")
        if not _is_int(self.seed):
            raise ValueError(f"PEFT option 'seed' must be an int, got {self.seed!r}")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["param_dtype"] = jnp.dtype(self.param_dtype).name
        return d

    def plan_options(self) -> dict[str, Any]:
        """The options a plan records, as JSON-able Python values."""
        out = {name: getattr(self, name) for name in PLAN_OPTION_NAMES}
        out["lora_alpha"] = float(out["lora_alpha"])
        out["lora_dropout"] = float(out["lora_dropout"])
        out["use_rslora"] = bool(out["use_rslora"])
        if out["prefix_reparam_hidden"] is not None:
            out["prefix_reparam_hidden"] = int(out["prefix_reparam_hidden"])
        return out


#: The options a plan records, in its JSON order. The others are chosen when applying the plan.
PLAN_OPTION_NAMES = ("lora_alpha", "use_rslora", "adapter_activation", "lora_dropout",
                     "prefix_reparam_hidden")
#: Every PeftOptions field name.
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(PeftOptions))


def default_peft_options() -> dict[str, Any]:
    """The defaults of the plan's options (:data:`PLAN_OPTION_NAMES`), as a fresh dict: LoRA
    ``alpha`` 16 with ``alpha / r`` scaling, no LoRA dropout, GELU adapters, no prefix
    reparameterisation."""
    return PeftOptions().plan_options()


def peft_options_from_mapping(options: Mapping[str, Any], *, where: str = "peft_options",
                              names: tuple[str, ...] = PLAN_OPTION_NAMES) -> PeftOptions:
    """Validate ``{name: value}`` (only ``names`` allowed; missing ones take their defaults).

    Args:
      options: option values by name.
      where: what to call the mapping in error messages (``"Plan.peft_options"``).
      names: the option names allowed (default: those a plan records).

    Returns:
      The :class:`PeftOptions` record.

    Raises:
      ValueError: naming ``where`` and the key, for an unknown key or a bad value.
    """
    if not isinstance(options, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(options).__name__}")
    unknown = [k for k in options if k not in names]
    if unknown:
        raise ValueError(f"{where} has unknown key {unknown[0]!r}; expected {sorted(names)}")
    try:
        return PeftOptions(**options)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
