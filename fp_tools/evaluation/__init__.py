"""Long-context accuracy suite (RULER-style, generated locally) and its runner.

::

    from fp_tools.evaluation import build_suite, evaluate, write_report
    suite = build_suite(tokenizer, lengths=["1K", "4K"], depths=[0.1, 0.5, 0.9])   # datasets.Dataset
    records = evaluate(model, tokenizer, suite, ["sdpa", "flashprefill"], "eval-out")  # resumable
    write_report(records, "eval-out")     # summary.csv/json/md + needle heatmaps
"""

from .report import summarize, write_report
from .runner import Implementation, evaluate, read_results
from .scoring import score
from .tasks import TASKS, build_case, build_suite, parse_length

__all__ = [
    "TASKS",
    "Implementation",
    "build_case",
    "build_suite",
    "evaluate",
    "parse_length",
    "read_results",
    "score",
    "summarize",
    "write_report",
]
