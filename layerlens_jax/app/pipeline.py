"""The end-to-end job: profile → utility → plans → train → evaluate → report, on real data.
(``stats.json`` is read and written by :mod:`~layerlens_jax.app.stats_file`, the plans made by
:mod:`~layerlens_jax.app.plans`, in-training reallocation by :mod:`~layerlens_jax.app.reallocation`.)

Every stage is a function of the :class:`~layerlens_jax.app.config.RunConfig` and the files that the
previous stages wrote to the run directory, so the CLI can run them one at a time or all in order:

====================  ==========================================================================
``stats.json``        per-site statistics and the utility (``profile``)
``plans/*.json``      one plan per plan variant; ``plan.json`` the main one; ``adapter_config.json``
                      its HF PEFT export (``plan``)
``results.json``      per variant and seed: score (accuracy, or R² for regression), trainable
                      parameters, time, memory, curves;
                      diverged variants; stage seconds (``train``); ``checkpoint/`` the main
                      plan's adapters + head + plan + manifest, seed 0 (app.rundir)
``evaluation.json``   the main checkpoint re-evaluated from disk (``evaluate``)
``report.md``, PNGs   the report (``report``)
``.layerlens/``       the lock and each stage's completion marker (app.rundir)
====================  ==========================================================================

Variants (one name each everywhere): ``uniform_lora`` (LoRA of the reference rank on the
reference targets of every layer: the baseline whose parameter count sets the budget),
``layerlens_lora`` (a LoRA-only plan from the utility), ``layerlens_mixed`` (LoRA / Adapter /
Prefix / none), ``head_only`` (only the task head trains) and ``full`` (full fine-tuning). The
task head (fresh pooler + classifier) trains in every variant and is never allocated. Every
variant of a seed sees the same data order, the same head initialisation and the same optimizer
settings; the test split is read only to report.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from layerlens_jax._src.fileio import atomic_write_json
from layerlens_jax.app.config import RunConfig
from layerlens_jax.app.rundir import head_filter
from layerlens_jax.models import BertClassifier, BertConfig
from layerlens_jax._src.profile import LayerStats, profile, sampled_label_loss
from layerlens_jax._src.sites import Site, discover_sites
from layerlens_jax._src.utility import UtilityConfig, utility, utility_report

__all__ = ["Prepared", "CurvePoint", "VariantResult", "prepare", "classification_loss", "task_loss",
           "run_profile", "build_variant", "train_variant", "evaluate_split",
           "write_json", "DivergenceError", "check_arrays"]


# ----------------------------------------------------------------------------------- files


write_json = atomic_write_json


# ------------------------------------------------------------------------------- preparation


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prepared:
    """A task ready to train on: every split tokenised once, and a model builder. Read-only;
    derive a variant with ``dataclasses.replace`` (e.g. another config on the same arrays)."""

    # the run's configuration
    cfg: RunConfig
    # class names, index = label id; () for a regression task (float targets, one output)
    label_names: tuple[str, ...]
    # split ("train", "validation", "test") -> encoded arrays (input_ids, attention_mask,
    # token_type_ids, labels), all of the split's length
    arrays: dict[str, dict[str, np.ndarray]]
    # the configuration of the models that build_model returns
    model_config: BertConfig
    # seed -> a fresh model: the encoder (pretrained, or random from the seed) and a task head
    # initialised from the seed
    build_model: Callable[[int], BertClassifier]
    # split -> number of examples
    sizes: dict[str, int]

    @property
    def metric(self) -> str:
        """The task's score: ``"accuracy"`` (classification) or ``"r2"`` (regression, R²)."""
        return "accuracy" if self.label_names else "r2"

    def example(self) -> dict[str, Any]:
        b = {k: v[:2] for k, v in self.arrays["train"].items()}
        return {"args": (b["input_ids"],), "kwargs": {"attention_mask": b["attention_mask"]}}


