"""A training run's newest checkpoint (base weights, trained parameters, LoRA adapters merged) as an HF directory."""

from __future__ import annotations

from idefics_jax.checkpoints.paths import check_new
from idefics_jax.convert.orbax_to_hf import write_hf
from idefics_jax.train.loading import trained_model


def export_run(workdir: str, dst: str, progress: bool = True) -> None:
    """A training run's newest checkpoint (LoRA adapters merged) -> HF directory `dst`."""
    check_new(dst)
    model, side_files = trained_model(workdir)
    write_hf(model, side_files, dst, progress)
