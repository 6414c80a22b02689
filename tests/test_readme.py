"""The README's "Profiling" and "Allocation" examples run, in order, on a tiny model."""

import contextlib
import io
import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# What the README leaves to the reader: a few batches of a tiny BertClassifier task.
PRELUDE = '''
import numpy as np
from layerlens_jax import BertConfig
_cfg = BertConfig.tiny()
_rng = np.random.default_rng(0)
batches = [{"input_ids": _rng.integers(1, _cfg.vocab_size, (4, 6)).astype(np.int32),
            "attention_mask": np.ones((4, 6), np.int32),
            "labels": _rng.integers(0, _cfg.num_labels, (4,)).astype(np.int32)}
           for _ in range(2)]
'''


def python_blocks(markdown: str, section: str) -> list[str]:
    """The ```python blocks under the level-2 heading ``section`` (down to the next one)."""
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    if match is None:
        raise ValueError(f"README has no section '## {section}'")
    return re.findall(r"^```python\n(.*?)^```", match.group(1), re.M | re.S)


def test_block_extraction():
    text = ("## A\n```python\nx = 1\n```\n### A.1\n```python\ny = 2\n```\n```bash\nls\n```\n"
            "## B\n```python\nz\n```\n")
    assert python_blocks(text, "A") == ["x = 1\n", "y = 2\n"]
    assert python_blocks(text, "B") == ["z\n"]
    with pytest.raises(ValueError, match="'## C'"):
        python_blocks(text, "C")


def test_profiling_and_allocation_examples_run(tmp_path, monkeypatch):
    text = README.read_text()
    blocks = python_blocks(text, "Profiling") + python_blocks(text, "Allocation")
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)  # save_plan writes plan.json into the working directory
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in [PRELUDE, *blocks]:
            exec(compile(code, str(README), "exec"), namespace)
    stats, u, plan = namespace["stats"], namespace["u"], namespace["plan"]
    assert stats.num_examples == 8 and len(stats.sites) == 28
    assert u.shape == (28,) and u.max() == 1.0
    assert "| Fisher Correlation |" in out.getvalue()
    from layerlens_jax import load_plan
    assert load_plan(tmp_path / "plan.json").assignments() == plan.assignments()
    assert plan.assignments(), "the tiny plan adapts no site"
    assert namespace["config"]["peft_type"] == "LORA"
    assert np.isfinite(plan.dual_bound - plan.objective)
    vram_plan, budget = namespace["vram_plan"], namespace["budget"]
    assert vram_plan.assignments() and vram_plan.use["vram_bytes"] <= budget