def prepare(cfg: RunConfig) -> Prepared:
    """Load the task and tokenise every split once; a builder for the model."""
    from layerlens_jax.app.data import encode_split, load_task_from_config
    from layerlens_jax.app.pretrained import load_pretrained_bert, load_tokenizer

    task = load_task_from_config(cfg.data)
    num_labels = task.num_labels  # 1 for regression
    if cfg.model.source == "pretrained":
        tok = load_tokenizer(max_length=cfg.model.max_length)

        def build(seed: int) -> BertClassifier:
            return load_pretrained_bert(num_labels=num_labels, seed=seed,
                                        pooling=cfg.model.pooling)
    else:
        tok = load_tokenizer(max_length=cfg.model.max_length)
        base = BertConfig.tiny() if cfg.model.size == "tiny" else BertConfig.minilm_l6()
        mcfg = dataclasses.replace(base, vocab_size=tok.get_vocab_size(), num_labels=num_labels,
                                   pooling=cfg.model.pooling,
                                   max_position=max(base.max_position, cfg.model.max_length))

        def build(seed: int) -> BertClassifier:
            return BertClassifier(mcfg, rngs=nnx.Rngs(seed))
    arrays = {split: encode_split(task[split], tok, cfg.model.max_length)
              for split in ("train", "validation", "test")}
    model_config = build(0).config
    check_arrays(cfg, arrays, num_labels=len(task.label_names), vocab_size=model_config.vocab_size)
    return Prepared(cfg=cfg, label_names=tuple(task.label_names), arrays=arrays,
                    model_config=model_config, build_model=build,
                    sizes={s: len(a["labels"]) for s, a in arrays.items()})


def check_arrays(cfg: RunConfig, arrays: Mapping[str, Mapping[str, np.ndarray]], *,
                 num_labels: int, vocab_size: int) -> None:
    """ValueError (one line, naming the split, the key and both numbers) unless training has at
    least one full batch, validation and test are not empty, every label is in
    ``[0, num_labels)`` (``num_labels = 0``: regression, every target finite) and every token id in
    ``[0, vocab_size)``."""
    n_train = len(arrays["train"]["labels"])
    if n_train < cfg.data.batch_size:
        raise ValueError(f"the training split has {n_train} examples, fewer than data.batch_size "
                         f"= {cfg.data.batch_size}: no full batch to train on (raise "
                         f"data.max_examples / data.train_examples or lower data.batch_size)")
    for split, a in arrays.items():
        if len(a["labels"]) == 0:
            raise ValueError(f"the {split} split of data.task {cfg.data.task!r} is empty "
                             f"(raise data.max_examples)")
        if not num_labels:
            bad = ~np.isfinite(a["labels"])
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"the {split} split has target {a['labels'][i]} at example {i}, "
                                 f"not a finite number")
            continue
        bad = (a["labels"] < 0) | (a["labels"] >= num_labels)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"the {split} split has label {int(a['labels'][i])} at example {i}, "
                             f"outside [0, {num_labels}) for {num_labels} classes")
        ids = a["input_ids"]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            v = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"the {split} split has token id {v}, outside the model's vocabulary "
                             f"[0, {vocab_size})")


