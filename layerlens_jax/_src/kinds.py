"""The site kinds, in one low module that :mod:`~layerlens_jax._src.sites` (which discovers sites)
and :mod:`~layerlens_jax._src.methods` (which says what each method attaches to) both import.
The kinds are described in :mod:`~layerlens_jax._src.sites`."""

__all__ = ["KINDS"]

#: The site kinds, in the order of the table in :mod:`layerlens_jax._src.sites`.
KINDS = ("linear", "attention", "block", "embedding", "norm", "conv")
