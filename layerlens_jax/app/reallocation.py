"""The reallocate step of a training run: re-profile the adapted model part-way through training,
re-solve the plan under the same budgets and resize the LoRA adapters in place, keeping the learned
factors and the optimizer state (:mod:`layerlens_jax._src.reallocate`).

:func:`reallocation_hook` builds the callback :func:`~layerlens_jax.app.pipeline.train_variant`
calls after each step (``reallocate=``). At each chosen step it writes the current state back into
the model, profiles a merged clone on fresh training batches (``profile.batches`` of them, exact
Fisher, the run's utility settings), allocates with the caller's settings (the same ``min_size`` floor, gain model and
catalogue sizes as the initial plan), resizes, rebuilds the train step (one recompile per
reallocation) and carries the optimizer state over. Its wall clock is recorded per reallocation.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax

__all__ = ["Reallocation", "reallocation_hook"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reallocation:
    """What one reallocation did."""

    # the training step after which it ran
    step: int
    # seconds: write-back, profile, allocate, resize, recompile and state transfer together
    seconds: float
    # site -> "kept" | "shrunk" | "grown" | "dropped" | "added" (sites whose rank stayed 0 left out)
    changes: Mapping[str, str]
    # the new plan's parameter count (never above the initial plan's budget)
    params: float

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "seconds": self.seconds, "params": self.params,
                "changes": dict(self.changes)}


def reallocation_hook(prep, variant: str, plan, sites: Sequence, *, at: Sequence[float],
                      wrt, make_step=None, allocate_options: Mapping[str, Any] | None = None
                      ) -> tuple[Callable, list[Reallocation]]:
    """``(hook, log)``: ``hook(i, model, step_fn, state) -> (step_fn, state)`` reallocates after
    step ``i + 1`` when that is one of ``round(f * train.steps)`` for ``f`` in ``at`` (fractions in
    (0, 1)) and returns its inputs unchanged otherwise; ``log`` collects a :class:`Reallocation`
    per reallocation. ``plan``: the run's LoRA-only plan; ``sites``: the base model's sites;
    ``wrt`` / ``make_step``: as for :func:`~layerlens_jax.app.pipeline.variant_step`."""
    from layerlens_jax._src.reallocate import (lora_ranks, merged_utility, reallocate_plan,
                                               resize_lora, transfer_optimizer_state)
    from layerlens_jax._src.train import write_back
    from layerlens_jax._src.utility import UtilityConfig
    from layerlens_jax.app.data import iterate_batches
    from layerlens_jax.app.pipeline import task_loss, variant_step, variant_tx

    cfg = prep.cfg
    steps = cfg.train.steps
    bad = [f for f in at if not 0.0 < f < 1.0]
    if bad:
        raise ValueError(f"reallocation fractions must lie in (0, 1), got {bad[0]!r}")
    when = {max(1, min(steps - 1, int(round(f * steps)))) for f in at}
    log: list[Reallocation] = []
    current = {"plan": plan}
    ucfg = UtilityConfig(**dataclasses.asdict(cfg.utility))

    def hook(i: int, model, step_fn, state):
        if i + 1 not in when:
            return step_fn, state
        t0 = time.perf_counter()
        write_back(model, state)
        batches = iterate_batches(prep.arrays["train"], cfg.data.batch_size,
                                  seed=cfg.run.seed + i + 1, epoch=20_000)
        u = merged_utility(model, task_loss, batches, sites, config=ucfg,
                           max_batches=cfg.profile.batches, progress=False)
        new = reallocate_plan(model, current["plan"], sites, u, **dict(allocate_options or {}))
        ranks = lora_ranks(new)
        changes = resize_lora(model, ranks, seed=cfg.run.seed + i + 1)
        tx = variant_tx(prep, variant)
        new_step, fresh = variant_step(prep, variant, model, wrt, make_step)
        state = fresh._replace(step=state.step, opt_state=transfer_optimizer_state(
            tx, state.trainable, state.opt_state, fresh.trainable))
        jax.block_until_ready(state.trainable)
        current["plan"] = new
        log.append(Reallocation(step=i + 1, seconds=time.perf_counter() - t0,
                                changes={k: v for k, v in changes.items()
                                         if not (v == "kept" and not ranks.get(k))},
                                params=float(new.use["params"])))
        return new_step, state

    return hook, log
