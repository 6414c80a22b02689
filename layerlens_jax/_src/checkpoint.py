"""Checkpoints of adapter state + plan (orbax-checkpoint), for NNX models and Linen wrappers.

A checkpoint is an orbax composite directory with two items:

* ``adapters``: the canonical adapter state ``{site: {leaf: array}}`` (nested by path parts), the
  same for an NNX model and its Linen twin, so a checkpoint saved from one restores into the other;
* ``meta``: JSON with the format name and version, the plan (``{site: [method, size]}``), the PEFT
  options that change the maths (``lora_alpha``, ``use_rslora``, ...), for every leaf its shape,
  dtype and SHA-256, the full plan JSON when a Plan object was given, and user metadata.

Saving is crash-safe: the complete new checkpoint is written into a temporary sibling directory,
every file and folder is ``fsync``-ed, then it is swapped in with two renames (old → backup, new →
final) and the backup deleted. A failure or a kill at any point leaves the previous checkpoint
intact (a kill between the two renames leaves it as a backup, put back by the next save); an
existing checkpoint is replaced only with ``overwrite=True``. Restoring validates *everything* (format,
plan, options, shapes, dtypes, readable arrays, checksums) before writing a single value into the
model: any mismatch or damage raises :class:`CheckpointError` (a ``ValueError``) naming what is
wrong and leaves the model untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import linen as nn

from layerlens_jax._src.fileio import fsync_dir, recover_swapped_dir, swap_dir
from layerlens_jax._src.peft.apply import adapter_state, applied_plan, load_adapter_state
from layerlens_jax._src.peft.nnx_modules import Adapter, LoRA, Prefix
from layerlens_jax._src.peft.tree import flatten_tree, unflatten_tree

__all__ = ["CheckpointError", "save_adapters", "restore_adapters", "read_checkpoint_metadata",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "layerlens-jax/adapters"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into this model (mismatch, truncation, corruption)."""


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: slow import, only needed here
    return ocp


def _model_options(model: Any) -> dict[str, Any]:
    """The options that change the adapter maths, for the methods the model actually uses."""
    out: dict[str, Any] = {}
    if isinstance(model, nn.Module):
        methods = {m for _, m, _ in model.assignments}
        o = model.options
        if "lora" in methods:
            out.update(lora_alpha=float(o.lora_alpha), use_rslora=bool(o.use_rslora))
        if "adapter" in methods:
            out.update(adapter_activation=o.adapter_activation)
        if "prefix" in methods:
            out.update(prefix_mode=o.prefix_mode, prefix_reparam_hidden=o.prefix_reparam_hidden)
        return out
    from flax import nnx
    per_site: dict[str, dict[str, Any]] = {}
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoRA):
            per_site[m.site] = dict(lora_alpha=m.alpha, use_rslora=m.use_rslora)
        elif isinstance(m, Adapter):
            per_site[m.site] = dict(adapter_activation=m.activation)
        elif isinstance(m, Prefix):
            per_site[m.site] = dict(prefix_mode=m.mode, prefix_reparam_hidden=m.reparam_hidden)
    for site in sorted(per_site):
        for k, v in per_site[site].items():
            if k in out and out[k] != v:
                raise CheckpointError(f"sites disagree on option {k!r} ({out[k]!r} vs {v!r} at "
                                      f"{site!r}); one checkpoint records one value per option")
            out[k] = v
    return out


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _plan_json(plan: Any) -> Any:
    if plan is None:
        return None
    for attr in ("to_json", "to_dict"):
        fn = getattr(plan, attr, None)
        if callable(fn):
            out = fn()
            return json.loads(out) if isinstance(out, str) else out
    if isinstance(plan, Mapping):
        return {str(k): list(v) if isinstance(v, tuple) else v for k, v in plan.items()}
    raise TypeError(f"cannot serialise plan of type {type(plan).__name__}")


