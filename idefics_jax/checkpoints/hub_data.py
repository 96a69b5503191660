"""Datasets on the Hugging Face hub, named as `datasets.load_dataset(name, subset, split=...)` names them:
`org/name[@revision][:subset][:split]`, e.g. `lmms-lab/DocVQA:DocVQA:validation`,
`HuggingFaceM4/the_cauldron:ai2d:train`, `MMMU/MMMU@<commit>:Art:validation`.

    split = resolve("lmms-lab/DocVQA:DocVQA:validation", default_split="validation")
    split.files    # local paths of that split's parquet shards, in the hub cache

Which files make a subset's split follows `datasets`: the `configs:` YAML of the repository's README.md
(`config_name`, `data_files` as a pattern, a list, or `{split, path}` entries, `data_dir`, `default: true`);
without one, the parquet files' names: `data/<split>-00000-of-00003*.parquet` (one subset, "default"), then
`<subset>/<split>-00000-of-00001*.parquet` or `<subset>/<split>/*.parquet` (the hub's parquet conversion,
revision `refs/convert/parquet`) as one subset per folder (where `datasets`, without the YAML, would see one
subset), then split keywords in folder or file names
(train/training, validation/valid/val/dev, test/testing/eval/evaluation), then every file as `train`.
Subset `*` means every subset, one after the other (MMMU's thirty subjects).

An omitted subset is the only one (or the one the README marks default); an omitted split the first of
`default_split` the subset has. A part that names nothing, or an ambiguous one, is a one-line
error listing the choices.

Only the shards of the chosen split are downloaded (huggingface_hub's cache, its progress bar, HF_HOME /
HF_HUB_CACHE, HF_TOKEN). With HF_HUB_OFFLINE, or when the hub cannot be reached, the cached snapshot of the
revision is read: its subsets and splits are those of the listing a download kept (huggingface_hub 2), else of
the files the cache holds; a split whose files, or numbered shards (`-00001-of-00005`), are there only in part
is refused.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Sequence

# A repo id as huggingface_hub allows it, an optional @revision (a branch, tag or commit, `refs/convert/parquet`),
# then up to two `:`-separated parts; an empty part is an omitted one (`org/name::validation`).
_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^:@\s]+))?"
                   r"(?::(?P<a>[^:]*))?(?::(?P<b>[^:]*))?$")
_SHARDED = re.compile(r"^(?P<split>\w+)-\d{5}-of-\d{5}[^/]*\.parquet$")  # push_to_hub's shard names
_SEP = r"[-._ 0-9]"
SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
_IGNORED = {"README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json"}
ALL = "*"


class DatasetError(ValueError):
    """A dataset name that resolves to no data: the message names the part and lists the choices, in one line."""


@dataclasses.dataclass(frozen=True)
class Spec:
    repo: str
    revision: str | None  # None: main
    subset: str | None  # None: omitted
    split: str | None
    single: bool = False  # one part given (`org/name:x`): x is a subset or, failing that, a split

    def __str__(self) -> str:
        s = self.repo + (f"@{self.revision}" if self.revision else "")
        if self.subset is not None or self.split is not None:
            s += f":{self.subset or ''}"
        return s + (f":{self.split}" if self.split is not None else "")


@dataclasses.dataclass(frozen=True)
class Split:
    repo: str
    commit: str  # the revision resolved: what a cache of derived data is keyed by
    subset: str
    split: str
    files: tuple[str, ...]  # local parquet paths, in order

    @property
    def name(self) -> str:
        """`org/name@commit:subset:split`: names exactly these files."""
        return f"{self.repo}@{self.commit}:{self.subset}:{self.split}"


def parse(name: str) -> Spec | None:
    """"org/name[@revision][:subset][:split]" -> Spec; None for anything else (a path, a registered name)."""
    m = _SPEC.match(name)
    if not m or ".." in m["repo"] or name.startswith(("./", "../", "/")):
        return None
    a, b = m["a"], m["b"]
    if b is None:  # org/name or org/name:x
        return Spec(m["repo"], m["rev"], a or None, None, single=bool(a))
    return Spec(m["repo"], m["rev"], a or None, b or None)


def resolve(name: str | Spec, default_split: str | Sequence[str] = "train") -> Split:
    """The split `name` means (see the module docstring), its parquet shards downloaded when missing.
    `default_split`: the split (or splits, first present wins) an omitted split means."""
    spec = name if isinstance(name, Spec) else parse(name)
    if spec is None:
        raise DatasetError(f"{name}: not a hub dataset name (org/name[@revision][:subset][:split])")
    defaults = (default_split,) if isinstance(default_split, str) else tuple(default_split)
    commit, files, readme, cached = _listing(spec)
    subsets, default = layout(files, readme)
    if not subsets:
        raise DatasetError(f"{spec}: no parquet files in {spec.repo}" + (" (cached)" if cached else "") +
                           "; the hub keeps a parquet copy of most datasets at revision refs/convert/parquet "
                           f"({spec.repo}@refs/convert/parquet)")
    try:
        subset, split = _choose(spec, subsets, default, defaults)
    except DatasetError as e:
        if cached:
            raise DatasetError(f"{e}; read from the hub cache, which holds what was downloaded") from None
        raise
    wanted = [f for s in (subsets if subset == ALL else [subset]) for f in subsets[s].get(split, [])]
    bad = [f for f in wanted if not f.endswith(".parquet")]
    if bad:
        raise DatasetError(f"{spec}: {bad[0]} is not parquet (parquet shards are read); try the hub's parquet "
                           f"copy, {spec.repo}@refs/convert/parquet")
    if cached:
        missing = [f for f in wanted if not os.path.isfile(os.path.join(cached, f))]
        if missing:
            raise DatasetError(f"{spec}: the hub cache holds {len(wanted) - len(missing)} of the split's "
                               f"{len(wanted)} files (not {missing[0]}); download them with network access "
                               "(HF_HUB_OFFLINE unset)")
        _check_complete(spec, wanted)
        local = cached
    else:
        local = _download(spec.repo, commit, wanted)
        _remember_revision(spec, commit)
    return Split(spec.repo, commit, subset, split, tuple(os.path.join(local, f) for f in wanted))


def _check_complete(spec: Spec, files: list[str]) -> None:
    """Shards named `<split>-00002-of-00005...` in the cache: all five of them, or a one-line error (a download
    cut short would otherwise train or evaluate on part of the split)."""
    groups: dict[tuple[str, int], set[int]] = {}
    for f in files:
        m = re.search(r"^(.*-)(\d{5})-of-(\d{5})[^/]*$", f)
        if m:
            groups.setdefault((m[1], int(m[3])), set()).add(int(m[2]))
    for (prefix, total), have in groups.items():
        if len(have) < total:
            raise DatasetError(f"{spec}: the hub cache holds {len(have)} of the {total} shards {prefix}*; download "
                               "the rest with network access (HF_HUB_OFFLINE unset)")
def _choose(spec: Spec, subsets: dict, default: str | None, defaults: tuple[str, ...]) -> tuple[str, str]:
    names = list(subsets)
    listed = ", ".join(names)

    def implicit_subset() -> str | None:
        return names[0] if len(names) == 1 else default

    subset, split = spec.subset, spec.split
    if spec.single:  # org/name:x
        implicit = implicit_subset()
        is_subset = subset in subsets or subset == ALL
        is_split = implicit is not None and subset in subsets[implicit]
        if is_subset and is_split and subset != implicit:
            raise DatasetError(f"{spec}: '{subset}' is both a subset and a split of '{implicit}'; write "
                               f"{spec.repo}:{subset}:SPLIT or {spec.repo}:{implicit}:{subset}")
        if not is_subset:
            if not is_split:
                splits = f"; splits of '{implicit}': {', '.join(subsets[implicit])}" if implicit else ""
                raise DatasetError(f"{spec}: no subset or split '{subset}' in {spec.repo} (subsets: {listed}"
                                   f"{splits})")
            subset, split = implicit, spec.subset
    if subset is None:
        subset = implicit_subset()
        if subset is None:
            raise DatasetError(f"{spec}: which of {len(names)} subsets? name one as {spec.repo}:SUBSET "
                               f"(subsets: {listed})")
    if subset != ALL and subset not in subsets:
        raise DatasetError(f"{spec}: no subset '{subset}' in {spec.repo} (subsets: {listed})")
    splits = list(dict.fromkeys(s for n in (names if subset == ALL else [subset]) for s in subsets[n]))
    if split is None:
        # Never the only split as a stand-in: evaluation would silently read a training split.
        split = next((s for s in defaults if s in splits), None)
        if split is None:
            raise DatasetError(f"{spec}: subset '{subset}' has no split {' or '.join(defaults)}; name one as "
                               f"{spec.repo}:{subset}:SPLIT (splits: {', '.join(splits)})")
    if split not in splits:
        raise DatasetError(f"{spec}: no split '{split}' in subset '{subset}' (splits: {', '.join(splits)})")
    return subset, split


# ---- which files make which subset and split ------------------------------------------------------------------


def _glob(pattern: str) -> re.Pattern:
    """An fsspec / `datasets` data_files pattern: `*` within a folder, `**` across folders, `?`, `[...]`."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _match(patterns: list[str], files: list[str], base: str = "") -> list[str]:
    out: list[str] = []
    for p in patterns:
        p = str(p)
        p = p.removeprefix("./")
        rx = _glob(f"{base.rstrip('/')}/{p}" if base else p)
        folder = _glob(f"{base.rstrip('/')}/{p}/**" if base else f"{p.rstrip('/')}/**")  # a folder means its files
        out += [f for f in files if (rx.match(f) or folder.match(f)) and f not in out]
    return sorted(out)


