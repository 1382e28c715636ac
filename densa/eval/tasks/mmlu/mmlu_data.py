"""lm-eval imports `!function` modules from the YAML's folder; the MMLU loader lives in ../local_data.py."""

from densa.eval.tasks.local_data import mmlu  # noqa: F401
