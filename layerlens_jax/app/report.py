"""The run report: Markdown in the seed report's style and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from layerlens_jax._src.fileio import atomic_write_text

__all__ = ["plot_utility", "plot_allocation", "plot_budget_use", "plot_curves", "write_report"]

_METHOD_COLORS = {"none": "#cccccc", "lora": "#1f77b4", "adapter": "#2ca02c", "prefix": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    _plt().close(fig)
    return path


def _short(path: str) -> str:
    return (path.replace("encoder/layers_", "L").replace("/attention/mha/", "/attn.")
            .replace("/attention", "/attn").replace("embeddings/", "emb."))


def plot_utility(stats_json: Mapping[str, Any], path: Path) -> Path:
    """Utility per site (bars), with the normalised Fisher trace and grad norm as markers."""
    plt = _plt()
    rows = stats_json["sites"]
    names = [_short(r["site"]) for r in rows]
    u = np.array([r["utility"] for r in rows])
    f = np.array([r["fisher_trace"] for r in rows])
    g = np.array([r["grad_norm"] for r in rows])
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(rows)), 4))
    ax.bar(x, u, color="#1f77b4", label="utility")
    ax.plot(x, f / f.max(), "k.", label="fisher_trace / max")
    ax.plot(x, g / g.max(), "r+", label="grad_norm / max")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.set_ylabel("score (log)")
    ax.set_title("Utility per site")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_allocation(plans: Mapping[str, Any], path: Path) -> Path:
    """Method (colour) and size (bar height) per site, one panel per plan."""
    plt = _plt()
    fig, axes = plt.subplots(len(plans), 1, figsize=(10, 2.4 * len(plans)), squeeze=False,
                             sharex=True)
    for ax, (name, plan) in zip(axes[:, 0], plans.items()):
        allocs = plan.allocations
        x = np.arange(len(allocs))
        ax.bar(x, [a.size for a in allocs], color=[_METHOD_COLORS[a.method] for a in allocs])
        ax.set_ylabel("size")
        ax.set_title(f"{name}: {plan.use['params']:,.0f} params", fontsize=9)
        ax.set_xticks(x, [_short(a.site) for a in allocs], rotation=90, fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _METHOD_COLORS.values()]
    axes[0, 0].legend(handles, list(_METHOD_COLORS), fontsize=7, ncol=4)
    return _save(fig, path)


def plot_budget_use(plans: Mapping[str, Any], path: Path) -> Path:
    """Use / budget per resource with a finite budget, per plan."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(plans)
    resources = sorted({r for p in plans.values() for r, b in p.budgets.items() if np.isfinite(b)})
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        p = plans[name]
        vals = [p.use[r] / p.budgets[r] * 100 if r in p.budgets and np.isfinite(p.budgets[r])
                else 0.0 for r in resources]
        ax.bar(np.arange(len(resources)) + i * width, vals, width, label=name)
    ax.axhline(100, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(resources)) + width * (len(names) - 1) / 2, resources)
    ax.set_ylabel("use / budget (%)")
    ax.set_title("Budget use")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_curves(results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Training loss and validation score (accuracy or R²) over steps, per variant and seed."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = {}
    for r in results:
        c = colors.setdefault(r["variant"], f"C{len(colors)}")
        steps = [p["step"] for p in r["curve"]]
        a1.plot(steps, [p["train_loss"] for p in r["curve"]], color=c, alpha=0.8,
                label=r["variant"] if r["seed"] == results[0]["seed"] else None)
        a2.plot(steps, [100 * p["val_score"] for p in r["curve"]], color=c, alpha=0.8)
    a1.set_xlabel("step"), a1.set_ylabel("train loss"), a1.legend(fontsize=7)
    metric = {"r2": "R²"}.get(results[0].get("metric", "accuracy"), "accuracy") if results else ""
    a2.set_xlabel("step"), a2.set_ylabel(f"validation {metric} (%)")
    fig.suptitle("Training curves")
    return _save(fig, path)


def _demote(md: str) -> str:
    """Push every Markdown heading one level down (a section's "# Title" becomes "## Title")."""
    return "\n".join("#" + line if line.startswith("#") else line for line in md.splitlines())


def write_report(path: Path, *, title: str, config: Mapping[str, Any], stats_json: Mapping,
                 utility_md: str, plan_sections: Mapping[str, str], comparison_md: str | None,
                 verdict: str | None, images: Sequence[str], timings: str | None = None,
                 diverged: Sequence[str] = ()) -> Path:
    """Write ``report.md``: the utility validation and profile figures, one section per plan
    (each Markdown demoted one heading level), the task comparison and verdict when given, the
    plots (linked by file name, next to the report), the variants whose training diverged, the
    stage timings and the config as JSON."""
    lines = [f"# {title}", "", "## Utility Score Validation", "", utility_md, ""]
    lines += [f"Profiled {len(stats_json['sites'])} sites on {stats_json['num_examples']} examples "
              f"({stats_json['num_tokens']} tokens, {stats_json['num_batches']} batches).", ""]
    for md in plan_sections.values():
        lines += [_demote(md), ""]
    if comparison_md:
        lines += ["## Task Performance", "", comparison_md, ""]
        if verdict:
            lines += [verdict, ""]
    if diverged:
        lines += ["## Diverged", ""] + [f"- {d}" for d in diverged] + [""]
    if timings:
        lines += ["## Stage Timings", "", f"{timings}.", ""]
    lines += ["## Plots", ""] + [f"![{Path(i).stem}]({Path(i).name})" for i in images] + [""]
    lines += ["## Configuration", "", "```json", json.dumps(config, indent=2), "```", ""]
    atomic_write_text(path, "\n".join(lines))
    return path
