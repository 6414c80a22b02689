"""Nested-dict helpers shared by the PEFT shells and checkpoints (the lowest PEFT module).

A Linen parameter dict, the canonical adapter state and an orbax checkpoint tree are plain nested
mappings; these functions move between that nesting and a flat ``{path tuple: leaf}`` view, and
split / join the adapter (``peft_*``) and base leaves. Nothing here imports another PEFT module, so
:mod:`~layerlens_jax._src.peft.apply`, :mod:`~layerlens_jax._src.peft.linen` and
:mod:`layerlens_jax._src.checkpoint` all import it without a cycle.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["PEFT_PREFIX", "flatten_tree", "unflatten_tree", "partition_params", "combine_params"]

#: Every adapter leaf's name starts with this (``peft_lora_a``, ``peft_adapter_up``, ...).
PEFT_PREFIX = "peft_"


def flatten_tree(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{path: leaf}`` of a nested mapping, each path a tuple of ``str`` keys.

    >>> flatten_tree({"a": {"b": 1}, "c": 2})
    {('a', 'b'): 1, ('c',): 2}
    """
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def unflatten_tree(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """Inverse of :func:`flatten_tree`: nested ``dict`` from ``{path tuple: leaf}``.

    >>> unflatten_tree({("a", "b"): 1, ("c",): 2})
    {'a': {'b': 1}, 'c': 2}
    """
    out: dict = {}
    for k, v in flat.items():
        d = out
        for part in k[:-1]:
            d = d.setdefault(part, {})
        d[k[-1]] = v
    return out


def partition_params(params: Mapping) -> tuple[dict, dict]:
    """Split a Linen params dict into ``(adapter, base)`` nested dicts (disjoint, same nesting).

    >>> partition_params({"dense": {"kernel": 1, "peft_lora_a": 2}})
    ({'dense': {'peft_lora_a': 2}}, {'dense': {'kernel': 1}})
    """
    flat = flatten_tree(params)
    adapters = {k: v for k, v in flat.items() if k[-1].startswith(PEFT_PREFIX)}
    base = {k: v for k, v in flat.items() if not k[-1].startswith(PEFT_PREFIX)}
    return unflatten_tree(adapters), unflatten_tree(base)


def combine_params(*trees: Mapping) -> dict:
    """Inverse of :func:`partition_params`; ``ValueError`` naming a leaf found in two trees."""
    flat: dict = {}
    for t in trees:
        for k, v in flatten_tree(t).items():
            if k in flat:
                raise ValueError(f"parameter {'/'.join(k)!r} appears in more than one partition")
            flat[k] = v
    return unflatten_tree(flat)
