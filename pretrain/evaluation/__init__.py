"""Evaluations that run after each checkpoint: how good is the representation now?

    runner        Evaluator protocol, EvalRunner (runs them, records TB + JSON, survives errors)
    registry      evaluators by name: the builder of each ``eval.<name>`` config section, EvalContext
    records       the run's eval records and watcher claims under <run_dir>/eval/
    features      frozen pre-logit features, data-parallel across ranks
    upstream      held-out loss / top-1 / top-5 of the pre-training task (collective)
    fewshot       closed-form ridge onto +-1 targets, k shots, several seeds (the paper's method)
    linear_probe  logistic regression on frozen features of the full train split
    finetune      short full fine-tune with a new head, top-1
    summary       table and plots of a run's records

Importing the package registers every evaluator module's builder (``registry.EVALUATORS``).
"""
from .features import FeatureCache, extract_features
from .fewshot import FewShotEvaluator, fewshot_accuracy, ridge_solutions
from .finetune import EvalTimeout, FineTuneEvaluator
from .linear_probe import LinearProbeEvaluator, linear_probe_accuracy
from .records import EvalRecords
from .registry import EVALUATORS, EvalContext, register
from .runner import EvalRunner, Evaluator
from .upstream import UpstreamEvaluator

__all__ = ["EVALUATORS", "EvalContext", "EvalRecords", "FeatureCache", "extract_features", "EvalRunner",
           "EvalTimeout", "Evaluator", "FewShotEvaluator", "FineTuneEvaluator", "LinearProbeEvaluator",
           "UpstreamEvaluator", "fewshot_accuracy", "linear_probe_accuracy", "register", "ridge_solutions"]
