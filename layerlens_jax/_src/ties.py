"""Tied decisions: sites that must share one option (method, size), e.g. the same projection in
every layer.

A careful user adapts "the value projection of every layer at rank 4", not "layer 3's value at
rank 7": the decision is per *kind of site*, repeated over layers. ``allocate(..., tie="layers")``
makes the allocator choose at that granularity: sites whose paths differ only in their layer
indices form one group, and every member takes the group's option. The tied problem is the
original one with each group collapsed into one row (gains and costs summed over the members,
an option allowed only if it is allowed at every member), so the solver, the float64 budget
repair and the dual bound are unchanged; the bound certifies the *tied* problem's optimum.

Pinned sites are never tied (each stays its own group), except the layers of an ``nnx.scan``
stack (``Site.stacked_module``): they are always one group, with or without ``tie``, because
``apply_plan`` stores one padded LoRA of the stack's largest rank for all of them (per-layer ranks
would cost ``L x max rank``, more than the sum of their per-site costs); a pin on one of them must
be shared by all.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from layerlens_jax._src.problem import Problem, allowed_options
from layerlens_jax._src.sites import Site

__all__ = ["TIES", "needs_ties", "tie_key", "tie_labels", "tie_problem"]

TIES = ("layers",)  # the named tie rules; a callable ``Site -> str`` is accepted too

_INDEXED = re.compile(r"^(?:\d+|(.*?_)\d+)$")  # "3" or "layers_3" / "layer_12"


def tie_key(path: str) -> str:
    """``path`` with every layer index replaced by ``*`` (a component that is a number, or that
    ends in ``_<number>``): ``encoder/layers_3/attention/query`` -> ``encoder/layers_*/attention/
    query``; ``layers/3/mlp/fc1`` -> ``layers/*/mlp/fc1``."""
    parts = []
    for part in path.split("/"):
        m = _INDEXED.match(part)
        parts.append(part if m is None else (m.group(1) or "") + "*")
    return "/".join(parts)


def needs_ties(sites: Sequence[Site], tie) -> bool:
    """Whether allocation must go through :func:`tie_labels`: a ``tie`` rule, or stacked sites."""
    return tie is not None or any(getattr(s, "stacked_module", None) for s in sites)


def tie_labels(sites: Sequence[Site], tie: str | Callable[[Site], str] | None,
               pinned: Sequence[bool] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(labels [S], keys [G])``: each site's group and the groups' keys, in first-seen order.

    ``tie``: ``"layers"`` (:func:`tie_key`), a function from a site to its group key, or None (only
    the layers of a stack are tied). Sites of one group must have the same kind and parameter
    shapes (else their costs differ in ways the group hides); a ``ValueError`` names the two
    sites. ``pinned`` sites form groups of their own, except stacked layers (module docstring).
    """
    if tie is None:
        key_of = lambda s: s.path  # noqa: E731
    elif callable(tie):
        key_of = tie
    elif tie == "layers":
        key_of = lambda s: tie_key(s.path)  # noqa: E731
    else:
        raise ValueError(f"tie must be one of {TIES} or a function of a site, got {tie!r}")
    pinned = np.zeros(len(sites), bool) if pinned is None else np.asarray(pinned, bool)
    index: dict[str, int] = {}
    first: dict[str, Site] = {}
    labels = np.empty(len(sites), np.int64)
    for i, site in enumerate(sites):
        stack = getattr(site, "stacked_module", None)
        if stack:
            key = f"{stack} (stack)"
        elif pinned[i]:
            key = f"{site.path} (pinned)"
        else:
            key = str(key_of(site))
        if key in first and (first[key].kind, first[key].param_shapes) != (
                site.kind, site.param_shapes):
            raise ValueError(f"tie: sites {first[key].path!r} and {site.path!r} share the group "
                             f"{key!r} but differ in kind or parameter shapes")
        first.setdefault(key, site)
        labels[i] = index.setdefault(key, len(index))
    return labels, tuple(index)


def tie_problem(problem: Problem, labels: np.ndarray) -> Problem:
    """The problem with each group of ``labels`` collapsed into one row (its first member's site):
    gains, costs and utilities summed, an option allowed only where every member allows it."""
    labels = np.asarray(labels, np.int64)
    n = int(labels.max()) + 1 if labels.size else 0
    onehot = np.zeros((n, len(labels)))
    onehot[labels, np.arange(len(labels))] = 1.0
    firsts = np.unique(labels, return_index=True)[1]  # each group's first member
    allowed = np.ones((n, problem.mask.shape[1]), bool)
    np.logical_and.at(allowed, labels, np.asarray(problem.mask, bool))
    tied = dataclasses.replace(
        problem, sites=tuple(problem.sites[i] for i in firsts), utility=onehot @ problem.utility,
        cost=np.einsum("gs,sor->gor", onehot, problem.cost), group=np.arange(n),
        pinned=problem.pinned[firsts])
    allowed = allowed_options(tied.cost_rso, allowed, problem.budget)  # a group's option must fit
    stuck = np.flatnonzero(~allowed.any(axis=1))
    if stuck.size:
        site = tied.sites[int(stuck[0])]
        raise ValueError(f"tied group of site {site.path!r} has no option allowed at every member "
                         f"(different pins or size limits within the group, or its options "
                         f"together exceed a budget)")
    return dataclasses.replace(tied, mask=allowed,
                               gain=np.where(allowed, onehot @ problem.gain, 0.0))
