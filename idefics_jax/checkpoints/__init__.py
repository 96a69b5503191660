"""Checkpoints: Orbax storage, model names (shipped, local, preset, hub id, training workdir), hub downloads, local
and bucket paths, and `load_pretrained`."""
