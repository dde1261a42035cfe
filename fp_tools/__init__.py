"""Tools around FlashPrefill: the ``flashprefill`` command line (demo, bench, eval, calibrate,
inspect), the long-context evaluation suite, calibration, benchmarks and synthetic inputs.

Kept apart from ``fp_patch`` (whose import registers the attention and so loads Transformers) so
that the command line parses its flags and prints ``--help`` without importing torch. This
``__init__`` imports nothing; every module imports torch, Transformers and ``fp_patch`` where it
needs them.
"""
