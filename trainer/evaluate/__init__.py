"""Evaluation of a policy: greedy accuracy, vision dependency and sampled avg@k, as the paper reports,
for the periodic eval of ``papo train`` and for ``papo eval --checkpoint DIR``.

``report`` (settings, results, the report files), ``evaluator`` (the conditions over a generate
and a grade function, no Ray), ``checkpoint`` (``papo eval``: paths, config, local engine).
"""

from trainer.evaluate.checkpoint import (
    RUN_CONFIG,
    check_checkpoint,
    evaluate_checkpoint,
    find_run_config,
    load_eval_config,
)
from trainer.evaluate.evaluator import (
    CONDITIONS,
    Evaluator,
    GenerateFn,
    GradeFn,
    NothingServed,
    PutFn,
    evaluate_examples,
)
from trainer.evaluate.report import (
    ConditionStats,
    DatasetEval,
    EvalError,
    EvalReport,
    EvalSettings,
    report_paths,
    write_report,
)

__all__ = [
    "CONDITIONS",
    "RUN_CONFIG",
    "ConditionStats",
    "DatasetEval",
    "EvalError",
    "EvalReport",
    "EvalSettings",
    "Evaluator",
    "GenerateFn",
    "GradeFn",
    "NothingServed",
    "PutFn",
    "check_checkpoint",
    "evaluate_checkpoint",
    "evaluate_examples",
    "find_run_config",
    "load_eval_config",
    "report_paths",
    "write_report",
]