def _data_files(value, files: list[str], base: str) -> dict[str, list[str]]:
    """A config's `data_files` (a pattern, a list of them, {split, path} entries or {split: patterns})."""
    if value is None:
        inferred = _inferred([f for f in files if f.startswith(base.rstrip("/") + "/")] if base else files)
        return next(iter(inferred.values()), {})
    if isinstance(value, str):
        value = {"train": [value]}
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        value = {str(v.get("split", "train")): v.get("path", []) for v in value}
    elif isinstance(value, list):
        value = {"train": value}
    if not isinstance(value, dict):
        return {}
    return {str(k): _match(v if isinstance(v, list) else [v], files, base) for k, v in value.items()}


def _readme_configs(readme: str | None) -> tuple[list[dict], str | None]:
    if not readme or not readme.startswith("---"):
        return [], None
    import yaml

    end = readme.find("\n---", 3)
    try:
        meta = yaml.safe_load(readme[3:end if end >= 0 else None]) or {}
    except yaml.YAMLError:
        return [], None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list):
        return [], None
    configs = [c for c in configs if isinstance(c, dict)]
    default = next((str(c.get("config_name", "default")) for c in configs if c.get("default")), None)
    return configs, default


def _split_in(names: list[str], folders: bool) -> str | None:
    """The split that folder names or a file name give (`datasets`' keywords, delimited by -._ space or digits)."""
    for split, words in SPLIT_KEYWORDS.items():
        for w in words:
            rx = re.compile(rf"^(?:.*{_SEP})?{w}(?:{_SEP}.*)?$" if folders else rf"^(?:.*{_SEP})?{w}{_SEP}.*$")
            if any(rx.match(n) for n in names):
                return split
    return None


