"""Fixed-density runs through the public knobs: the ``min_budget`` that gives a target block density.

A benchmark that wants sparse prefill "at 20 % density" runs the real operator with ``alpha=1.0``
(keep only each query block's best key block) plus ``min_budget=n`` (and its ``n`` best-scoring
blocks): the real selection runs with its real cost on every call, and the kernels compute about
the asked share of blocks. :func:`budget_for_density` solves ``n`` from the target, the prompt
length, the block size and the always-kept blocks (sinks, local window, last dense query blocks).

The density counted is the operator's (``info.density``): blocks computed over causally visible
blocks, over all query blocks of the prompt. :func:`expected_density` is the model the solver
inverts. For query block ``i`` (``V = i + 1`` visible key blocks) it keeps every visible block in
the last ``last_dense_blocks`` query blocks; elsewhere the ``F`` always-kept blocks (first
``sink_blocks`` and last ``window_blocks``, overlapping near the start) plus the ``m = max(n, 1)``
best blocks, of which on average ``m * (V - F) / V`` fall outside the always-kept ones when the
scores rank blocks in no particular order (random weights). On a real model, whose best blocks are
often the sinks or the local window, the realised density is somewhat lower: benchmarks measure
and print the density they got.
"""

from __future__ import annotations

from fp_kernels.rules import BlockRules


def expected_density(q_len: int, min_budget: int, rules: BlockRules | None = None) -> float:
    """Expected block density of a causal prefill of ``q_len`` tokens with ``alpha=1.0`` and
    ``min_budget`` (the model in the module docstring); 1.0 for a prompt of one block or none.
    ``rules`` (default :class:`fp_kernels.BlockRules`) gives the block size and the always-kept blocks;
    its ``alpha`` and ``min_budget`` are not read (a ``FlashPrefillConfig`` works too)."""
    rules = BlockRules() if rules is None else rules
    block_size, sink_blocks, window_blocks, last_dense_blocks = (
        rules.block_size, rules.sink_blocks, rules.window_blocks, rules.last_dense_blocks)
    n_blocks = -(-q_len // block_size)
    if n_blocks <= 1:
        return 1.0
    best = max(min_budget, 1)
    kept = visible = 0.0
    for i in range(n_blocks):
        v = i + 1
        visible += v
        if i >= n_blocks - last_dense_blocks:
            kept += v
            continue
        sinks = min(sink_blocks, v)
        window_lo = max(0, i - window_blocks + 1) if window_blocks > 0 else v
        forced = sinks + (v - max(window_lo, sinks))  # the window's blocks not already sinks
        free = v - forced
        kept += forced + min(best, v) * free / v
    return kept / visible


def budget_for_density(q_len: int, density: float, rules: BlockRules | None = None) -> int:
    """The ``min_budget`` whose :func:`expected_density` (with ``alpha=1.0``) is nearest ``density``, for
    the block size and always-kept blocks of ``rules`` (default :class:`fp_kernels.BlockRules`).

    A target below what the always-kept blocks alone give returns 0 (the best block only); a target
    of 1.0 returns the number of key blocks (every visible block)::

        cfg = cfg.replace(alpha=1.0, min_budget=budget_for_density(32768, 0.2, cfg))
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    if isinstance(q_len, bool) or not isinstance(q_len, int) or q_len < 1:
        raise ValueError(f"q_len must be a positive integer (prompt tokens), got {q_len!r}")
    rules = BlockRules() if rules is None else rules
    lo, hi = 0, -(-q_len // rules.block_size)  # expected_density grows with the budget: bisect on it
    while lo < hi:
        mid = (lo + hi) // 2
        if expected_density(q_len, mid, rules) < density:
            lo = mid + 1
        else:
            hi = mid
    # lo: the smallest budget reaching the target; lo - 1 may be nearer
    if lo > 0 and density - expected_density(q_len, lo - 1, rules) < expected_density(q_len, lo, rules) - density:
        return lo - 1
    return lo
