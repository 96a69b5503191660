"""Model names -> where the model is: the one resolver behind every place a model is named (`load_pretrained`,
`Chat.load`, `idefics-jax convert SRC`, `generate`, `serve` and `eval --model`, a training config's `model:`).

`resolve` tries, in this order:

1. a model shipped in the package ("tiny-shapes"): its directory there. A shipped name means the same model from
   any working directory; `./tiny-shapes` reaches a local folder of that name.
2. an existing path (local, `gs://...`, any `etils.epath` path): a training WORKDIR (`is_run`) gives its newest
   complete checkpoint, `WORKDIR/checkpoints/STEP` (`run_step` reads the run and step back from it); any other
   path is itself.
3. a preset name ("smolvlm-256m"): the hub id of the checkpoint it describes (`PRESET_TABLE`);
4. a hub id `org/name` or `org/name@revision`: its snapshot in the hub cache, downloaded when missing
   (`idefics_jax.checkpoints.hub.download`).

A WORKDIR's checkpoint holds the run's trainable state only; building its model (base weights, adapters merged)
is the training layer's (`idefics_jax.train.loading.trained_model`), so this module knows the run's layout on disk
but imports nothing of training.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

from idefics_jax.checkpoints.checkpoint import CheckpointError
from idefics_jax.checkpoints.hub import download, parse_hub_id
from idefics_jax.checkpoints.paths import as_path
from idefics_jax.model import presets
from idefics_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named architecture and, when one is published, the hub id of the checkpoint it describes."""

    config: ModelConfig
    hub_id: str | None = None  # None: an architecture only (the tiny test models), nothing to download


PRESET_TABLE: dict[str, Preset] = {
    # HuggingFaceM4/idefics2-8b and idefics2-8b-base share one architecture.
    "idefics2-8b": Preset(presets.IDEFICS2_8B, "HuggingFaceM4/idefics2-8b"),
    "idefics2-8b-base": Preset(presets.IDEFICS2_8B, "HuggingFaceM4/idefics2-8b-base"),
    "idefics3-8b-llama3": Preset(presets.IDEFICS3_8B_LLAMA3, "HuggingFaceM4/Idefics3-8B-Llama3"),
    "smolvlm-256m": Preset(presets.SMOLVLM_256M, "HuggingFaceTB/SmolVLM-256M-Instruct"),
    "smolvlm-500m": Preset(presets.SMOLVLM_500M, "HuggingFaceTB/SmolVLM-500M-Instruct"),
    "smolvlm-2.2b": Preset(presets.SMOLVLM_2_2B, "HuggingFaceTB/SmolVLM-Instruct"),
    "smolvlm2-256m": Preset(presets.SMOLVLM2_256M, "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"),
    "smolvlm2-500m": Preset(presets.SMOLVLM2_500M, "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"),
    "smolvlm2-2.2b": Preset(presets.SMOLVLM2_2_2B, "HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
    "tiny": Preset(presets.TINY),
    "tiny-idefics2": Preset(presets.TINY_IDEFICS2),
}
PRESETS: dict[str, ModelConfig] = {name: p.config for name, p in PRESET_TABLE.items()}

# Models shipped inside the package, by name (HF directories): idefics_jax/models/NAME.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")

# A training WORKDIR as the trainer writes it: the config it ran with, and Orbax's step directories.
RUN_CHECKPOINTS = "checkpoints"
RUN_CONFIG = "config.json"


def shipped_models() -> list[str]:
    if not os.path.isdir(SHIPPED_DIR):
        return []
    return sorted(d for d in os.listdir(SHIPPED_DIR) if os.path.isfile(os.path.join(SHIPPED_DIR, d, "config.json")))


def published() -> dict[str, str]:
    """Preset names -> hub ids, for the presets that name a published checkpoint."""
    return {name: p.hub_id for name, p in PRESET_TABLE.items() if p.hub_id}


def architecture(name: str) -> ModelConfig:
    """The architecture `name` names, read without its weights: a preset, a shipped model, or a directory (local
    or in a bucket) holding config.json (a checkpoint, an HF directory, a training run's export)."""
    from idefics_jax.checkpoints.hf_config import from_hf_file

    if name in PRESETS:
        return PRESETS[name]
    path = os.path.join(SHIPPED_DIR, name) if name in shipped_models() else name
    if (as_path(path) / "config.json").exists():
        return from_hf_file(path)
    raise CheckpointError(f"model '{name}': no config.json there; a dry run needs only the architecture: name a "
                          f"preset ({', '.join(sorted(PRESETS))})")


def is_run(path) -> bool:
    """Whether `path` (local, `gs://`, any path object) is a training WORKDIR (its checkpoints and the config it
    ran with)."""
    p = as_path(path)
    return (p / RUN_CHECKPOINTS).is_dir() and (p / RUN_CONFIG).exists()


class RunStep(NamedTuple):
    workdir: str
    step: int


def run_step(path) -> RunStep | None:
    """A training run's checkpoint directory (`WORKDIR/checkpoints/STEP`, what `resolve` gives for a WORKDIR) ->
    (WORKDIR, STEP); None for any other path."""
    p = as_path(path)
    if not (p.name.isdigit() and p.parent.name == RUN_CHECKPOINTS and is_run(p.parent.parent)):
        return None
    return RunStep(os.fspath(p.parent.parent), int(p.name))


def newest_checkpoint(workdir) -> str:
    """The newest complete checkpoint of the run in `workdir` (Orbax's step directory; steps still being written
    are not complete)."""
    from orbax.checkpoint import path as ocp_path

    newest = ocp_path.step.latest_step_metadata(as_path(workdir) / RUN_CHECKPOINTS,
                                                ocp_path.step.standard_name_format())
    if newest is None:
        raise CheckpointError(f"{workdir}: a training WORKDIR with no complete checkpoint yet")
    return os.fspath(newest.path)


def _exists(name: str) -> bool:
    return as_path(name).exists() if "://" in name else os.path.exists(name)


def resolve(name) -> str:
    """A model name -> the directory (local or in a bucket) holding it; see the module's docstring for the order.
    Raises CheckpointError in one line when `name` names nothing that can be found or fetched."""
    name = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    if name in shipped_models():
        return os.path.join(SHIPPED_DIR, name)
    if _exists(name):
        return newest_checkpoint(name) if is_run(name) else name
    hub_id = published().get(name, name)
    parsed = parse_hub_id(hub_id)
    if parsed is None:
        known = ", ".join(shipped_models() + sorted(published()))
        raise CheckpointError(f"{name}: no such directory, and not a shipped model, a preset ({known}) "
                              "or a hub id (org/name[@revision])")
    return download(*parsed)