def _inferred(files: list[str]) -> dict[str, dict[str, list[str]]]:
    files = sorted(f for f in files if f.endswith(".parquet"))
    if not files:
        return {}
    sharded = [f for f in files if f.startswith("data/") and f.count("/") == 1 and _SHARDED.match(f[5:])]
    if sharded:
        splits: dict[str, list[str]] = {}
        for f in sharded:
            splits.setdefault(_SHARDED.match(f[5:])["split"], []).append(f)
        return {"default": _ordered(splits)}
    parts = [f.split("/") for f in files]
    if all(len(p) == 2 and _SHARDED.match(p[1]) for p in parts) or all(len(p) == 3 for p in parts):
        out: dict[str, dict[str, list[str]]] = {}
        for f, p in zip(files, parts):
            split = _SHARDED.match(p[1])["split"] if len(p) == 2 else p[1]
            out.setdefault(p[0], {}).setdefault(split, []).append(f)
        return {k: _ordered(v) for k, v in out.items()}
    by_folder = {f: s for f in files if (s := _split_in(f.split("/")[:-1], folders=True)) is not None}
    by_name = {f: s for f in files if (s := _split_in(f.split("/")[-1:], folders=False)) is not None}
    found = by_folder or by_name
    if not found:
        return {"default": {"train": files}}
    splits = {}
    for f, s in found.items():
        splits.setdefault(s, []).append(f)
    return {"default": _ordered(splits)}


def _ordered(splits: dict[str, list[str]]) -> dict[str, list[str]]:
    """train, validation, test first (as `datasets` lists them), then the rest by name."""
    first = [s for s in SPLIT_KEYWORDS if s in splits]
    return {s: sorted(splits[s]) for s in first + sorted(set(splits) - set(first))}


def layout(files: Sequence[str], readme: str | None = None) -> tuple[dict[str, dict[str, list[str]]], str | None]:
    """A repository's files (paths relative to its root) and README.md -> ({subset: {split: files}}, the subset
    the README marks default or None)."""
    files = sorted(f for f in files if os.path.basename(f) not in _IGNORED
                   and not any(p.startswith(".") for p in f.split("/")))
    configs, default = _readme_configs(readme)
    if configs:
        out = {}
        for c in configs:
            splits = _data_files(c.get("data_files"), files, str(c.get("data_dir") or ""))
            splits = {k: v for k, v in splits.items() if v}
            if splits:
                out[str(c.get("config_name", "default"))] = splits
        return out, default if default in out else None
    return _inferred(files), None


# ---- the hub and its cache ------------------------------------------------------------------------------------


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _network_error(e: Exception) -> bool:
    """No network, a refused connection, a timeout, the hub down: the HTTP library's errors (httpx or its fork,
    whichever huggingface_hub uses) and the hub's own."""
    from huggingface_hub import errors

    http = type(e).__module__.split(".")[0] in {"httpx", "httpx2", "requests", "urllib3"}
    return http or isinstance(e, (OSError, errors.HfHubHTTPError, errors.OfflineModeIsEnabled))


