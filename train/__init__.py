"""Fine-tuning (see issue: optax training program)."""
