"""Method catalogue, cost model and gain model: what each (site, method, size) option costs and earns.

An *option* is a pair ``(method, size)``: ``("none", 0)``, ``("lora", r)``, ``("adapter", b)`` or
``("prefix", p)``. The :class:`Catalogue` lists the options (a size grid per method) and which site
kinds each method is compatible with. :func:`option_costs` gives, for every site and option, a cost
vector over the :data:`RESOURCES`; :class:`GainModel` gives the predicted gain.

Resources (one name for one thing, in code, JSON and CLI)
---------------------------------------------------------

==================  ====================================================================================
``params``          trainable parameters added (a count; exact, see below)
``train_flops``     extra training FLOPs per token of model input (forward + backward of the adapter path)
``infer_flops``     extra inference FLOPs per token of model input (0 for merged LoRA)
``vram_bytes``      extra training memory in bytes: adapter weights, their gradients, optimizer state,
                    and the activations the adapter path saves for backward over one batch
``latency``         extra inference latency in milliseconds for one batch of ``batch_size`` examples
==================  ====================================================================================

Notation: for a site, ``d_in`` / ``d_out`` are :attr:`Site.in_features` / :attr:`Site.out_features`
(flattened products for ``LinearGeneral`` kernels; for an ``Einsum`` the products of the kernel axes
it contracts and of those it carries to the output, :mod:`~layerlens_jax._src.einsum`;
``prod(kernel[:-1])`` and the output channels for ``conv``; vocabulary size and width for
``embedding``; the model width for ``block``), ``H`` and
``h`` the number of heads and head size of an ``attention`` site, ``n`` the positions per example
the site sees (:attr:`Site.tokens_per_example`, else ``CostModel.seq_len``), ``T`` the reference
sequence length (``CostModel.seq_len``, else the largest ``n`` over the sites), ``B`` the batch size.

Trainable parameters (exactly what the PEFT modules create)
-----------------------------------------------------------

* LoRA rank ``r`` on ``linear`` / ``conv``: ``r * (d_in + d_out)`` (A: ``(d_in, r)``, B: ``(r, d_out)``,
  no bias); on ``embedding``: ``r * (vocab + width)``.
* Adapter bottleneck ``b`` on a ``block`` of width ``d = d_out``: ``2*d*b + b + d`` (down kernel + bias,
  up kernel + bias).
* Prefix length ``p`` on ``attention``: ``2*p*H*h`` (learned keys and values). With the optional
  reparameterisation (``CostModel.prefix_projection = m > 0``, off by default) the trained parameters
  are instead ``p*d_in + (d_in*m + m) + (m*2*H*h + 2*H*h)`` (prefix embedding, then a two-layer MLP).

Forward FLOPs per position (multiply-add = 2 FLOPs), unmerged
-------------------------------------------------------------

* LoRA on ``linear``/``conv``: ``2*r*(d_in + d_out) + 2*d_out`` (x·A, (xA)·B, scale and add);
  on ``embedding``: ``2*r*width + 2*width`` (the row gather of A is free), plus, for a tied
  embedding also used as the output layer (:attr:`Site.attend_tokens` positions ``n_a``), that
  use's ``(2*r*(vocab + width) + 2*vocab) * n_a / n`` (``(h·Bᵀ)·Aᵀ``, scale and add).
* Adapter: ``4*d*b + 2*b + 2*d`` (two matmuls, bias + activation, bias + residual add).
* Prefix: ``4*p*H*h + 3*p*H`` (scores against p extra keys, probabilities times p extra values,
  softmax work on the extra columns).

Training FLOPs = 3 x forward for every method: the backward pass does one input-gradient product
and one parameter-gradient product per forward product (for the embedding LoRA the input gradient
of B's input plays that role; prefix tuning back-propagates into keys, values and the queries).
The prefix reparameterisation MLP, when on, runs once per step: ``3 * 2*p*(d_in*m + m*2*H*h)``
FLOPs per step, spread over the ``B*T`` tokens of the step. Inference FLOPs = forward FLOPs, except
0 for LoRA when ``CostModel.merge_lora`` (the default: ``W + s*A@B`` is folded before deployment).
Per-position FLOPs become per-token FLOPs by the factor ``n / T``.

Training memory (bytes)
-----------------------

``params * (w + w + k*s) + B * n * a * e`` with ``w`` the parameter dtype size (weights and their
gradients), ``k`` the optimizer's state slots per parameter (:data:`OPTIMIZER_STATE_SLOTS`:
sgd 0, momentum 1, adam/adamw 2, ...), ``s`` the optimizer-state dtype size, ``e`` the activation
dtype size and ``a`` the elements saved for backward per position: LoRA ``c_in + r`` (its input and
x·A; ``c_in`` = input channels, ``d_in`` except for conv, at rank 1 times
``CostModel.rank1_input_fraction``; ``r`` only for embedding, plus
``(width + r) * n_a / n`` for a tied embedding's attend use), adapter
``d + 2*b`` (input, pre- and post-activation), prefix ``p*H`` (attention probabilities on the extra
keys). The frozen base model's own memory is not counted: costs are increments. The whole step
(base parameters, backward through every layer above the lowest adapted one) is modelled in
:mod:`~layerlens_jax._src.step_cost` and used by ``allocate(..., step_profile=...)``.

Latency (milliseconds per inference batch)
------------------------------------------

``n_ops * latency_overhead_ms + B * n * forward_flops_per_position / flops_per_ms`` with ``n_ops``
the extra kernels (merged LoRA 0, unmerged LoRA 3, adapter 4, prefix 2). The defaults describe a
mid-range accelerator; :func:`calibrate_latency` fits both coefficients on the device at hand.

Gain model
----------

``g(site, method, size) = utility(site) * efficiency[method] * sigma_method(size)`` with a concave,
increasing saturation ``sigma`` with ``sigma(0) = 0`` (see :class:`GainModel`). Because ``g`` is the
utility times a function of the option alone, the per-site Lagrangian score ``u*a(k) - lambda.c(k)``
has increasing differences in ``(u, k)``: among sites with the same costs, a larger utility never
gets a smaller size (the allocator also enforces this exactly, see :mod:`layerlens_jax._src.allocate`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from layerlens_jax._src.methods import ADAPTER_METHODS, METHOD_KINDS, METHODS
from layerlens_jax._src.sites import KINDS, Site

__all__ = [
    "RESOURCES",
    "OPTIMIZER_STATE_SLOTS",
    "MethodSpec",
    "Catalogue",
    "CostModel",
    "GainModel",
    "trainable_params",
    "option_costs",
    "option_mask",
    "site_option_cost",
    "cost_class",
    "calibrate_latency",
]

RESOURCES = ("params", "train_flops", "infer_flops", "vram_bytes", "latency")
#: Optimizer state slots per trainable parameter (adafactor counted as one full slot: conservative).
OPTIMIZER_STATE_SLOTS: Mapping[str, float] = {
    "sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2, "adamw": 2, "nadam": 2, "nadamw": 2,
    "lamb": 2, "lion": 1, "rmsprop": 1, "adagrad": 1, "adafactor": 1,
}
_EXTRA_OPS = {"lora": 3, "adapter": 4, "prefix": 2}


def _check_int_sizes(method: str, sizes: Iterable[Any]) -> tuple[int, ...]:
    out = []
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or int(s) <= 0:
            raise ValueError(f"catalogue sizes for method {method!r} must be positive ints, got {s!r}")
        out.append(int(s))
    if len(set(out)) != len(out):
        raise ValueError(f"catalogue sizes for method {method!r} contain duplicates: {out}")
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One PEFT method of the catalogue: its size grid and the site kinds it may attach to."""

    name: str
    sizes: tuple[int, ...]
    kinds: tuple[str, ...] | None = None  # None: every kind the method has a formula for

    def __post_init__(self):
        if self.name not in ADAPTER_METHODS:
            raise ValueError(f"unknown method {self.name!r} in the catalogue; expected one of "
                             f"{ADAPTER_METHODS}")
        object.__setattr__(self, "sizes", _check_int_sizes(self.name, self.sizes))
        kinds = METHOD_KINDS[self.name] if self.kinds is None else tuple(self.kinds)
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"unknown site kind {k!r} for method {self.name!r}; expected {KINDS}")
            if k not in METHOD_KINDS[self.name]:
                raise ValueError(f"method {self.name!r} cannot attach to {k!r} sites (it has a cost "
                                 f"formula and a module for {METHOD_KINDS[self.name]} only)")
        object.__setattr__(self, "kinds", kinds)


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """The options an allocation chooses from.

    ``options()`` is ``("none", 0)`` followed by each method's sizes in ascending order: the column
    order of every sites x options matrix. ``cap_sizes``: LoRA ranks above ``min(d_in, d_out)`` and
    adapter bottlenecks above the block width add no expressivity, so they are incompatible with
    that site (prefix lengths are not capped).
    """

    methods: tuple[MethodSpec, ...] = (
        MethodSpec("lora", (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)),
        MethodSpec("adapter", (2, 4, 8, 16, 32, 64, 128)),
        MethodSpec("prefix", (1, 2, 4, 8, 16, 32, 64)),
    )
    cap_sizes: bool = True

    def __post_init__(self):
        methods = tuple(self.methods)
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"catalogue lists a method twice: {names}")
        object.__setattr__(self, "methods", methods)

    @classmethod
    def default(cls) -> "Catalogue":
        return cls()

    @classmethod
    def from_sizes(cls, cap_sizes: bool = True, **sizes: Sequence[int]) -> "Catalogue":
        """``Catalogue.from_sizes(lora=range(1, 65), adapter=(8, 16))``: only the methods named."""
        return cls(tuple(MethodSpec(name, tuple(s)) for name, s in sizes.items()), cap_sizes)

    def method(self, name: str) -> MethodSpec | None:
        return next((m for m in self.methods if m.name == name), None)

    def options(self) -> tuple[tuple[str, int], ...]:
        return (("none", 0),) + tuple((m.name, s) for m in self.methods for s in m.sizes)

    def with_sizes(self, extra: Mapping[str, Iterable[int]]) -> "Catalogue":
        """A catalogue whose size grids also hold ``extra[method]`` (used for pinned sizes)."""
        methods = []
        for m in self.methods:
            add = set(extra.get(m.name, ()))
            methods.append(dataclasses.replace(m, sizes=tuple(sorted(set(m.sizes) | add))))
        missing = [k for k, v in extra.items() if k != "none" and v and self.method(k) is None]
        for name in missing:
            methods.append(MethodSpec(name, tuple(sorted(set(extra[name])))))
        return dataclasses.replace(self, methods=tuple(methods))

    def compatible(self, kind: str, method: str) -> bool:
        if method == "none":
            return True
        m = self.method(method)
        return m is not None and kind in m.kinds

    def to_dict(self) -> dict[str, Any]:
        return {"methods": {m.name: {"sizes": list(m.sizes), "kinds": list(m.kinds)}
                            for m in self.methods},
                "cap_sizes": self.cap_sizes}


