"""Training helpers for wrapped models: masked optimizers and jit-compiled train steps.

The adapter state is selected by one filter (:data:`layerlens_jax._src.peft.PEFT_FILTER`, an
``nnx.LoRAParam`` subclass) in NNX and by one name predicate (``peft_*`` leaves) in Linen. The
train steps differentiate *only* that state and the optimizer holds state only for it, so the base
weights are never written: they stay bit-for-bit unchanged (not merely "updated by zero").

User loss: ``loss_fn(model, batch)`` returning a scalar, a per-example vector (averaged), or
``(loss, aux)`` with ``has_aux=True``. For Linen the ``model`` passed is the module bound to the
current variables (``module.bind(variables)``), so the same loss function serves both APIs.

Three step factories:

* :func:`make_train_step`: ``step(model, optimizer, batch) -> metrics`` over ``nnx.Optimizer``,
  compiled with ``nnx.jit`` (simplest; updates model and optimizer in place).
* :func:`make_functional_train_step`: splits the model once into (trainable, frozen, other) state
  and returns a ``jax.jit`` step over a :class:`TrainState` pytree with the state donated (no graph
  traversal per step: the fast path). :func:`write_back` puts the state into the model.
* :func:`make_linen_train_step`: the same for a Linen module and its variables.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

from layerlens_jax._src.peft.apply import optax_labels
from layerlens_jax._src.peft.nnx_modules import PEFT_FILTER
from layerlens_jax._src.peft.tree import combine_params, partition_params

__all__ = [
    "make_optimizer",
    "masked_tx",
    "make_train_step",
    "TrainState",
    "make_functional_train_step",
    "stack_train_states",
    "unstack_train_state",
    "write_back",
    "LinenTrainState",
    "make_linen_train_step",
    "linen_variables",
    "reduce_loss",
    "matmul_flops",
]


def reduce_loss(out: Any, has_aux: bool = False) -> tuple[jax.Array, Any]:
    """``(scalar loss, aux)`` from a loss function's output: a per-example loss is averaged.

    Raises:
      TypeError: a tuple without ``has_aux=True``, no ``(loss, aux)`` pair with it, or a loss that
        is not floating point.
    """
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"with has_aux=True loss_fn must return a (loss, aux) pair, got "
                            f"{type(out).__name__}")
        loss, aux = out
    elif isinstance(out, (tuple, list)):
        raise TypeError(f"loss_fn returned a {type(out).__name__} of {len(out)}; for (loss, aux) "
                        f"pass has_aux=True, else return only the loss")
    else:
        loss, aux = out, None
    loss = jnp.asarray(loss)
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise TypeError(f"loss_fn must return a floating loss, got dtype {loss.dtype}; cast it "
                        f"to float32")
    return (jnp.mean(loss) if loss.ndim else loss), aux


def make_optimizer(model: nnx.Module, tx: optax.GradientTransformation, *,
                   wrt: Any = PEFT_FILTER) -> nnx.Optimizer:
    """``nnx.Optimizer`` over the adapter state only (``wrt=nnx.Param`` gives full fine-tuning)."""
    return nnx.Optimizer(model, tx, wrt=wrt)


def masked_tx(tx: optax.GradientTransformation, params: Any) -> optax.GradientTransformation:
    """``tx`` on adapter leaves, ``optax.set_to_zero()`` elsewhere, for code that must optimise a
    whole parameter tree (e.g. a Linen ``TrainState``). Optimizer state exists only for adapter
    leaves. The step factories here do better: they never differentiate the base at all."""
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                                 optax_labels(params))


def _metrics(loss, grads, aux):
    out = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    if aux is not None:
        out["aux"] = aux
    return out


def make_train_step(loss_fn: Callable, *, wrt: Any = PEFT_FILTER, has_aux: bool = False,
                    jit: bool = True) -> Callable:
    """``step(model, optimizer, batch) -> {"loss", "grad_norm"[, "aux"]}`` (in place).

    ``optimizer`` is an ``nnx.Optimizer`` built with the same ``wrt`` (see :func:`make_optimizer`).
    """

    def step(model, optimizer, batch):
        def f(m):
            return reduce_loss(loss_fn(m, batch), has_aux)

        (loss, aux), grads = nnx.value_and_grad(f, argnums=nnx.DiffState(0, wrt),
                                                has_aux=True)(model)
        optimizer.update(model, grads)
        return _metrics(loss, grads, aux)

    return nnx.jit(step) if jit else step


class TrainState(NamedTuple):
    """Pytree state of :func:`make_functional_train_step`: the trainable state, the frozen base
    parameters, everything else (rng counters, batch stats, ...) and the optimizer state."""

    trainable: Any
    frozen: Any
    other: Any
    opt_state: Any
    step: jax.Array


#: XLA:CPU option of PEFT train steps: no YNNPACK fusions (XLA's own dot emitter). Measured on the
#: 2-core development CPU (``scripts/bench_train.py``; README "Training throughput"): a LoRA step of
#: the MiniLM shape takes 0.72-0.80x the default's time at batch 64 x 128 and is within noise of it
#: at 32 x 32, while a full fine-tuning step is up to 1.5x slower without the fusions.
CPU_PEFT_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_option_supported(name: str, value: str) -> bool:
    """Whether this jaxlib's XLA:CPU accepts the compile option (older builds may lack it)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
            jnp.zeros((), jnp.float32)).compile()
        return True
    except Exception:  # XLA raises its own error type for unknown options
        return False


