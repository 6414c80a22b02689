"""The run directory's bookkeeping: one command at a time, stage completion markers, checkpoints.

* **Lock.** Every ``layerlens`` command holds an exclusive ``fcntl`` lock on
  ``<run>/.layerlens/lock`` for its whole length; a second command on the same directory is
  refused with "run directory ... in use by PID n".
* **Markers.** A stage that completes writes ``<run>/.layerlens/<stage>.json``: the SHA-256 of
  its inputs (the config sections it reads, the upstream files it reads) and of every file it
  wrote, and its seconds. A stage removes its own marker before it starts, so a stage that fails
  half-way never looks complete. A stage is *missing* (no marker), *partial* (an output is
  missing or differs from what the stage wrote) or *stale* (its inputs changed since); only a
  *complete* stage is read by the stages after it or skipped by ``layerlens run``.
* **Checkpoints.** :func:`write_checkpoint` writes the whole checkpoint (adapters, head, plan and
  a manifest with the SHA-256 of every file) into a temporary sibling folder, ``fsync``-s it and
  swaps it in with two renames; a failure at any point leaves the previous checkpoint in place.
  :func:`load_checkpoint` verifies every file against the manifest before reading it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from layerlens_jax._src.fileio import (atomic_write_json, fsync_dir, recover_swapped_dir,
                                      swap_dir)

__all__ = ["RunDirError", "StageInputError", "RunLock", "open_run_directory", "StageMarker",
           "stage_inputs", "stage_status", "require_stage", "write_marker", "remove_marker",
           "read_marker", "file_digest", "write_checkpoint", "load_checkpoint", "swap_in",
           "recover_checkpoint", "verify_checkpoint", "save_head", "load_head", "stage_seconds",
           "STAGES", "UPSTREAM"]

STAGES = ("profile", "plan", "train", "evaluate", "report")
BOOKKEEPING = ".layerlens"  # the folder of the lock and the markers, inside the run directory

# The stages whose outputs each stage reads (and requires complete and fresh).
UPSTREAM = {"profile": (), "plan": ("profile",), "train": ("plan",),
            "evaluate": ("plan", "train"), "report": ("profile", "plan")}

# The config keys each stage reads: a whole section ("model") or one key ("train.head").
_CONFIG_INPUTS = {
    "profile": ("run.seed", "model", "data", "profile", "utility", "train.head",
                "train.head_learning_rate"),
    "plan": ("budget", "allocate", "compare.main"),
    "train": ("model", "data", "train", "compare"),
    "evaluate": ("model", "data", "train.head", "compare.main", "compare.seeds"),
    "report": ("run.name", "run.seed", "model", "data", "profile", "utility", "budget",
               "allocate", "train", "compare"),
}
_PLAN_FILES = ("plans/uniform_lora.json", "plans/layerlens_lora.json",
               "plans/layerlens_mixed.json")
# The upstream files each stage reads (their digests are its inputs).
_FILE_INPUTS = {"profile": (), "plan": ("stats.json",), "train": _PLAN_FILES,
                "evaluate": _PLAN_FILES + ("checkpoint/manifest.json",),
                "report": ("stats.json",) + _PLAN_FILES + ("results.json",)}


class RunDirError(ValueError):
    """The run directory cannot be used (not a directory, not writable, in use)."""


class StageInputError(ValueError):
    """A stage's input in the run directory is missing, partial, stale or damaged."""


# ------------------------------------------------------------------------------------ lock


def open_run_directory(path: str | os.PathLike) -> Path:
    """Create ``path`` (and its bookkeeping folder) and check that it is a writable directory;
    :class:`RunDirError` naming the path otherwise."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"is under the file {p}"
            raise RunDirError(f"run directory {path} {what}: set run.output_dir to a directory")
    try:
        (path / BOOKKEEPING).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except PermissionError:
        raise RunDirError(f"run directory {path} is not writable") from None
    except OSError as e:
        raise RunDirError(f"run directory {path} cannot be used: {e.strerror or e}") from None
    return path


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run>/.layerlens/lock``, held from ``__enter__`` to
    ``__exit__``; the holder's PID is written into the file. :class:`RunDirError` naming that PID
    when another process holds it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / BOOKKEEPING / "lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"run directory {self.path.parent.parent} is in use by PID {holder} "
                              f"(another layerlens command); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------- hashing


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def stage_inputs(cfg_dict: Mapping[str, Any], stage: str, run_dir: Path) -> dict[str, str]:
    """``{input name: SHA-256}`` of what ``stage`` reads: ``"config <key>"`` for each config
    section or key, ``"file <path>"`` for each upstream file (``"absent"`` when it is missing)."""
    out = {}
    for key in _CONFIG_INPUTS[stage]:
        section, _, name = key.partition(".")
        value = cfg_dict[section] if not name else cfg_dict[section][name]
        out[f"config {key}"] = _json_digest(value)
    for rel in _FILE_INPUTS[stage]:
        p = run_dir / rel
        out[f"file {rel}"] = file_digest(p) if p.is_file() else "absent"
    return out


# --------------------------------------------------------------------------------- markers


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageMarker:
    """A completed stage's record, ``<run>/.layerlens/<stage>.json``."""

    # the stage's name (one of STAGES)
    stage: str
    # input name -> SHA-256 when the stage ran (see stage_inputs)
    inputs: dict[str, str]
    # output file (relative to the run directory) -> SHA-256 as the stage wrote it
    outputs: dict[str, str]
    # wall seconds the stage took
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _marker_path(run_dir: Path, stage: str) -> Path:
    return run_dir / BOOKKEEPING / f"{stage}.json"


