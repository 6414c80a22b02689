"""The comparison of a run's variants: mean ± std over seeds per variant (``results.json``'s
``"summary"``) and its Markdown table, as the CLI prints it and the report shows it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from layerlens_jax.app.pipeline import VariantResult

__all__ = ["summarise", "comparison_markdown", "METRIC_NAMES"]


def summarise(results: Sequence[VariantResult],
              plans: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Mean ± std over seeds per variant (population std over the seeds run), in the order the
    variants first appear. Rows are JSON-ready dicts: ``results.json``'s ``"summary"``, which
    :func:`comparison_markdown` and the report read back. ``predicted_step_memory_bytes``: the
    plan's whole-step prediction (None without a step profile or a plan)."""
    rows = []
    for variant in dict.fromkeys(r.variant for r in results):
        rs = [r for r in results if r.variant == variant]
        acc = np.array([r.test_score for r in rs]) * 100
        val = np.array([r.val_score for r in rs]) * 100
        rows.append({"variant": variant, "seeds": [r.seed for r in rs], "metric": rs[0].metric,
                     "test_score_mean": float(acc.mean()), "test_score_std": float(acc.std()),
                     "val_score_mean": float(val.mean()), "val_score_std": float(val.std()),
                     "trainable_params": rs[0].trainable_params,
                     "adapter_params": rs[0].adapter_params,
                     "train_seconds_mean": float(np.mean([r.train_seconds for r in rs])),
                     "step_memory_bytes": rs[0].step_memory_bytes,
                     "predicted_step_memory_bytes": _predicted_memory((plans or {}).get(variant))})
    return rows


def _predicted_memory(plan) -> float | None:
    """The whole-step memory a plan predicts (``use`` with a step profile), else None."""
    if plan is None or "step_cost" not in plan.metadata:
        return None
    return float(plan.use["vram_bytes"])


#: how tables name a metric (scores are shown in percent: accuracy x 100, R² x 100)
METRIC_NAMES = {"accuracy": "acc.", "r2": "R²"}


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown comparison table of :func:`summarise`'s rows (as written or read back)."""
    name = METRIC_NAMES[rows[0].get("metric", "accuracy")] if rows else "acc."
    lines = [f"| variant | test {name} % (mean ± std) | val {name} % | adapter params | trainable "
             "params (incl. head) | train s | step memory MiB: XLA (predicted) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "n/a" if r["step_memory_bytes"] is None else f"{r['step_memory_bytes'] / 2**20:.0f}"
        if r.get("predicted_step_memory_bytes") is not None:
            mem += f" ({r['predicted_step_memory_bytes'] / 2**20:.0f})"
        ap = "—" if r["adapter_params"] is None else f"{r['adapter_params']:,}"
        lines.append(f"| {r['variant']} | {r['test_score_mean']:.2f} ± {r['test_score_std']:.2f}"
                     f" | {r['val_score_mean']:.2f} ± {r['val_score_std']:.2f} | {ap} | "
                     f"{r['trainable_params']:,} | {r['train_seconds_mean']:.1f} | {mem} |")
    return "\n".join(lines)
