"""Several seeds of one variant trained together: one vmapped, jitted step for all of them.

:func:`train_seeds` gives the same :class:`~layerlens_jax.app.pipeline.VariantResult` per seed as
:func:`~layerlens_jax.app.pipeline.train_variant` (each seed: its own head initialisation, data
order and optimizer state; the pretrained frozen encoder held once), with the figures equal up to
float round-off (a vmapped matmul may sum in another order). On an accelerator this is how the
validation sweep runs the seeds of one configuration (``scripts/validate_task.py --vmap-seeds``):
one compile instead of one per seed, and one step per batch of all seeds (5 seeds of the
default job's LoRA step on an H100 take 0.235x the time of 5 single steps, README "Training
throughput"); on a CPU it gains nothing (1.05x), so the sweep's default there stays one seed at
a time. Variants with their own step or a reallocation hook (AdaLoRA, ``realloc_*``) are not
stacked (:func:`stackable`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence

import jax
import numpy as np

from layerlens_jax.app.pipeline import (CurvePoint, Prepared, VariantResult, _check_divergence,
                                        _endless_batches, _validate, build_variant, count_params,
                                        variant_result, variant_step)

__all__ = ["train_seeds", "stackable"]


def stackable(variant: str, *, make_step=None, reallocate=None) -> bool:
    """Whether ``variant``'s seeds can train as one vmapped step: the run's standard AdamW step
    (no step of its own) and no reallocation (which changes shapes mid-run)."""
    return make_step is None and reallocate is None and not variant.startswith("realloc_")


def train_seeds(prep: Prepared, variant: str, plan, seeds: Sequence[int], *, adapt=None
                ) -> list[VariantResult]:
    """Train ``variant`` once per seed of ``seeds``, all seeds in one vmapped step; a result per
    seed, in order. ``adapt`` as in :func:`~layerlens_jax.app.pipeline.build_variant`.

    ``train_seconds`` of each result is the stacked run's training time divided by the number of
    seeds (what a seed cost); ``step_memory_bytes`` is None (one program serves all seeds).
    A seed whose loss diverges raises :class:`~layerlens_jax.app.pipeline.DivergenceError` for
    that seed (the others are not kept)."""
    from layerlens_jax._src.train import stack_train_states, unstack_train_state

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("train_seeds: no seeds given")
    cfg = prep.cfg
    built = [build_variant(prep, variant, plan, s, adapt) for s in seeds]
    models = [m for m, _ in built]
    wrt = built[0][1]
    trainable = count_params(models[0], wrt)
    steps_states = [variant_step(prep, variant, m, wrt) for m in models]
    run, state = stack_train_states(steps_states[0][0], [s for _, s in steps_states])
    del steps_states
    streams = [_endless_batches(prep, s) for s in seeds]

    def next_batch():
        return jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *[next(b) for b in streams]))

    total, every = cfg.train.steps, cfg.train.eval_every
    curves = [[] for _ in seeds]
    window = collections.deque(maxlen=every)
    batch, eval_seconds, t0, initial = next_batch(), 0.0, time.perf_counter(), None
    for i in range(total):
        state, metrics = run(state, batch)
        window.append(metrics["loss"])
        if i == 0:  # time the steps after the first (compiling) one
            initial = np.asarray(metrics["loss"], np.float64)
            t0 = time.perf_counter()
            for s, x in zip(seeds, initial):
                _check_divergence(cfg, variant, s, 1, float(x), float(x))
        if i + 1 < total:
            batch = next_batch()
        if (i + 1) % every == 0 or i + 1 == total:
            recent = np.mean(np.asarray(jax.device_get(list(window)), np.float64), axis=0)
            te = time.perf_counter()
            for k, (s, model) in enumerate(zip(seeds, models)):
                _check_divergence(cfg, variant, s, i + 1, float(recent[k]), float(initial[k]))
                val = _validate(prep, model,
                                unstack_train_state(state, k, share_frozen=run.share_frozen))
                curves[k].append(CurvePoint(step=i + 1, train_loss=float(recent[k]),
                                            val_loss=val["loss"], val_score=val["score"]))
            eval_seconds += time.perf_counter() - te
    jax.block_until_ready(state.trainable)
    seconds = (time.perf_counter() - t0 - eval_seconds) * total / max(total - 1, 1)
    return [variant_result(prep, variant, plan, s, model, trainable=trainable, curve=curve,
                           seconds=seconds / len(seeds), memory=None)
            for s, model, curve in zip(seeds, models, curves)]
