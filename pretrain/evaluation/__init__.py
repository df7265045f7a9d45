"""Evaluations that run after each checkpoint: how good is the representation now?

    runner        Evaluator protocol, Forward, EvalRunner (runs them, records TB + JSON, survives errors)
    records       the run's eval records and watcher claims under <run_dir>/eval/
    features      frozen pre-logit features, data-parallel across ranks
    upstream      held-out loss / top-1 / top-5 of the pre-training task (collective)
    fewshot       closed-form ridge onto +-1 targets, k shots, several seeds (the paper's method)
    linear_probe  logistic regression on frozen features of the full train split
    finetune      short full fine-tune with a new head, top-1
    summary       table and plots of a run's records
"""
from .features import FeatureCache, extract_features
from .fewshot import FewShotEvaluator, fewshot_accuracy, ridge_solutions
from .finetune import EvalTimeout, FineTuneEvaluator
from .linear_probe import LinearProbeEvaluator, linear_probe_accuracy
from .records import EvalRecords
from .runner import EvalRunner, Evaluator, Forward
from .upstream import UpstreamEvaluator

__all__ = ["EvalRecords", "FeatureCache", "extract_features", "EvalRunner", "EvalTimeout", "Evaluator",
           "FewShotEvaluator", "FineTuneEvaluator", "Forward", "LinearProbeEvaluator", "UpstreamEvaluator",
           "fewshot_accuracy", "linear_probe_accuracy", "ridge_solutions"]