def _dtype_size(name: str, what: str) -> int:
    try:
        return int(np.dtype(name).itemsize) if name != "bfloat16" else 2
    except TypeError as e:
        raise ValueError(f"CostModel.{what}={name!r} is not a dtype name") from e


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Parameters of the analytic cost formulas (see the module docstring for the formulas)."""

    batch_size: int = 8
    seq_len: int | None = None
    param_dtype: str = "float32"
    activation_dtype: str = "float32"
    optimizer: str = "adamw"
    optimizer_state_dtype: str | None = None  # None: the parameter dtype
    merge_lora: bool = True
    # hidden width of the prefix reparameterisation MLP; 0 = off (plans record it as the PEFT
    # option prefix_reparam_hidden, None = off)
    prefix_projection: int = 0
    latency_overhead_ms: float = 0.005  # per extra kernel launch
    flops_per_ms: float = 1.0e10  # effective throughput (10 TFLOP/s)
    # the part of a rank-1 LoRA site's input (``c_in`` per position) its training step adds to
    # memory; 1: the adapter keeps its own copy (as at ranks >= 2). XLA turns rank-1 products
    # into vector operations on the input the frozen step keeps anyway, so a step profile
    # measures it (``StepProfile.rank1_input_fraction``)
    rank1_input_fraction: float = 1.0

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"CostModel.batch_size must be a positive int, got {self.batch_size!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len <= 0):
            raise ValueError(f"CostModel.seq_len must be a positive int or None, got {self.seq_len!r}")
        if self.optimizer not in OPTIMIZER_STATE_SLOTS:
            raise ValueError(f"CostModel.optimizer={self.optimizer!r} is unknown; expected one of "
                             f"{sorted(OPTIMIZER_STATE_SLOTS)}")
        for what in ("param_dtype", "activation_dtype"):
            _dtype_size(getattr(self, what), what)
        if self.optimizer_state_dtype is not None:
            _dtype_size(self.optimizer_state_dtype, "optimizer_state_dtype")
        if not isinstance(self.prefix_projection, int) or self.prefix_projection < 0:
            raise ValueError(f"CostModel.prefix_projection must be an int >= 0, got "
                             f"{self.prefix_projection!r}")
        for what in ("latency_overhead_ms", "flops_per_ms"):
            v = getattr(self, what)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"CostModel.{what} must be a finite number >= 0, got {v!r}")
        f = self.rank1_input_fraction
        if not (isinstance(f, (int, float)) and 0.0 <= f <= 1.0):
            raise ValueError(f"CostModel.rank1_input_fraction must be a number in [0, 1], got {f!r}")
        if self.flops_per_ms <= 0:
            raise ValueError(f"CostModel.flops_per_ms must be > 0, got {self.flops_per_ms!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_EFFICIENCY = {"lora": 1.0, "adapter": 0.95, "prefix": 0.7}
DEFAULT_SATURATION = {"lora": 1.0, "adapter": 2.0, "prefix": 2.0}


@dataclasses.dataclass(frozen=True)
class GainModel:
    """Predicted gain ``g = utility * efficiency[method] * sigma(size / scale[method])``.

    ``saturation`` picks the concave, increasing ``sigma`` with ``sigma(0) = 0``:

    * ``"hyperbolic"`` (default): ``sigma(x) = x / (1 + x)``: half the attainable gain at
      ``size = scale``, diminishing as ``1/size^2`` beyond;
    * ``"exp"``: ``sigma(x) = 1 - exp(-x)``: saturates fast;
    * ``"log"``: ``sigma(x) = log(1 + x)``: unbounded but concave.

    ``efficiency`` is the method's attainable gain relative to LoRA, ``scale`` the size at which the
    method reaches half (hyperbolic) of it. The defaults (:data:`DEFAULT_EFFICIENCY`,
    :data:`DEFAULT_SATURATION`) are measured on a validation split with
    ``scripts/calibrate_gain.py`` (pretrained MiniLM-L6, TREC-6): adapters on every block drop the
    validation loss 0.96x as much as uniform LoRA at about the same parameter count, prefix tuning
    0.68x, and LoRA r=4 as much as r=8 (LoRA saturates by rank ~1). Concavity is what makes the
    allocation well-posed: marginal gains fall with size, so a budget spreads over sites in order
    of utility, and the per-site choice is monotone in utility.
    """

    efficiency: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_EFFICIENCY))
    scale: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_SATURATION))
    saturation: str = "hyperbolic"

    def __post_init__(self):
        if self.saturation not in ("hyperbolic", "exp", "log"):
            raise ValueError(f"GainModel.saturation={self.saturation!r}; expected 'hyperbolic', "
                             f"'exp' or 'log'")
        for field in ("efficiency", "scale"):
            d = dict(getattr(self, field))
            for k, v in d.items():
                if k not in ADAPTER_METHODS:
                    raise ValueError(f"GainModel.{field} names unknown method {k!r}")
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                    raise ValueError(f"GainModel.{field}[{k!r}] must be a finite number >= 0, "
                                     f"got {v!r}")
                if field == "scale" and v <= 0:
                    raise ValueError(f"GainModel.scale[{k!r}] must be > 0, got {v!r}")
            object.__setattr__(self, field, d)

    def sigma(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.saturation == "hyperbolic":
            return x / (1.0 + x)
        if self.saturation == "exp":
            return -np.expm1(-x)
        return np.log1p(x)

    def shape(self, options: Sequence[tuple[str, int]]) -> np.ndarray:
        """``efficiency * sigma(size / scale)`` per option (float64 ``[O]``): gain per unit utility."""
        out = np.zeros(len(options))
        for j, (method, size) in enumerate(options):
            if method == "none":
                continue
            if method not in self.efficiency or method not in self.scale:
                raise ValueError(f"GainModel has no efficiency/scale for method {method!r}")
            out[j] = self.efficiency[method] * float(self.sigma(size / self.scale[method]))
        return out

    def gain(self, utility: np.ndarray, options: Sequence[tuple[str, int]]) -> np.ndarray:
        """Predicted gains ``[S, O]`` (float64) for utilities ``[S]``."""
        return np.asarray(utility, np.float64)[:, None] * self.shape(options)[None, :]

    def to_dict(self) -> dict[str, Any]:
        return {"efficiency": dict(self.efficiency), "scale": dict(self.scale),
                "saturation": self.saturation}


# ------------------------------------------------------------------------------------ formulas


def trainable_params(site: Site, method: str, size: int, *, prefix_projection: int = 0) -> int:
    """Exact trainable-parameter count of ``method(size)`` on ``site`` (the PEFT modules' count)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for site {site.path!r}; expected {METHODS}")
    if method == "none":
        return 0
    if site.kind not in METHOD_KINDS[method]:
        raise ValueError(f"method {method!r} is incompatible with site {site.path!r} of kind "
                         f"{site.kind!r} (compatible kinds: {METHOD_KINDS[method]})")
    f = _features(site, method)
    if method == "lora":
        return int(size) * (f["d_in"] + f["d_out"])
    if method == "adapter":
        d = f["d_out"]
        return 2 * d * int(size) + int(size) + d
    heads, hd = f["heads"], f["head_dim"]
    if prefix_projection:
        m, d = prefix_projection, f["d_in"]
        if not d:
            raise ValueError(f"site {site.path!r} lacks in_features, needed for the prefix "
                             f"reparameterisation parameter count")
        return int(size) * d + d * m + m + m * 2 * heads * hd + 2 * heads * hd
    return 2 * int(size) * heads * hd


def _features(site: Site, method: str) -> dict[str, int]:
    need = {"lora": ("in_features", "out_features"), "adapter": ("out_features",),
            "prefix": ("num_heads", "head_dim")}[method]
    missing = [n for n in need if not getattr(site, n)]
    if missing:
        raise ValueError(f"site {site.path!r} ({site.kind}) lacks {', '.join(missing)}, needed for "
                         f"the {method} cost formula; rediscover sites with example inputs "
                         f"(discover_sites(model, example=...)) or exclude this site")
    return {"d_in": site.in_features or 0, "d_out": site.out_features or 0,
            "heads": site.num_heads or 0, "head_dim": site.head_dim or 0}


def _conv_in_channels(site: Site) -> int:
    k = site.param_shapes.get("kernel")
    return int(k[-2]) if k is not None and len(k) >= 2 else int(site.in_features or 0)


def reference_seq_len(sites: Sequence[Site], cost_model: CostModel) -> int:
    """``T``: the cost model's ``seq_len``, else the largest positions-per-example over the sites."""
    if cost_model.seq_len is not None:
        return cost_model.seq_len
    known = [s.tokens_per_example for s in sites if s.tokens_per_example]
    return max(known) if known else 128


def option_mask(sites: Sequence[Site], options: Sequence[tuple[str, int]],
                catalogue: Catalogue) -> np.ndarray:
    """Compatibility ``[S, O]`` (bool): method allowed on the site's kind, size within the caps."""
    mask = np.zeros((len(sites), len(options)), bool)
    for i, site in enumerate(sites):
        if site.kind not in KINDS:
            raise ValueError(f"site {site.path!r} has unknown kind {site.kind!r}; expected {KINDS}")
        for j, (method, size) in enumerate(options):
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r} in the options; expected {METHODS}")
            if not catalogue.compatible(site.kind, method):
                continue
            if getattr(site, "stacked_module", None) and method not in ("none", "lora"):
                continue  # a layer of an nnx.vmap stack takes LoRA only (peft/stacked_lora.py)
            if catalogue.cap_sizes and method == "lora" and site.in_features and site.out_features:
                if size > min(site.in_features, site.out_features):
                    continue
            if catalogue.cap_sizes and method == "adapter" and site.out_features:
                if size > site.out_features:
                    continue
            mask[i, j] = True
    return mask


