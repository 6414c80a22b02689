"""Config validation: defaults, bundled configs, bad values and files named in the error.
(The CLI's tests are in test_cli.py, the pipeline's in test_pipeline.py.)"""

import pytest

from layerlens_jax.app.config import ConfigError, config_from_dict, load_config


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
    ({"allocate": {"tie": "kinds"}}, r"allocate.tie must be"),
    ({"budget": {"vram_bytes": 2e8}}, r"compare.main = 'gora_floor' is sized by the parameter budget only"),
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
