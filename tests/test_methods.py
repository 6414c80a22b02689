"""The one source of truth for methods, method-kind compatibility and PEFT options."""

import jax.numpy as jnp
import pytest

from layerlens_jax._src import costs, methods, plan
from layerlens_jax._src.methods import (ADAPTER_METHODS, METHOD_KINDS, METHODS, PLAN_OPTION_NAMES,
                                        PeftOptions, default_peft_options,
                                        peft_options_from_mapping)
from layerlens_jax._src.peft import apply as peft_apply
from layerlens_jax._src.sites import KINDS, Site


def test_tables():
    assert METHODS == ("none", "lora", "adapter", "prefix")
    assert ADAPTER_METHODS == ("lora", "adapter", "prefix")
    assert METHOD_KINDS == {"none": KINDS, "lora": ("linear", "embedding", "conv"),
                            "adapter": ("block",), "prefix": ("attention",)}
    # every user reads these very objects: no copies left
    assert peft_apply.METHOD_KINDS is METHOD_KINDS and peft_apply.PeftOptions is PeftOptions
    assert peft_apply.METHODS is METHODS and plan.METHODS is METHODS
    assert costs.METHOD_KINDS is METHOD_KINDS and costs.METHODS is METHODS
    assert not hasattr(plan, "_PEFT_OPTION_TYPES")


def test_cost_formulas_exist_exactly_for_the_compatible_kinds():
    shapes = {"in_features": 4, "out_features": 6, "num_heads": 2, "head_dim": 3}
    for method in ADAPTER_METHODS:
        for kind in KINDS:
            site = Site(f"s_{kind}", kind, "M", {}, 0, **shapes)
            if kind in METHOD_KINDS[method]:
                assert costs.trainable_params(site, method, 2) > 0
            else:
                with pytest.raises(ValueError, match=f"s_{kind}.*{kind}"):
                    costs.trainable_params(site, method, 2)


def test_peft_options_defaults_and_plan_subset():
    o = PeftOptions()
    assert (o.lora_alpha, o.use_rslora, o.lora_dropout, o.adapter_activation, o.prefix_mode,
            o.prefix_reparam_hidden, o.param_dtype, o.seed) == (
        16.0, False, 0.0, "gelu", "parallel", None, jnp.float32, 0)
    assert default_peft_options() == {"lora_alpha": 16.0, "use_rslora": False,
                                      "adapter_activation": "gelu", "lora_dropout": 0.0,
                                      "prefix_reparam_hidden": None}
    assert tuple(default_peft_options()) == PLAN_OPTION_NAMES
    assert PeftOptions(lora_alpha=8).plan_options()["lora_alpha"] == 8.0
    assert PeftOptions(param_dtype=jnp.bfloat16).to_json()["param_dtype"] == "bfloat16"
    with pytest.raises(TypeError):
        PeftOptions(8.0)  # keyword-only


@pytest.mark.parametrize("kwargs, match", [
    ({"lora_alpha": "big"}, "'lora_alpha' must be a finite number"),
    ({"lora_alpha": True}, "'lora_alpha'"),
    ({"lora_dropout": 1.0}, r"'lora_dropout' must be in \[0, 1\)"),
    ({"use_rslora": "yes"}, "'use_rslora' must be a bool"),
    ({"adapter_activation": 3}, "'adapter_activation'"),
    ({"prefix_mode": "serial"}, "'prefix_mode' must be one of"),
    ({"prefix_reparam_hidden": 0}, "'prefix_reparam_hidden' must be an int >= 1 or None"),
    ({"seed": 1.5}, "'seed' must be an int"),
])
def test_peft_options_validation_names_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PeftOptions(**kwargs)


def test_options_from_mapping():
    got = peft_options_from_mapping({"lora_alpha": 4.0, "prefix_reparam_hidden": 7})
    assert got == PeftOptions(lora_alpha=4.0, prefix_reparam_hidden=7)
    with pytest.raises(ValueError, match="Plan.peft_options has unknown key 'seed'"):
        peft_options_from_mapping({"seed": 1}, where="Plan.peft_options")
    with pytest.raises(ValueError, match="Plan.peft_options: PEFT option 'lora_alpha'"):
        peft_options_from_mapping({"lora_alpha": None}, where="Plan.peft_options")
    assert peft_options_from_mapping({"seed": 3}, names=tuple(methods.OPTION_NAMES)).seed == 3
