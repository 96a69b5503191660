"""Evaluation during training: held-out loss and exact-match accuracy of greedy answers, on `data.eval`.

Built once per run: the held-out records, the jitted loss and the questions are the same at every evaluation, so
evaluations are comparable and compile once.
"""

from __future__ import annotations

import jax

from idefics_jax.generation.chat import Chat, user_turn
from idefics_jax.train import sources, step as step_lib
from idefics_jax.train.collate import Collator
from idefics_jax.train.config import TrainConfig
from idefics_jax.train.data import LoaderConfig, batches
from idefics_jax.train.records import decode_images, from_example


def trained_chat(parts: step_lib.Split, collator: Collator, state, frozen, lora) -> Chat:
    """A Chat over the run's current weights (LoRA merged), seeing images as training does."""
    chat = Chat(step_lib.merge(parts, step_lib.full_params(frozen, state.trainable, lora)), collator.processor)
    chat.image_kwargs = collator.image_kwargs
    return chat


class Evaluator:
    """`evaluator(state, frozen) -> {"eval_loss", "eval_exact_match"}` for the trainable state of a run."""

    def __init__(self, cfg: TrainConfig, parts: step_lib.Split, collator: Collator, partitioning):
        self.cfg, self.parts, self.collator, self.partitioning = cfg, parts, collator, partitioning
        self.source = sources.source(cfg.data.eval, "eval", cfg)
        self.loss_fn = step_lib.make_loss(parts, lora=cfg.lora)
        n = min(cfg.eval_batches * cfg.data.batch_size, len(self.source))
        self.records = [from_example(self.source[i]) for i in range(n)]

    def __call__(self, state, frozen) -> dict:
        if jax.process_count() > 1:  # greedy decoding runs on one host's arrays: not in a multi-host run
            return {"eval_loss": self.loss(state, frozen)}
        return {"eval_loss": self.loss(state, frozen), "eval_exact_match": self.exact_match(state, frozen)}

    def loss(self, state, frozen) -> float:
        """Mean token loss over the first `eval_batches` batches (the same ones each time)."""
        cfg = self.cfg
        # data.batch_size is the global batch: each process reads its share (see train.data).
        rows = cfg.data.batch_size // jax.process_count()
        it = iter(batches(self.source, self.collator, LoaderConfig(batch_size=rows, shuffle=False, num_epochs=1,
                                                                    drop_remainder=False)))
        total = count = 0.0
        for _ in range(cfg.eval_batches):
            try:
                b = next(it)
            except StopIteration:
                break
            t, c = self.loss_fn(state.trainable, frozen, step_lib.put_batch(b, self.partitioning))
            total, count = total + float(t), count + float(c)
        return total / max(count, 1)

    def exact_match(self, state, frozen) -> float:
        """Fraction of the held-out records whose first question is answered exactly (greedy decoding)."""
        cfg = self.cfg
        chat = trained_chat(self.parts, self.collator, state, frozen, cfg.lora)
        tok = self.collator.processor.tokenizer
        conversations = []
        for r in self.records:
            images = decode_images(r)
            conversations.append((user_turn(r.texts[0].user, len(images)), images))
        answers = chat.answers(conversations, max_new_tokens=cfg.eval_generate_tokens,
                               batch_size=cfg.data.batch_size, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        right = sum(a == r.texts[0].assistant.strip() for a, r in zip(answers, self.records))
        return right / max(len(self.records), 1)
