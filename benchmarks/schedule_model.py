"""How long the sm_90 kernel's work list takes on a model of its schedule, per order of the list (no GPU).

    python benchmarks/schedule_model.py [--lengths 4096 32768] [--spans 1 4 8 16 32] [--programs 132]

The operator's own block lists (the selection of ``bench_operator``: alpha 0.18, 2 sink / 4 window / 2 last
dense blocks, per head, on ``fp_tools.synthetic.structured_qkv``, computed by the PyTorch reference: the same
selection as the kernels) give each work item (query head, slot) a cost of its block count plus one (the
item's queries and its last value dot). ``--programs`` programs take items as the kernel does: item ``p``
first, then the next one on the work counter whenever one finishes; the order is
``sparse_attention_sm90``'s (span 1: head after head, each head's longest rows first) or spans of several
heads (the longest rows of a span's heads first together). Printed per length and span: the model's
makespan over the balanced time (total cost / programs). A model, not a timing: it leaves out L2 reuse,
which a span of several kv heads' keys may lose at long prompts.
"""

from __future__ import annotations

import argparse
import heapq

import torch


def makespan(costs: list[float], order: list[int], programs: int) -> float:
    """Finish time of the last program when ``programs`` take ``order``'s items first by id, then from a counter."""
    items = iter(order)
    running = [(costs[w], p) for p, w in zip(range(programs), items, strict=False)]  # (range first: no item lost)
    heapq.heapify(running)
    for w in items:
        t, p = heapq.heappop(running)
        heapq.heappush(running, (t + costs[w], p))
    return max(t for t, _ in running)


def kernel_order(n_slots: int, n_heads: int, span: int) -> list[int]:
    """Item ids ``h * n_slots + s`` in spans of ``span`` heads, each span's longest rows first (batch 1; span 1
    is the order of ``sparse_attention_sm90._item``)."""
    order = []
    for w in range(n_slots * n_heads):
        r = w % (span * n_slots)
        h = w // (span * n_slots) * span + r % span
        order.append(h * n_slots + n_slots - 1 - r // span)
    return order


def main() -> None:
    from fp_kernels import BlockRules
    from fp_kernels.geometry import normalize_ranges, num_query_slots, slot_geometry
    from fp_kernels.reference import block_scores_reference, select_blocks_reference

    from fp_tools.synthetic import structured_qkv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--spans", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--programs", type=int, default=132, help="programs at work (H100 SXM: 132 SMs)")
    args = parser.parse_args()
    rules = BlockRules(alpha=0.18, block_size=128, sink_blocks=2, window_blocks=4, last_dense_blocks=2)
    spans = [s for s in args.spans if args.heads % s == 0]
    print(f"Schedule model, {args.heads} q / {args.kv_heads} kv heads, D={args.head_dim}, {args.programs} programs: "
          "makespan / balanced time per head span of the work list (1 = head after head).\n")
    print("| L | density | " + " | ".join(f"span {s}" for s in spans) + " |")
    print("|---|---|" + "---|" * len(spans))
    for seq_len in args.lengths:
        q, k, _ = structured_qkv(1, seq_len, args.heads, args.kv_heads, args.head_dim, block_size=128, seed=seq_len)
        n_slots = num_query_slots(seq_len, seq_len, 128, False)
        geo = slot_geometry(seq_len, seq_len, 128, *normalize_ranges(1, seq_len, None, None, q.device), n_slots,
                            rules.last_dense_blocks)
        with torch.no_grad():
            scores = block_scores_reference(q, k, 128, args.head_dim**-0.5, None, None)
        _, count = select_blocks_reference(scores, geo["n_vis"], geo["dense"], rules, 1)
        costs = (count[0].double() + 1).reshape(-1).tolist()  # item h * n_slots + s
        density = float(count.sum()) / (args.heads * n_slots * (n_slots + 1) / 2)
        balanced = sum(costs) / args.programs
        ratios = [makespan(costs, kernel_order(n_slots, args.heads, s), args.programs) / balanced for s in spans]
        print(f"| {seq_len // 1024}K | {density:.1%} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
