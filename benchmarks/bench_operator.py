"""Operator benchmark (also ``flashprefill bench``): dense SDPA flash/cuDNN vs FlashPrefill.

    python benchmarks/bench_operator.py --out benchmarks/results/operator_h100.json

Writes the JSON results and prints a Markdown table (copied into benchmarks/README.md).
"""

import argparse
import sys

from fp_tools import benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchmark.add_arguments(parser)
    sys.exit(benchmark.run(parser.parse_args()))