def default_compiler_options(trainable: Any, frozen: Any) -> dict[str, str] | None:
    """The compile options of a train step: :data:`CPU_PEFT_COMPILER_OPTIONS` on the CPU backend when
    the frozen parameters outnumber the trainable ones (a PEFT step, whose backward computes only
    input gradients through the frozen layers), else None (XLA's defaults)."""
    if jax.default_backend() != "cpu":
        return None
    count = lambda tree: sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))  # noqa: E731
    if count(frozen) <= count(trainable):
        return None
    if not all(_cpu_option_supported(k, v) for k, v in CPU_PEFT_COMPILER_OPTIONS.items()):
        return None
    return dict(CPU_PEFT_COMPILER_OPTIONS)


def _step_jits(step: Callable, donate_argnums: tuple[int, ...],
               compiler_options: Mapping[str, str] | None) -> tuple[Callable, Callable]:
    """``(top, jitted)``: the jit a train step's ``run`` calls (with ``compiler_options``) and the
    plain one exposed as ``run.jitted``. Compile options apply to a top-level jit only, so the
    plain one stays usable inside other transformations (vmap, make_jaxpr, an outer jit)."""
    jitted = jax.jit(step, donate_argnums=donate_argnums)
    if not compiler_options:
        return jitted, jitted
    return jax.jit(step, donate_argnums=donate_argnums,
                   compiler_options=dict(compiler_options)), jitted


def make_functional_train_step(model: nnx.Module, tx: optax.GradientTransformation,
                               loss_fn: Callable, *, wrt: Any = PEFT_FILTER,
                               has_aux: bool = False, donate: bool = True,
                               compiler_options: Mapping[str, str] | None | str = "auto"
                               ) -> tuple[Callable, TrainState]:
    """``(step, state)`` with ``step(state, batch) -> (state, metrics)`` a ``jax.jit`` function.

    The model is split once (``graphdef``, trainable = ``wrt``, frozen = other ``nnx.Param``,
    other = the rest). Only ``trainable`` is differentiated; ``frozen`` passes through the step
    untouched (not donated). With ``donate`` the trainable, other and optimizer state buffers are
    reused in place. ``compiler_options``: XLA compile options of the step; ``"auto"`` (default)
    is :func:`default_compiler_options`, None XLA's defaults.
    """
    graphdef, trainable, frozen, other = nnx.split(model, wrt, nnx.Param, ...)
    if compiler_options == "auto":
        compiler_options = default_compiler_options(trainable, frozen)
    if donate:  # own copies: donating must not delete buffers the model (or its clones) still hold
        trainable, other = jax.tree.map(jnp.copy, (trainable, other))
    state = TrainState(trainable, frozen, other, tx.init(trainable), jnp.zeros((), jnp.int32))

    def step(trainable, opt_state, other, count, frozen, batch):
        def f(tr):
            m = nnx.merge(graphdef, tr, frozen, other)
            loss, aux = reduce_loss(loss_fn(m, batch), has_aux)
            return loss, (aux, nnx.state(m, nnx.Not(nnx.Param)))

        (loss, (aux, new_other)), grads = jax.value_and_grad(f, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, new_other, count + 1, _metrics(loss, grads, aux)

    top, jitted = _step_jits(step, (0, 1, 2) if donate else (), compiler_options)

    def run(state: TrainState, batch) -> tuple[TrainState, dict]:
        tr, opt, oth, count, metrics = top(state.trainable, state.opt_state, state.other,
                                           state.step, state.frozen, batch)
        return TrainState(tr, state.frozen, oth, opt, count), metrics

    run.jitted = jitted  # for lowering / cost analysis / nesting (XLA's default options)
    run.compiler_options = compiler_options
    return run, state


def _same_tree(a: Any, b: Any) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x is y or (np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y)))
        for x, y in zip(la, lb))


