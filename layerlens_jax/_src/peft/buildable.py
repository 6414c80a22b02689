"""Which methods ``apply_plan`` can build on a module: the checks it runs, asked at discovery.

:func:`build_refusals` runs, for every method a site's kind admits (:data:`METHOD_KINDS`), the
very check ``apply_plan`` runs before it builds that method (the LoRA target table
:func:`~layerlens_jax._src.peft.targets.nnx_lora_target` / ``linen_lora_target``, the prefix
protocol :func:`~layerlens_jax._src.peft.nnx_modules.prefix_target_info`), and records each
refusal with its reason on the :class:`~layerlens_jax._src.sites.Site`. ``allocate`` then refuses
such options at allocation time instead of ``apply_plan`` refusing the plan later. A bottleneck
adapter wraps any block, so it is never refused here.
"""

from __future__ import annotations

from typing import Any

from layerlens_jax._src.methods import ADAPTER_METHODS, METHOD_KINDS
from layerlens_jax._src.peft.nnx_modules import prefix_target_info
from layerlens_jax._src.peft.targets import linen_lora_target, nnx_lora_target

__all__ = ["build_refusals"]


def _check(module: Any, method: str, path: str, framework: str) -> None:
    """The check ``apply_plan`` runs before building ``method`` on ``module``; ValueError."""
    where = f"site {path!r}"
    if method == "lora":
        (nnx_lora_target if framework == "nnx" else linen_lora_target)(module, where)
    elif method == "prefix":
        if framework == "nnx":
            prefix_target_info(module, path)
        elif not hasattr(module, "attention_fn"):
            raise ValueError(f"prefix cannot attach to {where}: {type(module).__name__} has "
                             f"no `attention_fn`")


def build_refusals(module: Any, kind: str, path: str, framework: str
                   ) -> tuple[tuple[str, str], ...]:
    """``((method, reason), ...)``: the methods of ``kind`` that ``apply_plan`` cannot build on
    ``module`` (an NNX module, or a bound Linen module whose parameters exist; ``framework``
    ``"nnx"`` or ``"linen"``), with the error it would raise."""
    out = []
    for method in ADAPTER_METHODS:
        if kind not in METHOD_KINDS[method]:
            continue
        try:
            _check(module, method, path, framework)
        except ValueError as e:
            out.append((method, str(e)))
    return tuple(out)
