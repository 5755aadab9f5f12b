"""`camelid eval`: perplexity, multiple-choice and generation tasks from local files, for any model camelid
loads, at any precision; and a `camelid` model for lm-evaluation-harness (camelid.eval.harness)."""

from camelid.eval.engine import Request, loglikelihood, rolling_windows
from camelid.eval.runner import Evaluator, Settings
from camelid.eval.tasks import Task, resolve_tasks

__all__ = ["Evaluator", "Request", "Settings", "Task", "loglikelihood", "resolve_tasks", "rolling_windows"]
