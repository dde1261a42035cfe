"""Synthetic q/k/v with the structure real attention has, for tests and benchmarks.

Random Gaussian q/k give near-uniform attention, so every block looks alike and FlashPrefill keeps
~100 % of them. :func:`structured_qkv` plants the three patterns seen in long-context models:

* **sinks**: the first ``sink_tokens`` keys share a strong direction that every query also holds;
* **local diagonal**: every key block gets a *topic* (one of ``topics`` random unit directions)
  and queries carry their own block's topic, so they attend their neighbourhood;
* **clustered blocks / vertical lines**: topics repeat across the sequence, so a query also hits
  the scattered earlier blocks that share its topic;
* **heads differ within a GQA group**: each query head also leans (with weight ``head_variation``)
  towards a topic of its own per block, so heads that share K/V still prefer different blocks.

With ``topics`` topics a query block matches about ``1/topics`` of the earlier blocks, so density at
a fixed alpha falls as ``topics`` grows; ``strength`` sets how sharp the logits are.
"""

from __future__ import annotations

import torch
from fp_kernels.geometry import normalize_ranges, num_key_blocks, num_query_slots, slot_geometry
from fp_kernels.reference import compact_block_mask


def structured_qkv(
    batch: int,
    seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    block_size: int = 128,
    topics: int = 16,
    strength: float = 1.0,
    sink_tokens: int = 64,
    head_variation: float = 0.8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [B, L, Hq, D]``, ``k``/``v [B, L, Hkv, D]`` with sinks, diagonals and clustered blocks."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    group = num_q_heads // num_kv_heads
    n_blocks = -(-seq_len // block_size)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    # per kv head: topic directions, a sink direction, and each block's topic
    topic_dirs = torch.nn.functional.normalize(randn(num_kv_heads, topics, head_dim), dim=-1)
    sink_dir = torch.nn.functional.normalize(randn(num_kv_heads, head_dim), dim=-1)
    block_topic = torch.randint(0, topics, (batch, num_kv_heads, n_blocks), generator=gen, device=device)
    token_topic = block_topic.repeat_interleave(block_size, dim=-1)[..., :seq_len]  # [B, Hkv, L]
    amp = strength * head_dim**0.5 * 0.75
    idx = token_topic.unsqueeze(-1).expand(-1, -1, -1, head_dim)
    topic_vec = torch.gather(topic_dirs.unsqueeze(0).expand(batch, -1, -1, -1), 2, idx)  # [B, Hkv, L, D]
    k = randn(batch, num_kv_heads, seq_len, head_dim) + amp * topic_vec
    k[:, :, :sink_tokens] += 1.5 * amp * sink_dir[None, :, None, :]
    v = randn(batch, num_kv_heads, seq_len, head_dim)
    # queries: their block's topic + the sink direction + per-head noise
    q_topic = topic_vec.repeat_interleave(group, dim=1)
    q_sink = sink_dir.repeat_interleave(group, dim=0)[None, :, None, :]
    q = randn(batch, num_q_heads, seq_len, head_dim) + amp * q_topic + 0.5 * amp * q_sink
    if head_variation:
        own = torch.randint(0, topics, (batch, num_q_heads, n_blocks), generator=gen, device=device)
        own = own.repeat_interleave(block_size, dim=-1)[..., :seq_len].unsqueeze(-1).expand(-1, -1, -1, head_dim)
        dirs = topic_dirs.repeat_interleave(group, dim=0).unsqueeze(0).expand(batch, -1, -1, -1)
        q = q + head_variation * amp * torch.gather(dirs, 2, own)
    return tuple(x.transpose(1, 2).to(dtype).contiguous() for x in (q, k, v))


def random_block_lists(
    batch: int,
    num_heads: int,
    q_len: int,
    k_len: int,
    block_size: int,
    density: float,
    *,
    device: str | torch.device = "cpu",
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    keep_diagonal: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random compact block lists ``(index [B, H, S, nkb], count [B, H, S])`` with about ``density`` of
    the visible blocks of every slot; the diagonal block is always listed when ``keep_diagonal``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    start, end = normalize_ranges(batch, k_len, kv_start, kv_end, device)
    n_slots = num_query_slots(q_len, k_len, block_size, kv_start is not None or kv_end is not None)
    geo = slot_geometry(q_len, k_len, block_size, start, end, n_slots, 0)
    n_vis = geo["n_vis"][:, None, :, None]
    j = torch.arange(num_key_blocks(k_len, block_size), device=device)
    # non-diagonal blocks kept with the probability that makes the expected count density * n_vis
    others = (n_vis - 1).clamp(min=1)
    p = ((density * n_vis - int(keep_diagonal)) / others).clamp(0.0, 1.0)
    keep = torch.rand(batch, num_heads, n_slots, j.numel(), generator=gen, device=device) < p
    if keep_diagonal:
        keep |= j == n_vis - 1
    return compact_block_mask(keep & (j < n_vis))
