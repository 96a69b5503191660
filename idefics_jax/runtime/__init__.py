"""The process around the model: progress display and joining `jax.distributed`."""
