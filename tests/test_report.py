"""The run report: every input reaches report.md (each plan's section, the figures, the table,
the verdict, the plots, the config), and the plots are written as PNG files."""

import json

from layerlens_jax.app.report import plot_curves, plot_utility, write_report

PLANS = {
    "uniform_lora": "# Plan uniform_lora\n\n| metric | value |\n|---|---:|\n| params | 4,096 |",
    "layerlens_lora": "# Plan layerlens_lora\n\n## Budget\n\nused 3,987 of 4,096 params",
    "layerlens_mixed": "# Plan layerlens_mixed\n\nSpearman 0.8123 (p=0.0042)",
}
STATS = {"sites": [{"site": "a"}, {"site": "b"}, {"site": "c"}], "num_examples": 123,
         "num_tokens": 4567, "num_batches": 8}
CONFIG = {"run": {"name": "tiny"}, "train": {"steps": 17}}


def _write(tmp_path, **overrides):
    kwargs = dict(title="Run `tiny` (trec6)", config=CONFIG, stats_json=STATS,
                  utility_md="| utility check | 0.9731 |", plan_sections=PLANS,
                  comparison_md="| uniform_lora | 85.00 ± 4.08 |",
                  verdict="layerlens_lora vs uniform_lora: +1.23 accuracy points",
                  images=[str(tmp_path / "utility.png"), str(tmp_path / "curves.png")])
    kwargs.update(overrides)
    path = write_report(tmp_path / "out" / "report.md", **kwargs)
    assert path == tmp_path / "out" / "report.md"
    return path.read_text()


def test_report_has_every_plan_section_and_the_input_figures(tmp_path):
    text = _write(tmp_path)
    lines = text.splitlines()
    assert lines[0] == "# Run `tiny` (trec6)"
    # each plan's section, its headings one level down, in the given order
    starts = [lines.index(f"## Plan {name}") for name in PLANS]
    assert starts == sorted(starts)
    assert "### Budget" in lines
    for body in ("| params | 4,096 |", "used 3,987 of 4,096 params", "Spearman 0.8123 (p=0.0042)"):
        assert body in lines
    # the utility section and the profile's figures
    assert lines.index("## Utility Score Validation") < starts[0]
    assert "| utility check | 0.9731 |" in lines
    assert "Profiled 3 sites on 123 examples (4567 tokens, 8 batches)." in lines
    # the comparison after the plans, then the verdict
    perf = lines.index("## Task Performance")
    assert perf > starts[-1]
    assert lines[perf + 2] == "| uniform_lora | 85.00 ± 4.08 |"
    assert lines[perf + 4] == "layerlens_lora vs uniform_lora: +1.23 accuracy points"
    # plots linked by file name (they sit next to the report); the config as JSON
    assert "![utility](utility.png)" in lines and "![curves](curves.png)" in lines
    cfg_at = lines.index("## Configuration")
    block = text.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert cfg_at > perf and json.loads(block) == CONFIG


def test_report_without_training_results_has_no_performance_section(tmp_path):
    text = _write(tmp_path, comparison_md=None, verdict="ignored without a comparison")
    assert "## Task Performance" not in text and "ignored" not in text
    assert all(f"## Plan {name}" in text.splitlines() for name in PLANS)


def test_report_replaces_an_older_report(tmp_path):
    _write(tmp_path, title="old")
    text = _write(tmp_path, title="new")
    assert text.startswith("# new\n")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.md"]  # no temp files left


def test_plots_write_png_files(tmp_path):
    stats = {"sites": [{"site": f"encoder/layers_{i}/attention/mha/query", "utility": u,
                        "fisher_trace": 2 * u, "grad_norm": 3 * u}
                       for i, u in enumerate([0.5, 0.25, 0.125])]}
    curve = [{"step": s, "train_loss": 1 / s, "val_loss": 1 / s, "val_score": s / 10}
             for s in (1, 2)]
    results = [{"variant": v, "seed": seed, "curve": curve}
               for seed in (0, 1) for v in ("uniform_lora", "head_only")]
    for path in (plot_utility(stats, tmp_path / "u.png"),
                 plot_curves(results, tmp_path / "c.png")):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, path