def save_adapters(directory: str | os.PathLike, model: Any, variables: Mapping | None = None, *,
                  plan: Any = None, overwrite: bool = False,
                  metadata: Mapping[str, Any] | None = None) -> Path:
    """Save the adapter state of ``model`` (NNX) or ``(model, variables)`` (Linen ``PeftLinen``).

    Only the adapter leaves (``peft_*``) are saved, with the plan, the PEFT options that change the
    maths and a SHA-256 per leaf (see the module docstring); the base weights are not.

    Args:
      directory: the checkpoint directory to create (written crash-safely: see the module
        docstring).
      model: a wrapped NNX model, or a :class:`~layerlens_jax._src.peft.linen.PeftLinen`.
      variables: Linen only: the wrapper's variables.
      plan: optionally the Plan object (its JSON is stored alongside).
      overwrite: replace an existing checkpoint at ``directory``; the old one is removed only once
        the new one is complete on disk.
      metadata: JSON-serialisable user metadata, returned by :func:`read_checkpoint_metadata`.

    Returns:
      The absolute path of the checkpoint.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False.
      ValueError: the model carries no adapters.
      CheckpointError: sites of the model disagree on an option (one value per option is stored).
      TypeError: ``plan`` cannot be serialised.
      OSError: writing or swapping in the new checkpoint failed; the message says that the
        previous checkpoint (if any) is intact.

    >>> import pathlib, tempfile
    >>> from flax import nnx
    >>> from layerlens_jax.models import MLP
    >>> from layerlens_jax._src.peft import apply_plan
    >>> model = apply_plan(MLP((4, 8, 2), rngs=nnx.Rngs(0)), {"layers_0": ("lora", 2)})
    >>> path = save_adapters(pathlib.Path(tempfile.mkdtemp()) / "ckpt", model)
    >>> read_checkpoint_metadata(path)["assignments"]
    {'layers_0': ['lora', 2]}
    """
    path = Path(directory).absolute()
    recover_swapped_dir(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    state = adapter_state(model, variables)
    if not state:
        raise ValueError("the model carries no adapters (apply_plan first)")
    host = {site: {leaf: np.asarray(jax.device_get(v)) for leaf, v in leaves.items()}
            for site, leaves in state.items()}
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "assignments": {s: [m, int(z)] for s, (m, z) in sorted(applied_plan(model).items())},
        "options": _model_options(model),
        "leaves": {site: {leaf: {"shape": list(a.shape), "dtype": a.dtype.name,
                                 "sha256": _digest(a)} for leaf, a in leaves.items()}
                   for site, leaves in host.items()},
        "plan": _plan_json(plan),
        "metadata": dict(metadata or {}),
    }
    tree = unflatten_tree({tuple(site.split("/")) + (leaf,): a
                       for site, leaves in host.items() for leaf, a in leaves.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        ocp = _ocp()
        ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
            tmp, args=ocp.args.Composite(adapters=ocp.args.StandardSave(tree),
                                         meta=ocp.args.JsonSave(meta)))
        _sync_tree(tmp)
    except BaseException as e:
        for p in path.parent.glob(f"{tmp.name}*"):  # with orbax's own temporary folder
            shutil.rmtree(p, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        raise OSError(f"checkpoint {path} not written ({type(e).__name__}: {e}); "
                      f"{_kept(path)}") from e
    swap_dir(tmp, path, "checkpoint")
    return path


def _kept(path: Path) -> str:
    return (f"the previous checkpoint at {path} is intact" if path.exists()
            else "no checkpoint was there before")


def _sync_tree(root: Path) -> None:
    """``fsync`` every file and folder under ``root`` (and its parent) so the checkpoint is
    complete on disk before it is swapped in."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
    fsync_dir(root.parent)


def read_checkpoint_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` JSON of a checkpoint (plan, options, leaf shapes); :class:`CheckpointError` when
    it is missing, unreadable or not a layerlens adapter checkpoint."""
    path = Path(directory).absolute()
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    meta_file = path / "meta" / "metadata"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable metadata ({meta_file}): it is "
                              f"truncated, corrupted or not a layerlens adapter checkpoint "
                              f"({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a layerlens adapter checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}; this "
                              f"code reads version {FORMAT_VERSION}")
    for key in ("assignments", "options", "leaves"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"checkpoint {path} metadata lacks {key!r}: corrupted")
    return meta


def _plan_diff(model_plan: Mapping[str, tuple[str, int]], ckpt_plan: Mapping[str, Any]) -> list[str]:
    diffs = []
    for site in sorted(set(model_plan) | set(ckpt_plan)):
        a = model_plan.get(site)
        b = tuple(ckpt_plan[site]) if site in ckpt_plan else None
        if a != b:
            diffs.append(f"{site}: model {a if a else 'none'} vs checkpoint {b if b else 'none'}")
    return diffs


def restore_adapters(directory: str | os.PathLike, model: Any, variables: Mapping | None = None):
    """Restore adapter state saved by :func:`save_adapters` into ``model``.

    Everything is validated (format, plan, options, shapes, dtypes, readable arrays, checksums)
    before a single value is written, so on any error the model is unchanged. A checkpoint saved
    from an NNX model restores into its Linen twin and the other way round.

    Args:
      directory: a checkpoint written by :func:`save_adapters`.
      model: a wrapped NNX model, or a :class:`~layerlens_jax._src.peft.linen.PeftLinen`, carrying
        the same plan (sites, methods, sizes) and PEFT options as the saved one.
      variables: Linen only: the wrapper's variables (adapters initialised).

    Returns:
      NNX: ``model`` itself, updated in place. Linen: new variables with the restored adapters.

    Raises:
      CheckpointError: (a ``ValueError``) no checkpoint, a different plan or options, a leaf of
        another shape or dtype, or a truncated / corrupted checkpoint; the message names the culprit.

    >>> import pathlib, tempfile
    >>> from flax import nnx
    >>> from layerlens_jax.models import MLP
    >>> from layerlens_jax._src.peft import apply_plan
    >>> plan = {"layers_0": ("lora", 2)}
    >>> model = apply_plan(MLP((4, 8, 2), rngs=nnx.Rngs(0)), plan)
    >>> path = save_adapters(pathlib.Path(tempfile.mkdtemp()) / "ckpt", model)
    >>> other = apply_plan(MLP((4, 8, 2), rngs=nnx.Rngs(0)), plan, seed=1)  # other adapter init
    >>> restored = restore_adapters(path, other)
    >>> bool((restored.layers_0.peft_lora_a[...] == model.layers_0.peft_lora_a[...]).all())
    True
    """
    path = Path(directory).absolute()
    meta = read_checkpoint_metadata(path)
    diffs = _plan_diff(applied_plan(model), meta["assignments"])
    if diffs:
        raise CheckpointError(f"checkpoint {path} was saved from a different plan than the "
                              f"model's: " + "; ".join(diffs[:8])
                              + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else ""))
    mine = _model_options(model)
    theirs = meta["options"]
    opt_diffs = [f"{k}: model {mine.get(k)!r} vs checkpoint {theirs.get(k)!r}"
                 for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if opt_diffs:
        raise CheckpointError(f"checkpoint {path} was saved with different PEFT options: "
                              + "; ".join(opt_diffs))
    current = adapter_state(model, variables)
    expected = {site: {leaf: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype)
                       for leaf, v in leaves.items()} for site, leaves in current.items()}
    recorded = meta["leaves"]
    for site, leaves in expected.items():
        rec = recorded.get(site)
        if rec is None or set(rec) != set(leaves):
            raise CheckpointError(f"checkpoint {path} has leaves {sorted(rec or [])} for site "
                                  f"{site!r}; the model has {sorted(leaves)}")
        for leaf, sds in leaves.items():
            r = rec[leaf]
            if tuple(r.get("shape", ())) != sds.shape or r.get("dtype") != np.dtype(sds.dtype).name:
                raise CheckpointError(f"checkpoint {path} leaf {site}/{leaf} is "
                                      f"{r.get('dtype')}{tuple(r.get('shape', ()))}; the model "
                                      f"expects {np.dtype(sds.dtype).name}{sds.shape}")
    abstract = unflatten_tree({tuple(site.split("/")) + (leaf,): sds
                           for site, leaves in expected.items() for leaf, sds in leaves.items()})
    ocp = _ocp()
    try:
        restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
            path, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(abstract)))["adapters"]
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
        raise CheckpointError(f"checkpoint {path} could not be read: it is truncated or corrupted "
                              f"({type(e).__name__}: {str(e)[:300]})") from e
    flat = flatten_tree(restored)
    state: dict[str, dict[str, np.ndarray]] = {}
    for site, leaves in expected.items():
        for leaf in leaves:
            key = tuple(site.split("/")) + (leaf,)
            if key not in flat:
                raise CheckpointError(f"checkpoint {path} lacks array {site}/{leaf}: truncated")
            arr = np.asarray(flat[key])
            if _digest(arr) != recorded[site][leaf].get("sha256"):
                raise CheckpointError(f"checkpoint {path} array {site}/{leaf} fails its SHA-256 "
                                      f"check: the file is corrupted")
            state.setdefault(site, {})[leaf] = arr
    return load_adapter_state(model, state, variables)
