"""Model names -> local directories: the one resolver behind every place a model is named.

In order: a local path (or any existing `etils.epath` path, `gs://...` included) or a model shipped in the package
("tiny-shapes"); a preset name ("smolvlm-256m"), which names its published checkpoint; a hub id `org/name` or
`org/name@revision`, fetched with `huggingface_hub` into its cache (only the files a model needs), which honours
HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN and shows a progress bar.

A training WORKDIR is resolved above this layer (`idefics_jax.train.loading.trained_model`): conversion does not
import training.
"""

from __future__ import annotations

import os
import re

from idefics_jax.checkpoints.checkpoint import CheckpointError, resolve as resolve_shipped, shipped_models

# Preset names (idefics_jax.model.presets.PRESETS) -> the hub id of the checkpoint they describe.
PUBLISHED = {
    "idefics2-8b": "HuggingFaceM4/idefics2-8b",
    "idefics2-8b-base": "HuggingFaceM4/idefics2-8b-base",
    "idefics3-8b-llama3": "HuggingFaceM4/Idefics3-8B-Llama3",
    "smolvlm-256m": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "smolvlm-500m": "HuggingFaceTB/SmolVLM-500M-Instruct",
    "smolvlm-2.2b": "HuggingFaceTB/SmolVLM-Instruct",
    "smolvlm2-256m": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    "smolvlm2-500m": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    "smolvlm2-2.2b": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
}

# What a model needs: config and generation config, weights, tokenizer, processor, chat template. Not the
# PyTorch .bin / ONNX / GGUF copies many repos also hold.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]

# huggingface_hub's own rule for repo ids, plus an optional @revision (branch, tag or commit).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """"org/name[@revision]" -> (repo_id, revision); None for anything else."""
    m = _HUB_ID.match(name)
    if not m or ".." in name or name.startswith(("./", "../")):
        return None
    return m["repo"], m["rev"]


def _exists(name: str) -> bool:
    if "://" in name:
        from etils import epath

        return epath.Path(name).exists()
    return os.path.exists(name)


def resolve_model(name) -> str:
    """A model name -> a local directory (or a `gs://` path) holding it. Raises CheckpointError in one line when it
    names nothing that can be found or fetched."""
    name = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    if _exists(name):
        return name
    if name in shipped_models():
        return resolve_shipped(name)
    hub_id = PUBLISHED.get(name, name)
    parsed = parse_hub_id(hub_id)
    if parsed is None:
        known = ", ".join(shipped_models() + sorted(PUBLISHED))
        raise CheckpointError(f"{name}: no such directory, and not a shipped model, a preset ({known}) "
                              "or a hub id (org/name[@revision])")
    return download(*parsed)


def download(repo_id: str, revision: str | None = None) -> str:
    """The model files of `repo_id` at `revision` (default: main) in the hub cache, downloaded when missing."""
    import huggingface_hub as hf
    from huggingface_hub import errors

    where = repo_id + (f"@{revision}" if revision else "")
    try:
        return hf.snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES,
                                    token=os.environ.get("HF_TOKEN") or None)
    except errors.GatedRepoError:
        raise CheckpointError(f"{where}: a gated repo; accept its terms on huggingface.co and set "
                              "HF_TOKEN") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{where}: the hub has no revision '{revision}' of {repo_id}") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{where}: no such model on the hub (a private one needs HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError as e:
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
        if _offline():
            raise CheckpointError(f"{where}: not in the hub cache ({cache}) and HF_HUB_OFFLINE is set; download it "
                                  "once with network access, or give a local directory") from None
        detail = str(e.__cause__ or e).splitlines()[0][:120]
        raise CheckpointError(f"{where}: cannot reach the hub and not in the cache ({cache}): {detail}; check the "
                              "network (or HF_ENDPOINT), or give a local directory") from None
    except errors.HFValidationError as e:
        raise CheckpointError(f"{where}: not a valid hub id ({str(e).splitlines()[0][:120]})") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