def remove_marker(run_dir: Path, stage: str) -> None:
    """Forget that ``stage`` completed (done first thing by every stage)."""
    _marker_path(run_dir, stage).unlink(missing_ok=True)
    fsync_dir(run_dir / BOOKKEEPING)


def write_marker(run_dir: Path, stage: str, inputs: Mapping[str, str],
                 outputs: Sequence[str | os.PathLike], seconds: float) -> StageMarker:
    """Record ``stage`` as complete: its inputs and the digests of the ``outputs`` it wrote."""
    rels = sorted(os.path.relpath(os.fspath(p), run_dir) for p in outputs)
    marker = StageMarker(stage=stage, inputs=dict(inputs),
                         outputs={r: file_digest(run_dir / r) for r in rels},
                         seconds=float(seconds))
    atomic_write_json(_marker_path(run_dir, stage), marker.to_json())
    return marker


def read_marker(run_dir: Path, stage: str) -> StageMarker | None:
    """The marker of ``stage``, or None when there is none or it is unreadable."""
    try:
        d = json.loads(_marker_path(run_dir, stage).read_text())
        return StageMarker(stage=d["stage"], inputs=dict(d["inputs"]), outputs=dict(d["outputs"]),
                           seconds=float(d["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_status(run_dir: Path, stage: str, inputs: Mapping[str, str]) -> tuple[str, str]:
    """``(status, why)``: status ``"complete"``, ``"missing"``, ``"partial"`` or ``"stale"``; why
    names the culprit (the file that changed, the inputs that changed)."""
    marker = read_marker(run_dir, stage)
    if marker is None:
        return "missing", f"stage {stage} has not completed"
    for rel, digest in marker.outputs.items():
        p = run_dir / rel
        if not p.is_file():
            return "partial", f"{p} (written by `layerlens {stage}`) is missing"
        if file_digest(p) != digest:
            return "partial", f"{p} changed since `layerlens {stage}` wrote it"
    changed = sorted(k for k in set(inputs) | set(marker.inputs)
                     if inputs.get(k) != marker.inputs.get(k))
    if changed:
        return "stale", f"the inputs of `layerlens {stage}` changed since it ran: " + \
            ", ".join(changed)
    return "complete", ""


def require_stage(run_dir: Path, stage: str, cfg_dict: Mapping[str, Any]) -> None:
    """:class:`StageInputError` unless ``stage`` is complete and fresh for this config."""
    status, why = stage_status(run_dir, stage, stage_inputs(cfg_dict, stage, run_dir))
    if status != "complete":
        raise StageInputError(f"{status} stage {stage} in {run_dir}: {why}; "
                              f"rerun `layerlens {stage}` (or `layerlens run`)")


# ------------------------------------------------------------------------------ checkpoint


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> Iterator[Path]:
    for dirpath, _, names in os.walk(root):
        for n in sorted(names):
            yield Path(dirpath) / n


def swap_in(new: Path, final: Path) -> None:
    """Replace the checkpoint folder ``final`` by its complete sibling ``new``
    (:func:`~layerlens_jax._src.fileio.swap_dir`: the previous one stays on any failure)."""
    swap_dir(new, final, "checkpoint")


def recover_checkpoint(final: Path) -> None:
    """Clean up after a crash inside :func:`write_checkpoint`: delete temporary folders, and put a
    backup back when the crash came between the two renames of :func:`swap_in`."""
    parent = final.parent
    if not parent.is_dir():
        return
    for p in parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    recover_swapped_dir(final)


def write_checkpoint(final: str | os.PathLike, model, *, plan, head: tuple[str, ...],
                     metadata: Mapping[str, Any]) -> Path:
    """Write the run checkpoint (``adapters/`` via orbax, ``head.npz``, ``plan.json``,
    ``manifest.json`` with the SHA-256 of every other file) into a temporary sibling of ``final``
    and swap it in with :func:`swap_in`."""
    from layerlens_jax._src.checkpoint import save_adapters
    from layerlens_jax._src.plan import save_plan

    final = Path(final).absolute()
    recover_checkpoint(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        save_adapters(tmp / "adapters", model, plan=plan, overwrite=True, metadata=dict(metadata))
        save_head(tmp / "head.npz", model, head)
        save_plan(plan, tmp / "plan.json")
        files = {str(p.relative_to(tmp)): file_digest(p) for p in _files(tmp)}
        atomic_write_json(tmp / "manifest.json", {"format": "layerlens-jax/run-checkpoint",
                                                  "version": 1, "metadata": dict(metadata),
                                                  "files": files})
        for p in _files(tmp):
            _fsync_file(p)
        for dirpath, _, _ in os.walk(tmp):
            fsync_dir(dirpath)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, final)
    return final


def verify_checkpoint(final: Path) -> dict[str, Any]:
    """The manifest of the checkpoint at ``final``, every file checked against it;
    :class:`StageInputError` naming the first missing, damaged or foreign file."""
    mpath = final / "manifest.json"
    if not mpath.is_file():
        raise StageInputError(f"{mpath} not found: run `layerlens train` first")
    try:
        manifest = json.loads(mpath.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise StageInputError(f"{mpath} is damaged ({type(e).__name__}); "
                              f"rerun `layerlens train`") from None
    for rel, digest in files.items():
        p = final / rel
        if not p.is_file():
            raise StageInputError(f"{p} is missing from the checkpoint; rerun `layerlens train`")
        if file_digest(p) != digest:
            raise StageInputError(f"{p} does not match the checkpoint manifest (damaged, or from "
                                  f"another run); rerun `layerlens train`")
    return manifest


def load_checkpoint(final: str | os.PathLike, model, *, head: tuple[str, ...]) -> None:
    """Verify the checkpoint at ``final`` against its manifest, then restore the adapters and the
    head into ``model`` (in place)."""
    from layerlens_jax._src.checkpoint import restore_adapters

    final = Path(final).absolute()
    verify_checkpoint(final)
    restore_adapters(final / "adapters", model)
    load_head(final / "head.npz", model, head)


def head_filter(head: tuple[str, ...]):
    """The NNX filter of the task head: parameters under the top-level modules named in ``head``."""
    from flax import nnx

    def pred(path, value):
        return isinstance(value, nnx.Param) and bool(path) and str(path[0]) in head
    return pred


def _head_state(model, head: tuple[str, ...]):
    from flax import nnx

    return nnx.state(model, head_filter(head))


def save_head(path: Path, model, head: tuple[str, ...]) -> None:
    """The task head's parameters as ``.npz`` (keys: flattened paths)."""
    import numpy as np

    from layerlens_jax._src.sites import flatten_paths

    flat = {k: np.asarray(v)
            for k, v in flatten_paths(_head_state(model, head).to_pure_dict()).items()}
    with open(path, "wb") as f:
        np.savez(f, **flat)


def load_head(path: Path, model, head: tuple[str, ...]) -> None:
    """Load :func:`save_head`'s file into ``model``; :class:`StageInputError` (one line) for a
    missing, unreadable or mismatched file."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from layerlens_jax._src.sites import flatten_paths

    try:
        with np.load(path) as z:
            got = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise StageInputError(f"{path} not found: run `layerlens train` first") from None
    except Exception as e:  # noqa: BLE001 - numpy raises many types for a damaged file
        raise StageInputError(f"{path} is damaged ({type(e).__name__}); "
                              f"rerun `layerlens train`") from None
    state = _head_state(model, head)
    want = flatten_paths(state.to_pure_dict())
    if set(got) != set(want):
        raise StageInputError(f"{path}: head parameters {sorted(got)} do not match the model's "
                              f"{sorted(want)}")
    for k, v in want.items():
        if got[k].shape != v.shape:
            raise StageInputError(f"{path}: {k} has shape {got[k].shape}, the model {v.shape}")

    def fill(tree, prefix=""):
        return {k: (fill(v, f"{prefix}{k}/") if isinstance(v, dict)
                    else jnp.asarray(got[f"{prefix}{k}"])) for k, v in tree.items()}

    state.replace_by_pure_dict(fill(state.to_pure_dict()))
    nnx.update(model, state)


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """``{stage: seconds}`` of the completed stages' markers."""
    out = {}
    for s in STAGES:
        m = read_marker(run_dir, s)
        if m is not None:
            out[s] = m.seconds
    return out
