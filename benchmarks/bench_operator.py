"""Operator benchmark (also ``flashprefill bench``): dense SDPA flash/cuDNN and FlexAttention vs FlashPrefill.

    python benchmarks/bench_operator.py --out benchmarks/results/operator_h100.json

Writes the JSON results and prints the Markdown tables (copied into benchmarks/README.md). The flags
are those of ``flashprefill bench --help`` (fp_tools.bench).
"""

import sys

from fp_tools import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", *sys.argv[1:]]))
