"""Where a checkpoint is read from, for every model kind: a spec (local directory, fair-esm ``.pt`` file,
hub id or registry short name) resolved to one place on disk (or the hub id still to download), the offline
check, the files that will be read and their stat-based fingerprint. Plain files only: no torch, no
transformers, so a pre-flight check costs milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from esm_core import registry

KINDS = ("esm", "esmfold")
CONFIG_NAME = "config.json"
# The weight files transformers reads from a directory, in the order it looks for them.
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelNotFoundError(Exception):
    """No usable checkpoint for a spec: no such path, not cached, hub unreachable, or not the right model."""


class CheckpointMismatchError(ModelNotFoundError):
    """A checkpoint's weights do not fit the architecture its config describes (keys missing, unexpected or
    of the wrong shape): loading it would silently leave layers at random initialisation."""


@dataclass(frozen=True)
class Source:
    """A resolved spec. ``location`` is a local directory or file, or the hub id when not cached yet."""

    spec: str  # as the user gave it
    kind: str  # "hf_dir" | "hub" | "fair_esm"
    name: str  # display name recorded with every result
    location: str
    revision: str | None = None  # hub commit of the cached snapshot read

    @property
    def is_local(self) -> bool:
        """True when ``location`` is on disk (a directory, a file or a cached hub snapshot)."""
        return self.kind != "hub" or self.revision is not None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def hub_offline() -> bool:
    """True when the hub must not be contacted (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read now)."""
    flags = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(hub_constants.HF_HUB_OFFLINE) or any(f in ("1", "true", "yes", "on") for f in flags)


def looks_like_path(spec: str) -> bool:
    """True for specs that can only mean a local path (so a missing one is not looked up on the hub)."""
    return spec.endswith(".pt") or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def resolve_source(spec: str) -> Source:
    """Resolve ``spec`` to where it is read from: an existing directory (Hugging Face save) or file
    (fair-esm), else a hub id (registry short names expanded), preferring a complete cached snapshot.

    Raises ModelNotFoundError for a missing local path, an invalid hub id, or an uncached hub id offline.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source(spec, "hf_dir", path.resolve().name, str(path))
    if path.is_file():
        return Source(spec, "fair_esm", path.stem, str(path))
    if looks_like_path(spec):
        raise ModelNotFoundError(f"model {spec!r} not found: no such local file or directory")
    hub_id = registry.resolve(spec)
    try:
        validate_repo_id(hub_id)
    except HFValidationError:
        raise ModelNotFoundError(
            f"model {spec!r} not found: not a local path, a known model name or a hub id"
        ) from None
    known = registry.lookup(hub_id)
    name = known.name if known else hub_id.rsplit("/", 1)[-1]
    snapshot = cached_snapshot(hub_id)
    if snapshot is not None:
        return Source(spec, "hub", name, str(snapshot), revision=snapshot.name)
    if hub_offline():
        raise ModelNotFoundError(
            f"model {hub_id!r} not found; tried: local path (absent), Hugging Face cache "
            f"({hub_constants.HF_HUB_CACHE}), hub (offline: HF_HUB_OFFLINE=1)"
        )
    return Source(spec, "hub", name, hub_id)


def cached_snapshot(hub_id: str) -> Path | None:
    """The cached snapshot directory of ``hub_id``'s main revision when it holds a config and all weights."""
    found = try_to_load_from_cache(hub_id, CONFIG_NAME)
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    try:
        hf_files(snapshot, hub_id)
    except ModelNotFoundError:
        return None
    return snapshot


def read_hf_config(directory: str | Path, spec: str) -> dict[str, Any]:
    """The raw ``config.json`` of a Hugging Face directory (no transformers import)."""
    path = Path(directory) / CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"model {spec!r}: {directory} has no {CONFIG_NAME}") from None
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"model {spec!r}: unreadable {path}: {exc}") from None


def check_config(config: dict[str, Any], kind: str, spec: str) -> None:
    """Refuse a config that is not an ESM language model (``kind="esm"``: ESM-2 / ESM-1 ``model_type="esm"``
    or ESM C ``"esmc"``) or not ESMFold (``kind="esmfold"``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    model_type = config.get("model_type")
    if kind == "esm" and model_type == "esmc":
        return
    if model_type != "esm":
        raise ModelNotFoundError(
            f"model {spec!r} is not an ESM checkpoint (config model_type {model_type!r})"
        )
    folding = bool(config.get("is_folding_model", False))
    if kind == "esmfold" and not folding:
        raise ModelNotFoundError(
            f"model {spec!r} is not an ESMFold checkpoint (config has is_folding_model=false)"
        )
    if kind == "esm" and folding:
        raise ModelNotFoundError(f"model {spec!r} is an ESMFold checkpoint, not an ESM language model")


def weight_files(directory: str | Path, spec: str) -> list[Path]:
    """The weight files transformers will read from ``directory``: the first of :data:`WEIGHT_NAMES`
    present, plus the shards an index names. Raises ModelNotFoundError when none (or a shard) is there."""
    directory = Path(directory)
    for name in WEIGHT_NAMES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelNotFoundError(f"model {spec!r}: unreadable weights index {path}: {exc}") from None
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise ModelNotFoundError(f"model {spec!r}: weight shard {missing[0]} named by {path} is missing")
        return [path, *(directory / shard for shard in shards)]
    raise ModelNotFoundError(f"model {spec!r}: no weights ({' or '.join(WEIGHT_NAMES[::2])}) in {directory}")


def fair_esm_files(path: str | Path) -> list[Path]:
    """A fair-esm file and, when present, its ``<stem>-contact-regression.pt`` companion."""
    path = Path(path)
    regression = path.with_name(path.stem + "-contact-regression.pt")
    return [path, regression] if regression.is_file() else [path]


def hf_files(directory: str | Path, spec: str) -> list[Path]:
    """``config.json`` and the weight files of a Hugging Face directory; ModelNotFoundError if incomplete."""
    directory = Path(directory)
    config = directory / CONFIG_NAME
    if not config.is_file():
        raise ModelNotFoundError(f"model {spec!r}: {directory} has no {CONFIG_NAME}")
    return [config, *weight_files(directory, spec)]


def checkpoint_files(source: Source) -> list[Path]:
    """Every file loading ``source`` reads: config and weights (Hugging Face) or the .pt files (fair-esm)."""
    if not source.is_local:
        raise ModelNotFoundError(f"model {source.spec!r} is not in the Hugging Face cache yet")
    if source.kind == "fair_esm":
        return fair_esm_files(source.location)
    return hf_files(source.location, source.spec)


def fingerprint(source: Source) -> str:
    """Stat-based identity of the exact files :func:`checkpoint_files` names (real path, size, mtime_ns)
    plus the hub commit when read from the cache: equal fingerprints mean the same bytes are loaded,
    without reading them. Rewriting any file changes it."""
    lines = [f"revision={source.revision}"] if source.revision else []
    for path in checkpoint_files(source):
        real = path.resolve()
        stat = real.stat()
        lines.append(f"{real}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha1("\n".join(lines).encode(), usedforsecurity=False).hexdigest()[:16]


def loaded_fingerprint(source: Source) -> str | None:
    """The fingerprint of what a loader just read (a hub id downloaded now is fingerprinted in the cache);
    None when it cannot be told, e.g. the download landed outside the cache."""
    try:
        return fingerprint(source if source.is_local else resolve_source(source.spec))
    except (ModelNotFoundError, OSError):
        return None
