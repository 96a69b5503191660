"""Benchmarks during training (`eval.tasks`): each task scored on the run's current weights by the evaluation
runner, the answers and scores `idefics-jax eval` would give for a checkpoint of this step.

Each evaluation writes WORKDIR/eval/step-N/NAME (the runner's samples.jsonl and results.json; a temporary folder
when WORKDIR is a bucket) and returns `{"eval_NAME_METRIC": score}`, e.g. `eval_docvqa_anls`.
"""

from __future__ import annotations

import logging
import os
import tempfile

import jax

from idefics_jax.checkpoints.paths import is_remote
from idefics_jax.evaluate import runner
from idefics_jax.evaluate.data import Dataset
from idefics_jax.evaluate.tasks import get
from idefics_jax.train import step as step_lib
from idefics_jax.train.collate import Collator
from idefics_jax.train.config import TrainConfig
from idefics_jax.train.evaluate import trained_chat

log = logging.getLogger(__name__)


class Benchmarks:
    """`benchmarks(state, frozen) -> {"eval_NAME_METRIC": score, ...}` for `cfg.eval.tasks`."""

    def __init__(self, cfg: TrainConfig, parts: step_lib.Split, collator: Collator):
        self.cfg, self.parts, self.collator = cfg, parts, collator
        for t in cfg.eval.tasks:  # unreadable data fails now, not at the first evaluation
            if len(Dataset(t.data)) == 0:
                raise ValueError(f"eval.tasks: {t.data} holds no samples")
        self.out = (tempfile.mkdtemp(prefix="idefics-jax-eval-") if is_remote(cfg.workdir)
                    else os.path.join(os.fspath(cfg.workdir), "eval"))
        self.warned = False

    def __call__(self, state, frozen) -> dict:
        if jax.process_count() > 1:  # the engine decodes one host's arrays: not in a multi-host run
            if not self.warned:
                log.warning("eval.tasks: not scored in a run of several processes; run `idefics-jax eval` on a "
                            "checkpoint instead")
                self.warned = True
            return {}
        chat = trained_chat(self.parts, self.collator, state, frozen, self.cfg.lora)
        step, scores = int(state.step), {}
        for t in self.cfg.eval.tasks:
            name = t.name or t.task
            r = runner.run(chat, get(t.task), t.data, os.path.join(self.out, f"step-{step}", name),
                           limit=t.limit or None, batch_size=self.cfg.eval.batch_size, shard=(0, 1), progress=False)
            scores[f"eval_{name}_{r['metric']}"] = r["score"]
        return scores