def classification_loss(model, batch) -> jax.Array:
    """Per-example cross-entropy (B,)."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


def task_loss(model, batch) -> jax.Array:
    """Per-example loss (B,) of the task the batch belongs to: cross-entropy for integer labels,
    squared error of the single output for float targets (regression). Chosen by the labels'
    dtype, which is static under jit."""
    if jnp.issubdtype(batch["labels"].dtype, jnp.floating):
        pred = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[:, 0]
        return jnp.square(pred - batch["labels"])
    return classification_loss(model, batch)


def _mean_loss(model, batch):
    w = batch["example_mask"]
    return jnp.sum(task_loss(model, batch) * w) / jnp.maximum(jnp.sum(w), 1.0)


def _logits(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


# -------------------------------------------------------------------------------- profile


def run_profile(prep: Prepared, *, progress: bool = True) -> tuple[LayerStats, np.ndarray, Any]:
    """Profile the adaptable sites (the head excluded) on training batches."""
    from layerlens_jax.app.data import iterate_batches

    cfg = prep.cfg
    model = prep.build_model(cfg.run.seed)
    if cfg.profile.head_warmup_steps:
        warm_up_head(prep, model, cfg.profile.head_warmup_steps)
    sites = adaptable_sites(model, prep)
    batches = iterate_batches(prep.arrays["train"], cfg.data.batch_size, seed=cfg.run.seed,
                              epoch=10_000)  # an order of its own, not a training epoch's
    kwargs = {}
    if cfg.profile.sampled_fisher:
        kwargs = {"sample_loss_fn": sampled_label_loss(_logits),
                  "rng": jax.random.key(cfg.run.seed)}
    stats = profile(model, task_loss, batches, sites=sites,
                    max_batches=cfg.profile.batches, progress=progress, **kwargs)
    ucfg = UtilityConfig(**dataclasses.asdict(cfg.utility))
    u = utility(stats, ucfg)
    return stats, u, utility_report(stats, u)


def warm_up_head(prep: Prepared, model, steps: int) -> None:
    """Train only the task head of ``model`` (in place) for ``steps`` Adam steps on training
    batches, so that profiling sees gradients through a head that already separates the classes
    rather than through a random one. Used for profiling only: every variant still trains from the
    fresh head of its seed."""
    from layerlens_jax._src.train import make_functional_train_step, write_back

    cfg = prep.cfg
    step, state = make_functional_train_step(model, optax.adam(cfg.train.head_learning_rate),
                                             _mean_loss, wrt=head_filter(cfg.train.head))
    # epochs from 20 000: an order of its own, neither profiling's nor a training epoch's
    for _, batch in zip(range(steps), _endless_batches(prep, cfg.run.seed, first_epoch=20_000)):
        state, metrics = step(state, batch)
    if not math.isfinite(float(metrics["loss"])):
        raise FloatingPointError(f"head warm-up diverged: loss {float(metrics['loss'])}")
    write_back(model, state)


def _endless_batches(prep: Prepared, seed: int, first_epoch: int = 0, *, prefetch: int = 0):
    """Full training batches of ``seed``'s shuffled order, epoch after epoch.

    With ``prefetch = n > 0`` the batches are device arrays and ``n`` of them are built and put on
    the device ahead of the one yielded: the next batch is ready (and its transfer under way) while
    the current step runs under JAX's asynchronous dispatch. The values are the same either way."""
    from layerlens_jax.app.data import iterate_batches

    def host_batches():
        epoch = first_epoch
        while True:
            yield from iterate_batches(prep.arrays["train"], prep.cfg.data.batch_size, seed=seed,
                                       epoch=epoch, drop_remainder=True)
            epoch += 1

    if not prefetch:
        yield from host_batches()
        return
    ahead = collections.deque()
    for batch in host_batches():
        ahead.append(jax.device_put(batch))
        if len(ahead) > prefetch:
            yield ahead.popleft()


def _is_head(path: str, head: tuple[str, ...]) -> bool:
    return any(path == h or path.startswith(h + "/") for h in head)


def adaptable_sites(model, prep: Prepared) -> list[Site]:
    head = prep.cfg.train.head
    return [s for s in discover_sites(model, example=prep.example()) if not _is_head(s.path, head)]


# -------------------------------------------------------------------------------- training


def build_variant(prep: Prepared, variant: str, plan, seed: int, adapt=None):
    """(model, trainable filter) for a variant; the base encoder and head come from ``seed``.

    ``adapt(base, seed) -> model``, when given, replaces ``apply_plan(base, plan)``: how a
    baseline with its own adapters or initialisation (EVA, AdaLoRA) builds its model."""
    from layerlens_jax._src.peft import PEFT_FILTER, apply_plan

    base = prep.build_model(seed)
    head = head_filter(prep.cfg.train.head)
    if variant == "full":
        return base, nnx.Param
    if variant == "head_only":
        return base, head
    if adapt is not None:
        return adapt(base, seed), nnx.Any(PEFT_FILTER, head)
    model = apply_plan(base, plan, inplace=True, example=prep.example())
    return model, nnx.Any(PEFT_FILTER, head)


def count_params(model, wrt) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt))))


