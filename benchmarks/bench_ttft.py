"""Time to first token, sdpa vs flashprefill: the same as ``flashprefill bench --ttft`` (see
:mod:`fp_tools.ttft` for the models, the rows and the options)::

    python benchmarks/bench_ttft.py --model smollm2 --lengths 4096 8192 16384 32768
    python benchmarks/bench_ttft.py --model llama8b --lengths 8192 32768 131072 --densities 0.05 0.2
"""

import argparse

from fp_patch import ttft

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ttft.add_arguments(parser)
    raise SystemExit(ttft.run(parser.parse_args()))
