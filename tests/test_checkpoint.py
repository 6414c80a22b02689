"""Adapter checkpoints: round trip (NNX, Linen, across), and clear errors that change nothing."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerlens_jax._src.checkpoint import (CheckpointError, read_checkpoint_metadata,
                                      restore_adapters, save_adapters)
from layerlens_jax.models import (BertClassifier, BertConfig, LinenBertClassifier,
                                  nnx_params_as_linen)
from layerlens_jax._src.peft import PEFT_FILTER, adapter_state, apply_plan, init_adapters

CFG = BertConfig.tiny()
L0 = "encoder/layers_0"
PLAN = {f"{L0}/attention/mha/query": ("lora", 2), f"{L0}/attention/mha": ("prefix", 2),
        f"{L0}/mlp": ("adapter", 3), "embeddings/word": ("lora", 2)}
EXAMPLE = (jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32))


@pytest.fixture(scope="module")
def base():
    return BertClassifier(CFG, rngs=nnx.Rngs(0))


def wrapped(base, plan=PLAN, **kw):
    return apply_plan(base, plan, example=EXAMPLE, **kw)


def randomise(model, seed):
    st = nnx.state(model, PEFT_FILTER)
    leaves, tdef = jax.tree.flatten(st)
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.unflatten(
        tdef, [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves]))
    return model


def snapshot(model):
    return jax.tree.map(np.array, adapter_state(model))


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    model = randomise(wrapped(base), 1)
    path = save_adapters(tmp_path_factory.mktemp("ck") / "run", model, plan=PLAN,
                         metadata={"step": 7})
    return path, snapshot(model)


def test_round_trip_nnx(base, saved):
    path, expected = saved
    target = randomise(wrapped(base), 2)
    assert restore_adapters(path, target) is target
    assert_same(snapshot(target), expected)
    meta = read_checkpoint_metadata(path)
    assert meta["plan"] == {k: list(v) for k, v in PLAN.items()}
    assert meta["metadata"] == {"step": 7}
    assert meta["options"]["lora_alpha"] == 16.0


def test_restore_into_linen_twin(base, saved):
    path, expected = saved
    linen = apply_plan(LinenBertClassifier(CFG), PLAN)
    variables = init_adapters(linen, jax.random.key(0), nnx_params_as_linen(base), *EXAMPLE)
    restored = restore_adapters(path, linen, variables)
    assert_same(jax.tree.map(np.array, adapter_state(linen, restored)), expected)


def test_save_refuses_to_overwrite(base, saved):
    path, _ = saved
    with pytest.raises(FileExistsError):
        save_adapters(path, wrapped(base))


def test_overwrite_and_linen_save(base, tmp_path):
    linen = apply_plan(LinenBertClassifier(CFG), PLAN)
    variables = init_adapters(linen, jax.random.key(0), nnx_params_as_linen(base), *EXAMPLE)
    p = save_adapters(tmp_path / "x", linen, variables)
    save_adapters(p, linen, variables, overwrite=True)
    target = randomise(wrapped(base), 3)
    restore_adapters(p, target)
    assert_same(snapshot(target), jax.tree.map(np.array, adapter_state(linen, variables)))


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("where", ["before_swap", "second_rename"])
def test_failed_overwrite_keeps_the_old_checkpoint(base, tmp_path, monkeypatch, where):
    from layerlens_jax._src import checkpoint as ck
    old = randomise(wrapped(base), 4)
    path = save_adapters(tmp_path / "ck", old, metadata={"step": 1})
    expected = snapshot(old)
    new = randomise(wrapped(base), 5)
    if where == "before_swap":  # the new checkpoint is fully written, the swap never starts
        def boom(root):
            assert (root / "meta" / "metadata").is_file()  # complete temporary checkpoint
            raise OSError("disk full")
        monkeypatch.setattr(ck, "_sync_tree", boom)
    else:  # old -> backup succeeded, new -> final fails
        real = os.rename

        def rename(a, b):
            if Path(b) == path and Path(a).name.startswith(".ck.tmp-"):
                assert not path.exists()  # the old one is already the backup
                raise OSError("rename failed")
            return real(a, b)
        monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(OSError, match="previous checkpoint at .* is intact"):
        save_adapters(path, new, overwrite=True, metadata={"step": 2})
    monkeypatch.undo()
    assert _siblings(path) == ["ck"]  # no temporary or backup folder left behind
    assert read_checkpoint_metadata(path)["metadata"] == {"step": 1}
    target = randomise(wrapped(base), 6)
    restore_adapters(path, target)
    assert_same(snapshot(target), expected)
    # and a normal overwrite then replaces it
    save_adapters(path, new, overwrite=True, metadata={"step": 2})
    assert _siblings(path) == ["ck"]
    assert read_checkpoint_metadata(path)["metadata"] == {"step": 2}
    restore_adapters(path, target)
    assert_same(snapshot(target), snapshot(new))


def test_backup_left_by_a_kill_between_renames_is_put_back(base, tmp_path):
    model = randomise(wrapped(base), 7)
    path = save_adapters(tmp_path / "ck", model, metadata={"step": 3})
    os.rename(path, path.with_name(".ck.old-123-abcd"))  # as if killed after the first rename
    with pytest.raises(FileExistsError):
        save_adapters(path, model)  # the backup is recovered first, so it exists again
    assert _siblings(path) == ["ck"]
    assert read_checkpoint_metadata(path)["metadata"] == {"step": 3}


@pytest.mark.parametrize("plan,kw,match", [
    ({**PLAN, "pooler": ("lora", 2)}, {}, "pooler: model.*lora.*checkpoint none"),
    ({**PLAN, "embeddings/word": ("lora", 4)}, {}, "embeddings/word"),
    ({k: v for k, v in PLAN.items() if v[0] != "prefix"}, {}, "attention/mha"),
    (PLAN, {"lora_alpha": 8.0}, "lora_alpha"),
    (PLAN, {"prefix_mode": "joint"}, "prefix_mode"),
])
def test_restore_from_different_plan_is_clear_error(base, saved, plan, kw, match):
    path, _ = saved
    target = randomise(wrapped(base, plan, **kw), 4)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=match):
        restore_adapters(path, target)
    assert_same(snapshot(target), before)


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def _data_files(path: Path):
    return [p for p in path.rglob("*") if p.is_file() and "/d/" in str(p)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage,match", [
    ("truncate", "could not be read: it is truncated or corrupted"),
    ("flip", "could not be read: it is truncated or corrupted|fails its SHA-256 check"),
    ("delete_data", "could not be read: it is truncated or corrupted"),
    ("delete_meta", "has no readable metadata"),
    ("bad_meta", "metadata lacks 'leaves'"),
    ("not_a_checkpoint", "has no readable metadata"),
])
def test_damaged_checkpoint_is_clear_error_and_changes_nothing(base, saved, tmp_path, damage,
                                                                match):
    path, _ = saved
    bad = _copy(path, tmp_path / "bad")
    if damage == "truncate":
        for f in _data_files(bad):
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        for f in _data_files(bad):
            data = bytearray(f.read_bytes())
            for i in range(len(data) // 3, len(data), 7):
                data[i] ^= 0xFF
            f.write_bytes(bytes(data))
    elif damage == "delete_data":
        for f in _data_files(bad):
            os.remove(f)
    elif damage == "delete_meta":
        os.remove(bad / "meta" / "metadata")
    elif damage == "bad_meta":
        meta = json.loads((bad / "meta" / "metadata").read_text())
        del meta["leaves"]
        (bad / "meta" / "metadata").write_text(json.dumps(meta))
    else:
        bad = tmp_path / "empty"
        bad.mkdir()
    target = randomise(wrapped(base), 5)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=match):
        restore_adapters(bad, target)
    assert_same(snapshot(target), before)


def test_tampered_values_fail_checksum(base, saved, tmp_path):
    """A value changed behind the format's back (valid file, wrong numbers) is caught."""
    path, _ = saved
    bad = _copy(path, tmp_path / "tampered")
    meta = json.loads((bad / "meta" / "metadata").read_text())
    meta["leaves"]["embeddings/word"]["peft_lora_a"]["sha256"] = "0" * 64
    (bad / "meta" / "metadata").write_text(json.dumps(meta))
    target = randomise(wrapped(base), 6)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="SHA-256"):
        restore_adapters(bad, target)
    assert_same(snapshot(target), before)


def test_save_without_adapters_is_error(base, tmp_path):
    with pytest.raises(ValueError, match="no adapters"):
        save_adapters(tmp_path / "none", base)


def test_docstring_examples_run():
    import doctest
    from layerlens_jax._src import checkpoint
    result = doctest.testmod(checkpoint)
    assert result.failed == 0 and result.attempted > 0