def option_costs(sites: Sequence[Site], options: Sequence[tuple[str, int]],
                 cost_model: CostModel | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Cost vectors ``[S, O, len(RESOURCES)]`` (float64) of every option on every site.

    Entries where the method does not apply to the site's kind (or ``mask`` is False) are 0 and must
    be masked by the caller (:func:`option_mask`). Formulas: see the module docstring.
    """
    cm = cost_model or CostModel()
    O = len(options)
    methods = np.array([METHODS.index(m) if m in METHODS else -1 for m, _ in options])
    if (methods < 0).any():
        bad = options[int(np.argmax(methods < 0))][0]
        raise ValueError(f"unknown method {bad!r} in the options; expected {METHODS}")
    k = np.array([s for _, s in options], np.float64)[None, :]
    applies = np.array([[s.kind in METHOD_KINDS[m] for m, _ in options] for s in sites], bool)
    if mask is not None:
        applies &= np.asarray(mask, bool)
    applies[:, methods == 0] = False
    for i, site in enumerate(sites):  # setup-time validation: name the site with missing features
        for m in {options[j][0] for j in np.flatnonzero(applies[i])}:
            _features(site, m)

    def col(name):
        return np.array([float(getattr(s, name) or 0) for s in sites])[:, None]

    d_in, d_out, heads, hd = col("in_features"), col("out_features"), col("num_heads"), col("head_dim")
    T = reference_seq_len(sites, cm)
    n = np.array([float(s.tokens_per_example or T) for s in sites])[:, None]
    kind = np.array([s.kind for s in sites])[:, None]
    emb = kind == "embedding"
    c_in = np.array([float(_conv_in_channels(s)) if s.kind == "conv" else float(s.in_features or 0)
                     for s in sites])[:, None]
    is_lora, is_adapter, is_prefix = (methods == 1)[None], (methods == 2)[None], (methods == 3)[None]
    m_proj = float(cm.prefix_projection)

    params = np.where(is_lora, k * (d_in + d_out), 0.0)
    params = np.where(is_adapter, 2 * d_out * k + k + d_out, params)
    kv = 2 * heads * hd
    prefix_params = (k * d_in + d_in * m_proj + m_proj + m_proj * kv + kv) if m_proj else k * kv
    params = np.where(is_prefix, prefix_params, params)

    fwd = np.where(is_lora, np.where(emb, 2 * k * d_out + 2 * d_out, 2 * k * (d_in + d_out) + 2 * d_out), 0.0)
    fwd = np.where(is_adapter, 4 * d_out * k + 2 * k + 2 * d_out, fwd)
    fwd = np.where(is_prefix, 4 * k * heads * hd + 3 * k * heads, fwd)
    # a tied embedding's LoRA also runs in its attend use: (h B^T) A^T, scale and add, per position
    attend = np.array([float(s.attend_tokens or 0) for s in sites])[:, None]
    attend_fwd = np.where(is_lora & emb, 2 * k * (d_in + d_out) + 2 * d_in, 0.0)
    per_token = n / T
    fwd = fwd + attend_fwd * attend / n  # per position of the lookup, so n / T makes it per token
    train = 3.0 * fwd * per_token
    if m_proj:
        step_tokens = cm.batch_size * T
        train = train + np.where(is_prefix, 6.0 * k * (d_in * m_proj + m_proj * kv) / step_tokens, 0.0)
    infer_fwd = np.where(is_lora & cm.merge_lora, 0.0, fwd)
    infer = infer_fwd * per_token

    w = _dtype_size(cm.param_dtype, "param_dtype")
    sdt = _dtype_size(cm.optimizer_state_dtype or cm.param_dtype, "optimizer_state_dtype")
    e = _dtype_size(cm.activation_dtype, "activation_dtype")
    slots = OPTIMIZER_STATE_SLOTS[cm.optimizer]
    act = np.where(is_lora, np.where(emb, k + (d_out + k) * attend / n,
                                     np.where(k == 1, cm.rank1_input_fraction, 1.0) * c_in + k),
                   0.0)
    act = np.where(is_adapter, d_out + 2 * k, act)
    act = np.where(is_prefix, k * heads, act)
    vram = params * (2 * w + slots * sdt) + cm.batch_size * n * act * e

    ops = np.zeros(O)
    for j, (method, _) in enumerate(options):
        if method == "lora":
            ops[j] = 0 if cm.merge_lora else _EXTRA_OPS["lora"]
        elif method in _EXTRA_OPS:
            ops[j] = _EXTRA_OPS[method]
    latency = (ops[None, :] * cm.latency_overhead_ms
               + cm.batch_size * n * infer_fwd / cm.flops_per_ms)

    out = np.stack([params, train, infer, vram, latency], axis=-1)
    out = np.where(applies[..., None], out, 0.0)
    return out


def site_option_cost(site: Site, method: str, size: int, cost_model: CostModel | None = None,
                     *, sites: Sequence[Site] | None = None) -> dict[str, float]:
    """The cost vector of one option on one site, as ``{resource: value}``.

    ``sites``: the whole site list, when the reference sequence length ``T`` should come from it
    (as in :func:`option_costs` over all sites); else ``T`` comes from this site alone.
    """
    cm = cost_model or CostModel()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for site {site.path!r}; expected {METHODS}")
    if method != "none" and site.kind not in METHOD_KINDS[method]:
        raise ValueError(f"method {method!r} is incompatible with site {site.path!r} of kind "
                         f"{site.kind!r} (compatible kinds: {METHOD_KINDS[method]})")
    if sites is not None and cm.seq_len is None:
        cm = dataclasses.replace(cm, seq_len=reference_seq_len(sites, cm))
    row = option_costs([site], [(method, int(size))], cm)[0, 0]
    return {r: float(v) for r, v in zip(RESOURCES, row)}


def cost_class(site: Site) -> str:
    """A key equal for sites whose cost vectors are equal for every option (same kind and shapes)."""
    return (f"{site.kind}:{site.in_features}x{site.out_features}"
            f":h{site.num_heads}x{site.head_dim}:n{site.tokens_per_example}")


# ------------------------------------------------------------------------------ calibration


def fastest_ms(fn: Callable, *args, repeats: int,
               timer: Callable[[], float] = time.perf_counter) -> float:
    """Milliseconds of the fastest of ``repeats`` runs of ``fn(*args)`` (jitted by the caller)
    after one warm-up (compile) call: the least disturbed run on a shared machine."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = timer()
        jax.block_until_ready(fn(*args))
        times.append(timer() - t0)
    return float(np.min(times)) * 1e3


def calibrate_latency(cost_model: CostModel | None = None, *, widths: Sequence[int] = (64, 256),
                      sizes: Sequence[int] = (4, 32), tokens: int = 512, repeats: int = 5,
                      timer: Callable[[], float] = time.perf_counter) -> CostModel:
    """Fit ``latency_overhead_ms`` and ``flops_per_ms`` by timing adapter layers on this device.

    Times the extra work each method adds at inference, jit-compiled on the default device, for a
    few widths and sizes: an unmerged LoRA path ``x@A@B*s + y``, a bottleneck adapter
    ``x + gelu(x@D + bd)@U + bu``, and a prefix-extended attention (minus the plain attention). The
    fastest of ``repeats`` timings per layer (the least disturbed) is fitted by non-negative least
    squares to ``t = n_ops * overhead + flops / throughput`` with the formulas above, after taking
    off the time of a near-empty jit call of the same inputs (dispatch, which an adapter inside a
    compiled model does not pay; without it the overhead came out at ~0.1 ms per kernel on a CPU
    and predicted 10-25x the measured unmerged latency of small models). Returns a copy of
    ``cost_model`` with the two coefficients replaced.
    """
    import jax
    import jax.numpy as jnp
    from scipy.optimize import nnls

    cm = cost_model or CostModel()
    key = jax.random.PRNGKey(0)

    def timed(fn, *args):
        return fastest_ms(jax.jit(fn), *args, repeats=repeats, timer=timer)

    rows, ys = [], []
    for d in widths:
        x = jax.random.normal(key, (tokens, d), jnp.float32)
        y = jax.random.normal(key, (tokens, d), jnp.float32)
        # a call's own dispatch cost (a jit call that does almost nothing): inside one compiled
        # model the adapter's operations pay none of it, so it is taken off every timing
        dispatch = timed(lambda x, y: x + y, x, y)
        for r in sizes:
            a = jax.random.normal(key, (d, r), jnp.float32)
            b = jax.random.normal(key, (r, d), jnp.float32)
            t_lora = timed(lambda x, y, a, b: y + (x @ a) @ b * 0.5, x, y, a, b) - dispatch
            rows.append([_EXTRA_OPS["lora"], tokens * (2 * r * 2 * d + 2 * d)])
            ys.append(max(t_lora, 0.0))
            bd, bu = jnp.zeros((r,)), jnp.zeros((d,))
            t_ad = timed(lambda x, a, b, bd, bu: x + jax.nn.gelu(x @ a + bd) @ b + bu,
                         x, a, b, bd, bu) - dispatch
            rows.append([_EXTRA_OPS["adapter"], tokens * (4 * d * r + 2 * r + 2 * d)])
            ys.append(max(t_ad, 0.0))
            heads = max(1, d // 64)
            hd = d // heads
            q = x.reshape(tokens, heads, hd)
            kp = jax.random.normal(key, (r, heads, hd), jnp.float32)

            def attn(q, k, v):
                s = jnp.einsum("thd,khd->htk", q, k)
                return jnp.einsum("htk,khd->thd", jax.nn.softmax(s, -1), v)

            base = timed(lambda q: attn(q, q, q), q)
            ext = timed(lambda q, kp: attn(q, jnp.concatenate([kp, q]), jnp.concatenate([kp, q])),
                        q, kp)
            rows.append([_EXTRA_OPS["prefix"], tokens * (4 * r * heads * hd + 3 * r * heads)])
            ys.append(max(ext - base, 0.0))
    A, yv = np.array(rows, np.float64), np.array(ys, np.float64)
    scale = A.max(0)
    coef, _ = nnls(A / scale, yv)
    overhead, per_flop = coef / scale
    flops_per_ms = 1.0 / per_flop if per_flop > 0 else cm.flops_per_ms
    return dataclasses.replace(cm, latency_overhead_ms=float(overhead), flops_per_ms=float(flops_per_ms))
