"""The Hugging Face hub: hub ids (`org/name[@revision]`) and their model files, fetched with `huggingface_hub` into
its cache (only the files a model needs), which honours HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN and shows
a progress bar. Which names are hub ids, presets or paths is `idefics_jax.checkpoints.registry.resolve`'s.
"""

from __future__ import annotations

import os
import re

from idefics_jax.checkpoints.checkpoint import CheckpointError

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
