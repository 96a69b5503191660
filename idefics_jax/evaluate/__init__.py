"""Evaluation on standard benchmarks with their official metrics (`idefics-jax eval`, `run`)."""

from idefics_jax.evaluate.runner import run
from idefics_jax.evaluate.tasks import TASKS

__all__ = ["TASKS", "run"]
