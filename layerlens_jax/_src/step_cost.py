"""Whole-step costs: the backprop-depth term the per-site cost model cannot express.

The per-site costs of :mod:`~layerlens_jax._src.costs` are *increments*: an adapter's weights,
gradients, optimizer state and its own saved activations. They miss the larger part of a training
step's memory and FLOPs: once any site is adapted, backward must run from the loss down to the
lowest adapted site, keeping the activations of every layer above it and computing their
input gradients. That cost depends on the *lowest adapted layer*, not on a sum over sites.

The step model (documented formula)
-----------------------------------

Sites are ordered by the forward graph: :func:`site_call_order` records the order in which the site
modules are entered during one abstract forward pass on example inputs. Consecutive sites with the
same *depth key* form one depth group: the key is the site path up to and including its first
indexed component (``encoder/layers_3``: a component that is an integer or ends in ``_<digits>``),
else the path's first component (``embeddings``, ``pooler``, ``classifier``). Groups are numbered
``0 .. D-1`` in forward order; ``depth(s)`` is the group of site ``s``. For a plan that adapts the
set ``A`` of sites, with ``d = min_{s in A} depth(s)`` (``d = D`` when nothing is adapted)::

    step_vram(plan)        = M[d] + sum_{s in A} vram_bytes(s, option_s)
    step_train_flops(plan) = F[d] + sum_{s in A} train_flops(s, option_s)
    latency(plan)          = L    + sum_{s in A} latency(s, option_s)

``vram_bytes`` / ``train_flops`` are the per-site formulas of :mod:`~layerlens_jax._src.costs`
(weights + gradients + optimizer state + the adapter path's saved activations; 3x the adapter's
forward FLOPs per token). The fixed parts are measured once per depth group on the frozen base
model by :func:`measure_step_profile` with a *probe*: a zero-initialised trainable vector added to
the input of the group's first site (to its output when that input is integer, e.g. token ids), so
that backward runs through the whole group and everything above it, and nothing below:

* ``M[d]``: XLA's compiled memory analysis of the probe's jit train step, ``temp + arguments +
  outputs - aliased`` bytes (donated buffers counted once): the frozen base parameters, the batch,
  the activations kept for backward above ``d``, the activation gradients and XLA's workspace.
  The probe's own bytes (its weight, gradient, optimizer state) are subtracted.
* ``F[d]``: the matmul FLOPs (``dot_general``: ``2 * M * N * K``; convolutions alike) of the probe
  step's jaxpr, per token of model input: the frozen forward plus the input-gradient products above
  ``d``. :func:`matmul_flops` is the same count used as the reference in ``scripts/bench_costs.py``.
* ``L``: the measured milliseconds of the frozen base model's jit forward pass at the profile's
  batch shape (the fastest of timed runs). The per-site ``latency`` terms (extra kernels and FLOPs of
  unmerged adapters, :func:`~layerlens_jax._src.costs.calibrate_latency`) are increments on it:
  predicting the base forward from FLOPs with the adapters' calibrated throughput was off by 11x
  on a CPU (small adapter products run far below the base model's matmul rate).
* Rank-1 LoRA inputs: the frozen step keeps most site inputs anyway and XLA turns rank-1
  products into vector operations, so the per-site ``c_in`` activation term of a rank-1 LoRA is
  scaled by ``rank1_input_fraction``, measured with one more compile (:func:`_with_rank1_fraction`).
* ``M[D]`` / ``F[D]`` (nothing adapted): the forward alone (``F[D]`` = forward FLOPs; ``M[D]`` the
  memory of the last group's probe step, an upper bound).

Both fixed parts are made non-increasing in ``d`` (a suffix maximum), so charging ``M[d]`` for any
``d`` at or below the true lowest adapted group never under-counts: the allocator enumerates ``d``
(see :func:`~layerlens_jax._src.allocate.allocate` with ``step_profile``) and is exact for this
model. The fixed parts hold for the batch shape they were measured at (``batch_size``,
``seq_len``) and for the backend that compiled them (XLA CPU and GPU keep different buffers).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerlens_jax._src.costs import RESOURCES, CostModel, fastest_ms
from layerlens_jax._src.sites import (Site, discover_sites, get_submodule, set_submodule,
                                     split_example, trace_site_calls)

__all__ = ["StepProfile", "site_call_order", "depth_groups", "measure_step_profile",
           "matmul_flops", "compiled_step_bytes", "site_depths", "plan_step_cost"]

#: The resources whose budget means the whole step (or, for latency, the whole inference batch)
#: when a step profile is given.
STEP_RESOURCES = ("train_flops", "vram_bytes", "latency")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepProfile:
    """Fixed per-depth parts of the whole train step, measured on the frozen base model."""

    # depth keys in forward order (``embeddings``, ``encoder/layers_0``, ..., ``classifier``)
    groups: tuple[str, ...]
    # site path -> index of its depth group, for every site called in the forward pass
    depth: Mapping[str, int]
    # [D + 1] bytes of the whole step when the lowest adapted group is d (index D: none adapted)
    vram_bytes: tuple[float, ...]
    # [D + 1] matmul FLOPs per token of the whole step, same indexing
    train_flops: tuple[float, ...]
    # matmul FLOPs per token of the frozen forward (inference, nothing adapted)
    forward_flops: float
    # examples per batch the profile was measured with
    batch_size: int
    # positions per example the profile was measured with
    seq_len: int
    # milliseconds of one jit-compiled forward pass of the frozen base model at this batch shape
    # (fastest of timed runs): the fixed part of ``latency``, which no adapter changes
    forward_ms: float = 0.0
    # the part of a rank-1 LoRA site's input that adapting it adds to the step (measured, see
    # :func:`measure_step_profile`): the cost model's ``CostModel.rank1_input_fraction``
    rank1_input_fraction: float = 1.0

    def cost_model(self, base: CostModel | None = None) -> CostModel:
        """The per-site cost model that goes with this profile: ``base`` (default: a
        :class:`~layerlens_jax._src.costs.CostModel` at the profile's batch shape) with the
        measured ``rank1_input_fraction``."""
        if base is None:
            base = CostModel(batch_size=self.batch_size, seq_len=self.seq_len)
        return dataclasses.replace(base, rank1_input_fraction=self.rank1_input_fraction)

    def fixed(self, resource: str) -> np.ndarray:
        """``[D + 1]`` fixed part of ``resource`` (zeros for the resources without a depth term)."""
        if resource == "latency":  # inference: the same base forward whatever is adapted
            return np.full(len(self.groups) + 1, float(self.forward_ms))
        if resource in STEP_RESOURCES:
            return np.asarray(getattr(self, resource), np.float64)
        if resource not in RESOURCES:
            raise ValueError(f"unknown resource {resource!r}; expected one of {RESOURCES}")
        return np.zeros(len(self.groups) + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": list(self.groups), "vram_bytes": list(self.vram_bytes),
                "train_flops": list(self.train_flops), "forward_flops": self.forward_flops,
                "batch_size": self.batch_size, "seq_len": self.seq_len,
                "forward_ms": self.forward_ms, "rank1_input_fraction": self.rank1_input_fraction}


# ------------------------------------------------------------------------ forward-graph order


def site_call_order(model: nnx.Module, example: Any) -> dict[str, tuple]:
    """``{site path: (input shape, input dtype)}`` in the order the sites are *entered* during one
    abstract forward pass of ``model(*example)`` (a block before the layers inside it)."""
    return {p: (ins, dtype) for p, (ins, dtype, _) in trace_site_calls(model, example).items()}


_INDEXED = re.compile(r"^(\d+|.*_\d+)$")


def _depth_key(path: str) -> str:
    parts = path.split("/")
    for i, part in enumerate(parts):
        if _INDEXED.match(part):
            return "/".join(parts[:i + 1])
    return parts[0]


def depth_groups(order: Sequence[str]) -> tuple[tuple[str, ...], dict[str, int]]:
    """Depth groups of sites in forward order: ``(group keys, {path: group index})``.

    A new group starts where the depth key (see the module docstring) changes; a key met again
    after another (a weight-tied module called twice) keeps its first group."""
    groups: list[str] = []
    depth: dict[str, int] = {}
    for path in order:
        key = _depth_key(path)
        if key not in groups:
            groups.append(key)
        depth[path] = groups.index(key)
    return tuple(groups), depth


def site_depths(profile: StepProfile, sites: Sequence[Site]) -> np.ndarray:
    """``[S]`` depth group of each site (``ValueError`` naming a site the profile never saw)."""
    out = []
    for s in sites:
        if s.path not in profile.depth:
            raise ValueError(f"site {s.path!r} was not called in the forward pass the step profile "
                             f"was measured on; measure it on the same model")
        out.append(profile.depth[s.path])
    return np.asarray(out, np.int64)


# ------------------------------------------------------------------------------- measurements


def matmul_flops(jaxpr) -> float:
    """Matmul FLOPs of a (closed) jaxpr: ``2*M*N*K`` per ``dot_general``, ``2 * output elements *
    kernel elements / output channels`` per convolution; sub-jaxprs (jit, custom rules) recursed,
    ``scan`` bodies times their length."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            k = math.prod(lhs[i] for i in lc)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
            del rhs, lb
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out = eqn.outvars[0].aval.shape
            o_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(out) * math.prod(rhs) / rhs[o_dim]
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    total += times * matmul_flops(sub)
    return total


def compiled_step_bytes(jitted: Callable, *args) -> dict[str, float]:
    """XLA's compiled memory analysis of ``jitted(*args)``: temp, argument, output, alias bytes
    and ``step`` = temp + argument + output - alias (donated buffers counted once)."""
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:
        raise ValueError("this backend reports no compiled memory analysis")
    out = {"temp": float(m.temp_size_in_bytes), "argument": float(m.argument_size_in_bytes),
           "output": float(m.output_size_in_bytes), "alias": float(m.alias_size_in_bytes)}
    out["step"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


class _Probe(nnx.Module):
    """A site with a zero trainable vector added to its input (or its output)."""

    def __init__(self, inner, width: int, on_input: bool):
        from layerlens_jax._src.peft.nnx_modules import PeftParam

        self.inner = inner
        self.peft_probe = PeftParam(jnp.zeros((width,), jnp.float32))
        self.on_input = on_input

    def __call__(self, *args, **kwargs):
        if self.on_input:
            x = args[0] + self.peft_probe.value.astype(args[0].dtype)
            return self.inner(x, *args[1:], **kwargs)
        y = self.inner(*args, **kwargs)
        return y + self.peft_probe.value.astype(y.dtype)


def _probe_step(model, path, shape, dtype, loss_fn, batch):
    """(step memory bytes, matmul FLOPs) of the train step with a probe on ``path``."""
    import optax

    from layerlens_jax._src.train import make_functional_train_step

    probed = nnx.clone(model)
    inner = get_submodule(probed, path)
    on_input = dtype is not None and jnp.issubdtype(dtype, jnp.floating)
    if on_input:
        width = int(shape[-1])
    else:
        out = jax.eval_shape(lambda: inner(jnp.zeros(shape, dtype)))
        width = int(out.shape[-1])
    set_submodule(probed, path, _Probe(inner, width, on_input))
    step, state = make_functional_train_step(probed, optax.sgd(1e-3), loss_fn)
    args = (state.trainable, state.opt_state, state.other, state.step, state.frozen, batch)
    mem = compiled_step_bytes(step.jitted, *args)["step"]
    flops = matmul_flops(jax.make_jaxpr(step.jitted)(*args))
    probe_bytes = 3 * 4 * width  # weight (argument and output, donated: once), gradient, update
    return mem - probe_bytes, flops


def measure_step_profile(model: nnx.Module, loss_fn: Callable, batch: Any, *, example: Any,
                         timing_repeats: int = 5) -> StepProfile:
    """Measure the fixed parts ``M[d]`` and ``F[d]`` of every depth group (module docstring).

    Args:
      model: the frozen base model (NNX, no adapters applied).
      loss_fn: ``loss_fn(model, batch) -> scalar`` as for the train steps.
      batch: one training batch (its shape is the shape the profile holds for).
      example: the model's example inputs for that batch (``model(*example)``), e.g.
        ``(batch["input_ids"],)``; its leading axis is the batch size, its second the positions.

      timing_repeats: timed runs of the base forward for ``forward_ms`` (0: not timed, 0.0).

    One compile per depth group (a probe step each) and one for the rank-1 fraction; seconds
    on a CPU for a MiniLM-size model.
    """
    sites = discover_sites(model, example=example)
    stacked = [s for s in sites if s.stacked_module]
    if stacked:
        raise ValueError(f"measure_step_profile: site {stacked[0].path!r} is a layer of the "
                         f"nnx.scan stack {stacked[0].stacked_module!r}, whose layers cannot be "
                         f"probed one by one: whole-step budgets of scanned stacks are not "
                         f"supported")
    order = site_call_order(model, example)
    if not order:
        raise ValueError(f"no site of {type(model).__name__} was called by model(*example)")
    groups, depth = depth_groups(list(order))
    first = {}
    for path in order:  # the first site entered in each group
        first.setdefault(depth[path], path)
    lead = jax.tree.leaves(example)[0].shape
    tokens = float(lead[0] * (lead[1] if len(lead) > 1 else 1))
    mem, flops = [], []
    for d in range(len(groups)):
        shape, dtype = order[first[d]]
        m, f = _probe_step(model, first[d], shape, dtype, loss_fn, batch)
        mem.append(m)
        flops.append(f / tokens)
    graphdef, state = nnx.split(model)
    args, kwargs = split_example(example)
    forward = lambda s: nnx.merge(graphdef, s)(*args, **kwargs)  # noqa: E731
    fwd = matmul_flops(jax.make_jaxpr(forward)(state))
    forward_ms = (fastest_ms(jax.jit(forward), state, repeats=timing_repeats)
                  if timing_repeats > 0 else 0.0)
    mem.append(mem[-1])
    flops.append(fwd / tokens)
    mem = np.maximum.accumulate(np.asarray(mem)[::-1])[::-1]  # non-increasing in d
    flops = np.maximum.accumulate(np.asarray(flops)[::-1])[::-1]
    profile = StepProfile(groups=groups, depth=dict(depth), vram_bytes=tuple(map(float, mem)),
                          train_flops=tuple(map(float, flops)), forward_flops=fwd / tokens,
                          batch_size=int(lead[0]), seq_len=int(lead[1]) if len(lead) > 1 else 1,
                          forward_ms=forward_ms)
    return _with_rank1_fraction(profile, model, sites, loss_fn, batch, example)


def _with_rank1_fraction(profile: StepProfile, model, sites: Sequence[Site], loss_fn, batch,
                         example) -> StepProfile:
    """``profile`` with its measured ``rank1_input_fraction`` in ``[0, 1]``.

    One compile: LoRA rank 1 on every LoRA-able, non-embedding, unstacked site (the widest plan).
    The whole-step prediction is linear in the fraction; it is set so that the prediction equals
    XLA's compiled step memory of that plan (clipped). XLA turns rank-1 products into vector
    operations and keeps no copy of most site inputs (the frozen step keeps layer-norm outputs and
    the attention context anyway): on the MiniLM shape at batch 32 x 32 the fraction is about 0.2,
    where a per-site copy over-predicted this plan by 18 %. Ranks >= 2 keep the full input term
    (there XLA keeps rank-r operands: LoRA r2 on the six fc1 layers adds 44 MiB over r1). The
    default (1) stays when the model has no such site."""
    import optax

    from layerlens_jax._src.costs import option_costs
    from layerlens_jax._src.methods import METHOD_KINDS
    from layerlens_jax._src.peft import apply_plan
    from layerlens_jax._src.train import make_functional_train_step

    chosen = np.array([s.kind in METHOD_KINDS["lora"] and s.kind != "embedding"
                       and "lora" not in dict(s.build_refusals) and not s.stacked_module
                       and s.path in profile.depth for s in sites])
    if not chosen.any():
        return profile
    adapted = {s.path: ("lora", 1) for s, c in zip(sites, chosen) if c}
    step, state = make_functional_train_step(apply_plan(model, adapted, example=example),
                                             optax.adamw(1e-3), loss_fn)
    args = (state.trainable, state.opt_state, state.other, state.step, state.frozen, batch)
    measured = compiled_step_bytes(step.jitted, *args)["step"]
    pred = []
    for f in (0.0, 1.0):
        cm = dataclasses.replace(profile.cost_model(), rank1_input_fraction=f)
        rows = option_costs(sites, [("lora", 1)], cm)[:, 0] * chosen[:, None]
        pred.append(plan_step_cost(profile, sites, rows, chosen)["vram_bytes"])
    f = float(np.clip((measured - pred[0]) / (pred[1] - pred[0]), 0.0, 1.0)) \
        if pred[1] > pred[0] else 1.0
    return dataclasses.replace(profile, rank1_input_fraction=f)


# ---------------------------------------------------------------------------------- prediction


def plan_step_cost(profile: StepProfile, sites: Sequence[Site], choice_cost: np.ndarray,
                   adapted: np.ndarray) -> dict[str, float]:
    """Whole-step cost ``{resource: value}`` of a plan: the fixed part of its lowest adapted group
    plus the per-site costs ``choice_cost`` ``[S, len(RESOURCES)]`` (the chosen options' rows);
    ``adapted`` ``[S]`` bool marks the sites with a method other than ``none``."""
    depths = site_depths(profile, sites)
    adapted = np.asarray(adapted, bool)
    d = int(depths[adapted].min()) if adapted.any() else len(profile.groups)
    total = np.asarray(choice_cost, np.float64).sum(axis=0)
    return {r: float(total[k] + profile.fixed(r)[d]) for k, r in enumerate(RESOURCES)}


# ------------------------------------------------------------------ allocation over the depth


def depth_subproblems(problem, profile: StepProfile) -> list:
    """For each lowest adapted group ``d = 0 .. D`` (``D``: nothing adapted), the sub-problem that
    forbids every method on the sites of groups below ``d`` and charges the fixed parts ``M[d]``,
    ``F[d]`` against the budgets; ``None`` where that is infeasible (a pinned or mandatory option
    below ``d``, or a fixed part above its budget)."""
    from layerlens_jax._src.problem import _equal_cost_groups, allowed_options

    cm = problem.cost_model
    if cm.batch_size != profile.batch_size:
        raise ValueError(f"CostModel.batch_size={cm.batch_size} differs from the step profile's "
                         f"batch size {profile.batch_size}; measure the profile on that batch")
    depths = site_depths(profile, problem.sites)
    pins = {int(i): None for i in np.flatnonzero(problem.pinned)}
    out = []
    for d in range(len(profile.groups) + 1):
        budget = problem.budget - np.array([profile.fixed(r)[d] for r in problem.resources])
        mask = problem.mask.copy()
        mask[depths < d, 1:] = False
        if (budget < 0).any() or not mask.any(axis=1).all():
            out.append(None)
            continue
        mask = allowed_options(problem.cost_rso, mask, budget)
        group = _equal_cost_groups(problem.utility, problem.cost_rso, mask, pins, problem.gain)
        out.append(dataclasses.replace(problem, mask=mask, budget=budget, group=group))
    if all(sub is None for sub in out):
        fixed = {r: min(profile.fixed(r)) for r in problem.resources}
        raise ValueError(f"budgets {dict(problem.budgets)} are below the whole step's smallest fixed "
                         f"part {fixed} (the frozen model's forward and parameters)")
    return out


def with_step_use(plan, sites: Sequence[Site], profile: StepProfile, lowest: int | None = None):
    """``plan`` with ``use`` of the whole step (fixed part of the plan's actual lowest adapted group
    added to its per-site costs) and ``metadata["step_cost"]``: the whole-step prediction of any
    plan, e.g. a hand-made baseline. ``lowest``: the group the allocator enumerated (recorded)."""
    from layerlens_jax._src.plan import Plan

    adapted = np.array([a.method != "none" for a in plan.allocations])
    chosen = np.array([[a.cost.get(r, 0.0) for r in RESOURCES] for a in plan.allocations])
    use = plan_step_cost(profile, sites, chosen, adapted)
    depths = site_depths(profile, sites)
    actual = int(depths[adapted].min()) if adapted.any() else len(profile.groups)
    meta = dict(plan.metadata)
    meta["step_cost"] = {**profile.to_dict(), "enumerated_depth": lowest,
                         "lowest_adapted_group": actual,
                         "fixed": {r: float(profile.fixed(r)[actual]) for r in STEP_RESOURCES}}
    return Plan.create(allocations=plan.allocations, budgets=dict(plan.budgets), use=use,
                       dual_bound=plan.dual_bound, objective=plan.objective,
                       peft_options=dict(plan.peft_options), solver=plan.solver, metadata=meta)