def stack_train_states(step: Callable, states: Sequence[TrainState], *,
                       share_frozen: bool | None = None) -> tuple[Callable, TrainState]:
    """Several independent runs of one train step -- e.g. the seeds of one configuration, each with
    its own head, adapters, optimizer state and batches -- trained by one jitted, vmapped step.

    ``step`` and ``states`` come from :func:`make_functional_train_step` on models of the same
    structure (the first step's program serves all). Returns ``(run, state)``: ``state`` holds
    every tree stacked on a new leading axis (``frozen`` once when ``share_frozen``: by default,
    when every run's frozen base is equal, as for one pretrained encoder); ``run(state, batch)``
    takes batches stacked the same way (``(n, B, ...)``) and returns per-run metrics ``(n,)``.
    :func:`unstack_train_state` gives run ``i``'s :class:`TrainState` back. The figures equal
    ``n`` separate runs up to float round-off (vmapped matmuls may sum in another order)."""
    if not states:
        raise ValueError("stack_train_states: no states given")
    s0 = states[0]
    if share_frozen is None:
        share_frozen = all(_same_tree(s.frozen, s0.frozen) for s in states[1:])
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    tr, opt, oth, count = jax.tree.map(
        stack, *[(s.trainable, s.opt_state, s.other, s.step) for s in states])
    frozen = s0.frozen if share_frozen else jax.tree.map(stack, *[s.frozen for s in states])
    inner = step.jitted
    axes = (0, 0, 0, 0, None if share_frozen else 0, 0)

    def vstep(trainable, opt_state, other, count, frozen, batch):
        return jax.vmap(inner, in_axes=axes)(trainable, opt_state, other, count, frozen, batch)

    top, jitted = _step_jits(vstep, (0, 1, 2), getattr(step, "compiler_options", None))

    def run(state: TrainState, batch) -> tuple[TrainState, dict]:
        t, o, x, c, metrics = top(state.trainable, state.opt_state, state.other, state.step,
                                  state.frozen, batch)
        return TrainState(t, state.frozen, x, o, c), metrics

    run.jitted, run.runs, run.share_frozen = jitted, len(states), share_frozen
    return run, TrainState(tr, frozen, oth, opt, count)


def unstack_train_state(state: TrainState, i: int, *, share_frozen: bool) -> TrainState:
    """Run ``i``'s :class:`TrainState` out of :func:`stack_train_states`' stacked state."""
    pick = lambda tree: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
    return TrainState(pick(state.trainable), state.frozen if share_frozen else pick(state.frozen),
                      pick(state.other), pick(state.opt_state), state.step[i])


def write_back(model: nnx.Module, state: TrainState) -> nnx.Module:
    """Write a :class:`TrainState`'s trainable and other state into ``model`` (in place)."""
    nnx.update(model, state.trainable, state.other)
    return model


class LinenTrainState(NamedTuple):
    trainable: Any  # adapter params (nested dict)
    frozen: Any  # base params
    other: Any  # non-param collections
    opt_state: Any
    step: jax.Array


