"""Evaluation: every version measured against another on the suites in data/evals/, then gated.

Entry points (the REST, CLI and UI doors call these):
- `evaluate(store, backend, version, against, suites, seed, judge, ...)` -> the comparison dict;
- `start_eval(...)` records an evaluation and runs it on a worker thread; `get_eval`, `list_evals`;
- `gate_decision(metrics, rebattle_verdict, config, waived)` and `GateConfig` / `load_gate_config`;
- `judge_human_agreement(store, judge, version, against)`.
"""

from studio.evals.engine import EvalError, evaluate, get_eval, list_evals, plan_eval, run_items, start_eval
from studio.evals.gate import GateConfig, gate_decision, load_gate_config, rebattle_verdict
from studio.evals.judge import Judge, JudgeError, JudgeSpec, judge_human_agreement
from studio.evals.suites import SuiteError, available_suites, load_suite, pick_suites

__all__ = [
    "EvalError",
    "GateConfig",
    "Judge",
    "JudgeError",
    "JudgeSpec",
    "SuiteError",
    "available_suites",
    "evaluate",
    "gate_decision",
    "get_eval",
    "judge_human_agreement",
    "list_evals",
    "load_gate_config",
    "load_suite",
    "pick_suites",
    "plan_eval",
    "rebattle_verdict",
    "run_items",
    "start_eval",
]
