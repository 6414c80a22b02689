"""Parameter-efficient fine-tuning modules and plan application (NNX first-class, Linen too).

* :class:`LoRA`, :class:`Adapter`, :class:`Prefix`: NNX modules (thin shells over
  :mod:`layerlens_jax._src.peft.functional`); adapter variables are :class:`PeftParam` (an
  ``nnx.LoRAParam``) named ``peft_*``.
* :func:`apply_plan`: wrap a model's planned sites (NNX surgery / Linen interception).
* :func:`merge`: fold LoRA into base kernels (adapters and prefixes are not mergeable).
* Trainable separation: :data:`PEFT_FILTER`, :data:`BASE_FILTER`, :func:`trainable_mask`,
  :func:`optax_labels`, :func:`partition_params`, :func:`count_trainable`.
* :data:`LORA_KINDS`: the one table of module kinds LoRA wraps (NNX and Linen), read into a
  :class:`LoRATarget`.
* Canonical adapter state (same for NNX and Linen): :func:`adapter_state`,
  :func:`load_adapter_state`.
"""

from layerlens_jax._src.peft import functional
from layerlens_jax._src.peft.apply import (METHOD_KINDS, METHODS, PeftOptions, adapter_state,
                                      applied_plan, apply_plan, check_adapter_state,
                                      combine_params, count_trainable, is_peft_path,
                                      load_adapter_state, merge, normalise_plan, normalize_plan,
                                      optax_labels,
                                      partition_params, trainable_mask)
from layerlens_jax._src.peft.linen import PeftLinen, init_adapters, merge_linen
from layerlens_jax._src.peft.targets import LORA_KINDS, LoRATarget
from layerlens_jax._src.peft.nnx_modules import (BASE_FILTER, PEFT_FILTER, PEFT_PREFIX, Adapter,
                                            AdapterWeight, LoRA, LoRAWeight, PeftParam, Prefix,
                                            PrefixWeight)

__all__ = [
    "functional",
    "METHODS", "METHOD_KINDS", "PeftOptions", "normalise_plan", "normalize_plan",
    "apply_plan", "applied_plan", "merge", "merge_linen", "PeftLinen", "init_adapters",
    "LoRA", "Adapter", "Prefix", "LoRATarget", "LORA_KINDS",
    "PeftParam", "LoRAWeight", "AdapterWeight", "PrefixWeight",
    "PEFT_PREFIX", "PEFT_FILTER", "BASE_FILTER",
    "is_peft_path", "trainable_mask", "optax_labels", "partition_params", "combine_params",
    "count_trainable", "adapter_state", "load_adapter_state", "check_adapter_state",
]