def _schedule(cfg: RunConfig, lr: float):
    t = cfg.train
    warm = min(t.warmup_steps, max(t.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(t.steps, warm + 1), lr * 0.1) \
        if warm else optax.cosine_decay_schedule(lr, t.steps, 0.1)


_LR_KEYS = {"full": "train.full_learning_rate", "head_only": "train.head_learning_rate"}


def _lr(cfg: RunConfig, variant: str) -> float:
    return {"full": cfg.train.full_learning_rate,
            "head_only": cfg.train.head_learning_rate}.get(variant, cfg.train.learning_rate)


@jax.jit
def _correct(logits, labels, w):
    pred = jnp.argmax(logits, -1)
    return jnp.sum((pred == labels) * w), jnp.sum(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels) * w), jnp.sum(w)


@jax.jit
def _squared(outputs, targets, w):
    """(Σ w·(pred − y)², Σ w) of one batch."""
    return jnp.sum(jnp.square(outputs[:, 0] - targets) * w), jnp.sum(w)


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(graphdef, state, batch):
    return _logits(nnx.merge(graphdef, state), batch)


def evaluate_split(model, arrays: dict[str, np.ndarray], batch_size: int) -> dict[str, Any]:
    """The task's score over a split (padding examples excluded): ``{"metric", "score", "loss",
    "examples"}``. Integer labels: accuracy and mean cross-entropy. Float targets (regression):
    R² = 1 − SSE / Σ(y − ȳ)² over the split (0 for a constant predictor at the mean, negative for
    worse) and the mean squared error. Compiles once per model structure and batch shape."""
    from layerlens_jax.app.data import iterate_batches

    graphdef, state = nnx.split(model)
    regression = np.issubdtype(np.asarray(arrays["labels"]).dtype, np.floating)
    sums = np.zeros(2 if regression else 3)
    for batch in iterate_batches(arrays, batch_size, shuffle=False):
        out = _eval_logits(graphdef, state, batch)
        part = (_squared if regression else _correct)(out, batch["labels"], batch["example_mask"])
        sums += np.array([float(x) for x in part])
    if regression:  # the total sum of squares in float64 on the host: no cancellation
        sse, n = sums
        y = np.asarray(arrays["labels"], np.float64)
        sst = float(np.sum(np.square(y - y.mean())))
        score = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else -math.inf)
        return {"metric": "r2", "score": float(score), "loss": float(sse / n), "examples": int(n)}
    hit, loss, n = sums
    return {"metric": "accuracy", "score": float(hit / n), "loss": float(loss / n),
            "examples": int(n)}


def variant_step(prep: Prepared, variant: str, model, wrt, make_step=None):
    """``(step, state)`` of the run's train step for ``variant`` (AdamW on its learning-rate
    schedule; ``make_step`` as in :func:`train_variant`)."""
    from layerlens_jax._src.train import make_functional_train_step

    make_step = make_step or (lambda m, t, f, w: make_functional_train_step(m, t, f, wrt=w))
    return make_step(model, variant_tx(prep, variant), _mean_loss, wrt)


def variant_tx(prep: Prepared, variant: str) -> optax.GradientTransformation:
    """The optimizer of ``variant``'s run: AdamW on its learning-rate schedule."""
    cfg = prep.cfg
    return optax.adamw(_schedule(cfg, _lr(cfg, variant)), weight_decay=cfg.train.weight_decay)


def step_memory(step, state, batch) -> float | None:
    """XLA's compiled memory (bytes) of ``step`` (from :func:`variant_step`) on ``batch``."""
    return _xla_bytes(step.jitted, state.trainable, state.opt_state, state.other, state.step,
                      state.frozen, batch)


def _xla_bytes(jitted, *args) -> float | None:
    try:
        m = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return float(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurvePoint:
    """One point of a training curve: the figures after ``step`` steps."""

    # training steps done
    step: int
    # mean training loss of the steps since the previous point
    train_loss: float
    # mean validation loss (padding excluded)
    val_loss: float
    # validation score (accuracy, a fraction in [0, 1]; R² for regression)
    val_score: float

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "train_loss": self.train_loss, "val_loss": self.val_loss,
                "val_score": self.val_score}


