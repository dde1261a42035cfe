"""Time to first token, sdpa vs flashprefill: the same as ``flashprefill bench --ttft`` (see
:mod:`fp_tools.ttft` for the models and the rows, ``flashprefill bench --help`` for the flags)::

    python benchmarks/bench_ttft.py --model smollm2 --lengths 4096 8192 16384 32768
    python benchmarks/bench_ttft.py --model llama8b --lengths 8192 32768 131072 --densities 0.05 0.2
"""

import sys

from fp_tools import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "--ttft", *sys.argv[1:]]))