def _storage(repo: str) -> str:
    from huggingface_hub import constants

    return os.path.join(constants.HF_HUB_CACHE, "datasets--" + repo.replace("/", "--"))


def _cached_snapshot(spec: Spec) -> tuple[str, str] | None:
    """(commit, snapshot folder) of the revision in the hub cache, or None."""
    storage = _storage(spec.repo)
    rev = spec.revision or "main"
    ref = os.path.join(storage, "refs", rev)
    commit = open(ref).read().strip() if os.path.isfile(ref) else rev
    folder = os.path.join(storage, "snapshots", commit)
    return (commit, folder) if os.path.isdir(folder) else None


def _listing(spec: Spec) -> tuple[str, list[str], str | None, str | None]:
    """(commit, the repo's files, README.md's text, the snapshot folder when read from the cache only)."""
    where = str(spec)
    reason = None
    if not _offline():
        import huggingface_hub as hf
        from huggingface_hub import errors

        try:
            info = hf.HfApi(token=_token()).dataset_info(spec.repo, revision=spec.revision)
            files = [s.rfilename for s in info.siblings or []]
            readme = None
            if "README.md" in files:
                with open(hf.hf_hub_download(spec.repo, "README.md", repo_type="dataset", revision=info.sha,
                                             token=_token()), encoding="utf-8") as f:
                    readme = f.read()
            return info.sha, files, readme, None
        except errors.GatedRepoError:
            raise DatasetError(f"{where}: a gated dataset; accept its terms on huggingface.co and set "
                               "HF_TOKEN") from None
        except errors.RevisionNotFoundError:
            raise DatasetError(f"{where}: the hub has no revision '{spec.revision}' of {spec.repo}") from None
        except errors.RepositoryNotFoundError:
            raise DatasetError(f"{where}: not a local path, nor a dataset on the hub (a private one needs "
                               "HF_TOKEN)") from None
        except errors.HFValidationError as e:
            raise DatasetError(f"{where}: not a valid hub id ({str(e).splitlines()[0][:120]})") from None
        except Exception as e:
            if not _network_error(e):
                raise
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    snap = _cached_snapshot(spec)
    if snap is None:
        from huggingface_hub import constants

        if reason is None:
            raise DatasetError(f"{where}: not a local path, nor a dataset in the hub cache ({constants.HF_HUB_CACHE})"
                               " and HF_HUB_OFFLINE is set; download it once with network access")
        raise DatasetError(f"{where}: not a local path; cannot reach the hub and not in the cache "
                           f"({constants.HF_HUB_CACHE}): {reason}")
    commit, folder = snap
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/") for n in names]
    import huggingface_hub as hf

    cached_tree = getattr(hf, "get_cached_repo_tree", None)  # huggingface_hub 2: the listing a download kept
    if cached_tree is not None:
        try:
            files = [e.path for e in cached_tree(spec.repo, repo_type="dataset", revision=commit)]
        except Exception as e:  # no listing cached (files put there by hand, or by an older huggingface_hub)
            if type(e).__name__ != "CachedRepoTreeNotFoundError":
                raise
    readme = None
    if os.path.isfile(os.path.join(folder, "README.md")):
        with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
            readme = f.read()
    return commit, files, readme, folder


def _remember_revision(spec: Spec, commit: str) -> None:
    """refs/<branch or tag> -> the commit, as huggingface_hub records it, so that the name reads offline too (the
    shards were fetched by commit, which records no ref)."""
    rev = spec.revision or "main"
    if rev == commit:
        return
    ref = os.path.join(_storage(spec.repo), "refs", rev)
    os.makedirs(os.path.dirname(ref), exist_ok=True)
    with open(ref + ".tmp", "w") as f:
        f.write(commit)
    os.replace(ref + ".tmp", ref)


def _download(repo: str, commit: str, files: list[str]) -> str:
    """Only `files` of the commit, into the hub cache (a progress bar while they download); the snapshot folder."""
    import huggingface_hub as hf
    from huggingface_hub import errors

    try:
        return hf.snapshot_download(repo, repo_type="dataset", revision=commit, token=_token(),
                                    allow_patterns=[glob.escape(f) for f in files])  # fnmatch patterns
    except errors.GatedRepoError:
        raise DatasetError(f"{repo}: a gated dataset; accept its terms on huggingface.co and set HF_TOKEN") from None
    except Exception as e:
        if not _network_error(e):
            raise
        raise DatasetError(f"{repo}@{commit}: downloading {len(files)} parquet files failed: "
                           f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None

