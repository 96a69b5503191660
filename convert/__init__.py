"""HF safetensors <-> idefics-jax Orbax checkpoints."""
