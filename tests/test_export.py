"""HF PEFT LoraConfig export of a plan's LoRA part, and the default HF BERT-style name map."""

import json

import jax.numpy as jnp
import pytest
from flax import nnx

from layerlens_jax._src.export import hf_bert_module_name, save_peft_config, to_peft_config
from layerlens_jax._src.plan import Plan
from layerlens_jax._src.sites import discover_sites
from layerlens_jax.models import BertClassifier, BertConfig


@pytest.fixture(scope="module")
def sites():
    model = BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))
    return discover_sites(model, example=(jnp.zeros((2, 7), jnp.int32),))


def test_peft_config_export(sites, tmp_path):
    assign = {"encoder/layers_0/attention/mha/query": ("lora", 8),
              "encoder/layers_0/attention/mha/value": ("lora", 8),
              "encoder/layers_1/attention/mha/query": ("lora", 4),
              "embeddings/word": ("lora", 2),
              "encoder/layers_0/mlp": ("adapter", 8),
              "encoder/layers_0/attention/mha": ("prefix", 4)}
    plan = Plan.from_assignments(sites, assign, peft_options={"lora_alpha": 32.0, "use_rslora": True})
    config, dropped = to_peft_config(plan, hf_bert_module_name, task_type="SEQ_CLS",
                                     alpha_pattern={"embeddings/word": 4.0})
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["r"] == 8 and config["lora_alpha"] == 32.0 and config["use_rslora"] is True
    assert config["target_modules"] == ["embeddings.word_embeddings",
                                        "encoder.layer.0.attention.self.query",
                                        "encoder.layer.0.attention.self.value",
                                        "encoder.layer.1.attention.self.query"]
    assert config["rank_pattern"] == {"embeddings.word_embeddings": 2,
                                      "encoder.layer.1.attention.self.query": 4}
    assert config["alpha_pattern"] == {"embeddings.word_embeddings": 4.0}
    assert sorted((d["site"], d["method"]) for d in dropped) == [
        ("encoder/layers_0/attention/mha", "prefix"), ("encoder/layers_0/mlp", "adapter")]
    # a mapping without some sites: those are dropped, with the reason
    config2, dropped2 = to_peft_config(plan, {"embeddings/word": "word"})
    assert config2["target_modules"] == ["word"]
    assert any("no PyTorch module name" in d["reason"] for d in dropped2)
    default, _ = to_peft_config(plan)
    assert "encoder.layers_0.attention.mha.query" in default["target_modules"]
    with pytest.raises(ValueError, match="map to one module name"):
        to_peft_config(plan, lambda p: "same")
    assert config["lora_dropout"] == 0.0 and config["bias"] == "none"
    dropped_saved = save_peft_config(plan, tmp_path, hf_bert_module_name, task_type="SEQ_CLS",
                                     alpha_pattern={"embeddings/word": 4.0})
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == config
    assert dropped_saved == dropped
    with pytest.raises(ValueError, match="alpha_pattern names site"):
        to_peft_config(plan, alpha_pattern={"nowhere": 1.0})


def test_hf_bert_names():
    assert hf_bert_module_name("encoder/layers_3/attention/mha/out") == "encoder.layer.3.attention.output.dense"
    assert hf_bert_module_name("encoder/layers_0/mlp/intermediate") == "encoder.layer.0.intermediate.dense"
    assert hf_bert_module_name("encoder/layers_0/mlp/output") == "encoder.layer.0.output.dense"
    assert hf_bert_module_name("pooler") == "pooler.dense"
    assert hf_bert_module_name("encoder/layers_0/mlp") is None
    assert hf_bert_module_name("encoder/layers_12/attention/mha/key") == "encoder.layer.12.attention.self.key"
    assert hf_bert_module_name("embeddings/position") == "embeddings.position_embeddings"
    assert hf_bert_module_name("classifier") == "classifier"
    assert hf_bert_module_name("decoder/layers_0/attention/mha/key") is None
