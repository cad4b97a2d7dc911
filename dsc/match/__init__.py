"""Shared matchers: how every pass reads the normal form of a graph.

- ``ops``: the op sets (copies, casts, views) and peeling of casts / permutes;
- ``contraction``: a contraction of two tensors as einsum letters, whatever its spelling;
- ``attention``: attention sites (Q·Kᵀ [· scale] [+ mask] → softmax → ·V, or SDPA);
- ``projection``: constant-weight projections (linear, matmul with Wᵀ, einsum against a view or slice
  of a weight), per-head views of them, fused and split K/V up-projections, a broadcast rope key;
- ``cache``: the canonical cache write (``index_put_`` on a cache input) and who reads a cache.

The matchers read the graph only after ``canonicalize`` and ``normalize`` (``passes/normalize.py``)
have reduced the spellings they do not list; they never edit a graph.
"""