# results.json's keys of one run, in this order (run directories already written use them)
RESULT_KEYS = ("variant", "seed", "metric", "trainable_params", "adapter_params", "test_score",
               "test_loss", "val_score", "val_loss", "train_seconds", "steps", "epochs",
               "step_memory_bytes", "curve")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariantResult:
    """The figures of one variant trained with one seed (one entry of ``results.json``)."""

    # the variant's name: uniform_lora, layerlens_lora, layerlens_mixed, head_only or full
    variant: str
    # the seed of the task head's initialisation and of the data order
    seed: int
    # what test_score and val_score are: "accuracy" (classification) or "r2" (regression, R²)
    metric: str
    # parameters the optimizer updates, the task head included
    trainable_params: int
    # the plan's parameter count (its use["params"], rounded); None for head_only and full
    adapter_params: int | None
    # test score after the last step (accuracy, a fraction in [0, 1]; R² for regression)
    test_score: float
    # mean test loss after the last step (padding excluded)
    test_loss: float
    # validation score at the last curve point
    val_score: float
    # mean validation loss at the last curve point
    val_loss: float
    # wall seconds of all steps, estimated from the steps after the first (compiling) one,
    # evaluation excluded
    train_seconds: float
    # training steps done
    steps: int
    # steps / full training batches per epoch
    epochs: float
    # XLA's estimate of one training step's memory (temp + arguments + outputs); None where the
    # backend does not report it
    step_memory_bytes: float | None
    # validation figures every train.eval_every steps and after the last step
    curve: tuple[CurvePoint, ...]
    # the trained model when train_variant was asked to keep it, else None; never written
    model: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` entry: the keys of :data:`RESULT_KEYS`, without the model."""
        d = {k: getattr(self, k) for k in RESULT_KEYS}
        d["curve"] = [p.to_json() for p in self.curve]
        return d


def train_variant(prep: Prepared, variant: str, plan, seed: int, *, progress: bool = True,
                  keep_model: bool = False, adapt=None, make_step=None,
                  reallocate=None) -> VariantResult:
    """Train one variant with one seed; its figures (and the model if ``keep_model``).

    ``adapt`` as in :func:`build_variant`; ``make_step(model, tx, loss_fn, wrt) -> (step, state)``,
    when given, replaces :func:`~layerlens_jax.make_functional_train_step` (AdaLoRA's step).
    ``reallocate(wrt) -> hook``: in-training reallocation
    (:func:`~layerlens_jax.app.reallocation.reallocation_hook`), its seconds excluded from
    ``train_seconds`` (the caller's log has them)."""
    from layerlens_jax._src.train import write_back

    model, wrt = build_variant(prep, variant, plan, seed, adapt)
    trainable = count_params(model, wrt)
    step, state = variant_step(prep, variant, model, wrt, make_step)
    hook = None if reallocate is None else reallocate(wrt)
    state, curve, seconds, memory = _run_steps(prep, variant, seed, model, step, state,
                                               progress=progress, hook=hook)
    write_back(model, state)
    return variant_result(prep, variant, plan, seed, model, trainable=trainable, curve=curve,
                          seconds=seconds, memory=memory, keep_model=keep_model)


def variant_result(prep: Prepared, variant: str, plan, seed: int, model, *, trainable: int,
                   curve: tuple[CurvePoint, ...], seconds: float, memory: float | None,
                   keep_model: bool = False) -> VariantResult:
    """The :class:`VariantResult` of a trained ``model`` (its final state written back): the test
    split evaluated once, the validation figures from the last curve point."""
    from layerlens_jax.app.data import num_batches

    cfg = prep.cfg
    per_epoch = num_batches(prep.sizes["train"], cfg.data.batch_size, drop_remainder=True)
    test = evaluate_split(model, prep.arrays["test"], cfg.data.eval_batch_size)
    return VariantResult(
        variant=variant, seed=seed, metric=test["metric"], trainable_params=trainable,
        adapter_params=None if plan is None else int(round(plan.use["params"])),
        test_score=test["score"], test_loss=test["loss"],
        val_score=curve[-1].val_score, val_loss=curve[-1].val_loss,
        train_seconds=seconds, steps=cfg.train.steps, epochs=cfg.train.steps / max(per_epoch, 1),
        step_memory_bytes=memory, curve=tuple(curve), model=model if keep_model else None)


def _run_steps(prep: Prepared, variant: str, seed: int, model, step, state, *, progress: bool,
               hook=None):
    """The training loop of :func:`train_variant`: ``(state, curve, seconds, step memory)``.
    ``model`` is written back (for evaluation) at every curve point. ``hook(i, model, step,
    state) -> (step, state)`` runs after every step (reallocation); its time is not counted.

    The host never waits on a step between curve points: steps are dispatched asynchronously, the
    next batch is built and put on the device while the current step runs, and only the losses of
    the current curve window are kept (as device scalars, read at the curve point)."""
    cfg = prep.cfg
    steps, every = cfg.train.steps, cfg.train.eval_every
    batches = _endless_batches(prep, seed, prefetch=1)
    batch = next(batches)
    memory = step_memory(step, state, batch)
    bar = _progress_bar(progress, steps, f"train {variant} seed {seed}")
    curve, window = [], collections.deque(maxlen=every)  # the last `every` steps' losses
    eval_seconds = 0.0
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batch)
        window.append(metrics["loss"])
        if i == 0:  # time the steps after the first (compiling) one
            initial = float(metrics["loss"])
            t0 = time.perf_counter()
            _check_divergence(cfg, variant, seed, 1, initial, initial)
        if i + 1 < steps:
            batch = next(batches)  # built and transferred while step i runs
        if hook is not None:
            th = time.perf_counter()
            step, state = hook(i, model, step, state)
            eval_seconds += time.perf_counter() - th
        if (i + 1) % every == 0 or i + 1 == steps:
            recent = float(np.mean(jax.device_get(list(window))))
            _check_divergence(cfg, variant, seed, i + 1, recent, initial)
            te = time.perf_counter()
            val = _validate(prep, model, state)
            eval_seconds += time.perf_counter() - te
            curve.append(CurvePoint(step=i + 1, train_loss=recent, val_loss=val["loss"],
                                    val_score=val["score"]))
        if bar is not None:
            bar.update(1)
    jax.block_until_ready(state.trainable)
    seconds = (time.perf_counter() - t0 - eval_seconds) * steps / max(steps - 1, 1)
    if bar is not None:
        bar.close()
    return state, tuple(curve), seconds, memory


def _progress_bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False)


def _validate(prep: Prepared, model, state) -> dict[str, float]:
    """Validation figures of ``state`` (written back into ``model`` first)."""
    from layerlens_jax._src.train import write_back

    write_back(model, state)
    return evaluate_split(model, prep.arrays["validation"], prep.cfg.data.eval_batch_size)


class DivergenceError(FloatingPointError):
    """Training of one variant diverged: its loss is not finite, or its mean since the previous
    check exceeds ``train.divergence_factor`` times the first step's loss."""

    def __init__(self, message: str, *, variant: str, seed: int, step: int, loss: float,
                 initial_loss: float):
        super().__init__(message)
        self.record = {"variant": variant, "seed": seed, "step": step, "loss": loss,
                       "initial_loss": initial_loss, "message": message}


def _check_divergence(cfg: RunConfig, variant: str, seed: int, step: int, loss: float,
                      initial: float) -> None:
    """:class:`DivergenceError` when ``loss`` (the mean since the previous check) is not finite or
    exceeds ``train.divergence_factor`` times ``initial`` (the first step's loss)."""
    factor = cfg.train.divergence_factor
    if math.isfinite(loss) and math.isfinite(initial) and loss <= factor * abs(initial):
        return
    why = ("is not finite" if not math.isfinite(loss) else
           f"exceeds train.divergence_factor = {factor:g} x the first step's loss {initial:.4g}")
    raise DivergenceError(
        f"training {variant} (seed {seed}) diverged at step {step}: mean loss {loss:.4g} {why} "
        f"(lower {_LR_KEYS.get(variant, 'train.learning_rate')} = {_lr(cfg, variant):g})",
        variant=variant, seed=seed, step=step, loss=loss if math.isfinite(loss) else str(loss),
        initial_loss=initial if math.isfinite(initial) else str(initial))