def make_linen_train_step(module: nn.Module, variables: Mapping, tx: optax.GradientTransformation,
                          loss_fn: Callable, *, has_aux: bool = False, donate: bool = True,
                          rng_collections: tuple[str, ...] = (),
                          compiler_options: Mapping[str, str] | None | str = "auto"
                          ) -> tuple[Callable, LinenTrainState]:
    """``(step, state)`` for a Linen module (e.g. a ``PeftLinen``) and its variables.

    ``loss_fn(bound_module, batch)`` gets ``module.bind(variables)``; ``step(state, batch, rngs=None)
    -> (state, metrics)``. Only the ``peft_*`` leaves of ``params`` are trained. ``rngs`` (a dict
    of keys, e.g. ``{"dropout": key}``) is passed to ``bind``. ``compiler_options``: as for
    :func:`make_functional_train_step`.
    """
    params = variables["params"]
    trainable, frozen = partition_params(params)
    if compiler_options == "auto":
        compiler_options = default_compiler_options(trainable, frozen)
    if donate:
        trainable = jax.tree.map(jnp.copy, trainable)
    if not jax.tree.leaves(trainable):
        raise ValueError("these variables have no adapter (peft_*) parameters; initialise them with "
                         "layerlens_jax._src.peft.init_adapters first")
    other = {k: v for k, v in variables.items() if k != "params"}
    state = LinenTrainState(trainable, frozen, other, tx.init(trainable), jnp.zeros((), jnp.int32))

    def step(trainable, opt_state, count, frozen, other, batch, rngs):
        def f(tr):
            bound = module.bind({**other, "params": combine_params(tr, frozen)}, rngs=rngs)
            return reduce_loss(loss_fn(bound, batch), has_aux)

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, count + 1, _metrics(loss, grads, aux)

    top, jitted = _step_jits(step, (0, 1) if donate else (), compiler_options)

    def run(state: LinenTrainState, batch, rngs=None):
        tr, opt, count, metrics = top(state.trainable, state.opt_state, state.step,
                                      state.frozen, state.other, batch, rngs)
        return LinenTrainState(tr, state.frozen, state.other, opt, count), metrics

    run.jitted = jitted  # lowering / nesting, XLA's default options
    run.compiler_options = compiler_options
    return run, state


def linen_variables(state: LinenTrainState) -> dict:
    """The full Linen variables (base + trained adapters) of a :class:`LinenTrainState`."""
    return {**state.other, "params": combine_params(state.trainable, state.frozen)}


# ------------------------------------------------------------------------------------ work


def _dot_flops(eqn) -> int:
    """2 x multiply-adds of one ``dot_general``: 2 * prod(lhs shape) * prod(rhs free dims)."""
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
    return 2 * math.prod(lhs) * math.prod(free)


def _conv_flops(eqn) -> int:
    """2 x multiply-adds of one ``conv_general_dilated``: 2 * output elements * kernel elements
    per output feature (spatial x input features / groups)."""
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = math.prod(rhs) // rhs[out_feature_dim]
    return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":  # the most expensive branch
            total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            times = eqn.params.get("length", 1) if name == "scan" else 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                total += times * _jaxpr_flops(sub)
    return total


def matmul_flops(fn: Callable, *args, **kwargs) -> int:
    """The matrix-multiply FLOPs of one call ``fn(*args, **kwargs)``, counted from the shapes of
    its traced program (no compilation, the same number on every device).

    Every ``dot_general`` counts ``2 * batch * M * N * K`` (a multiply and an add per term), every
    convolution ``2 * output elements * kernel elements per output``; scans count ``length``
    times, a ``cond`` its most expensive branch, a ``while`` body once. Elementwise work (softmax,
    normalisation, activations, the optimizer update) is not counted. For a train step this is the
    work autodiff actually asks for: the forward matmuls, the input gradients only where a
    trainable parameter lies below, and weight gradients only for trained weights (a frozen
    kernel gets none), so it separates LoRA from full fine-tuning where XLA's cost analysis of a
    compiled step may not.
    """
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
