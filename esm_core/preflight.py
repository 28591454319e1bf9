"""Pre-flight look at a checkpoint without loading its weights: is it there, is it the right kind of model,
its shape, and a fingerprint of the files a loader would read. Reads config files (and a fair-esm file
memory-mapped, tensors untouched), so callers can refuse bad input before starting workers and skip
loading a model whose weights checksum they already know for that fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

from esm_core.sources import (
    KINDS,
    ModelNotFoundError,
    check_config,
    fingerprint,
    read_hf_config,
    resolve_source,
)
from esm_core.weights import RANDOM_WEIGHTS_KEY

# transformers' EsmConfig / EsmcConfig defaults, used (as from_pretrained does) when a config.json leaves
# them out.
ESM_CONFIG_DEFAULTS = {"num_hidden_layers": 12, "hidden_size": 768}
ESMC_CONFIG_DEFAULTS = {"num_hidden_layers": 80, "hidden_size": 2560}


class NotCachedError(ModelNotFoundError):
    """A hub id that is not in the local cache: a loader would download it, a pre-flight cannot look."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a loader would load, known without loading it."""

    name: str  # the display name the loaders record (LoadedEsm.name, LoadedFolder.name)
    source: str  # "hub" | "hf_dir" | "fair_esm"
    location: str  # the directory or file read (a hub id's cached snapshot directory)
    kind: str  # "esm" | "esmfold"
    is_folding: bool
    num_layers: int | None  # ESM models: transformer blocks (valid layers are 0..num_layers); else None
    dim: int | None  # ESM models: hidden size; else None
    random_weights: bool  # the checkpoint says it holds random weights
    fingerprint: str  # esm_core.sources.fingerprint: equal means the same files, unchanged
    model_type: str = "esm"  # "esm" (ESM-2, ESM-1b/1v, ESMFold) | "esmc" (ESM C)


def inspect_checkpoint(spec: str, kind: str = "esm") -> CheckpointInfo:
    """Resolve ``spec`` like the loaders do and describe it in milliseconds, reading no weights.

    Raises ModelNotFoundError (one line) for a missing path, an incomplete directory, a checkpoint that is
    not an ESM model (``kind="esm"``) or not ESMFold (``kind="esmfold"``); NotCachedError (a
    ModelNotFoundError) for a hub id that is not cached yet, online, which only a loader can fetch.
    Whether the weights fit the architecture is checked when loading (CheckpointMismatchError).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    source = resolve_source(spec)
    if not source.is_local:
        raise NotCachedError(
            f"model {source.location!r} is not in the Hugging Face cache; it is downloaded when first loaded"
        )
    if source.kind == "fair_esm":
        if kind == "esmfold":
            raise ModelNotFoundError(
                f"model {spec!r} is a file; ESMFold loads from a Hugging Face directory or hub id"
            )
        from esm_core.fair_esm import fair_esm_arch, read_checkpoint  # torch: only fair-esm files need it

        data, state = read_checkpoint(source.location, spec)
        arch = fair_esm_arch(data, state, spec)
        random_weights = bool(data.get(RANDOM_WEIGHTS_KEY, False))
    else:
        raw = read_hf_config(source.location, spec)
        defaults = ESMC_CONFIG_DEFAULTS if raw.get("model_type") == "esmc" else ESM_CONFIG_DEFAULTS
        arch = {**defaults, **raw}
        check_config(arch, kind, spec)
        random_weights = bool(arch.get(RANDOM_WEIGHTS_KEY, False))
    folding = kind == "esmfold"
    return CheckpointInfo(
        name=source.name,
        source=source.kind,
        location=source.location,
        kind=kind,
        is_folding=folding,
        num_layers=None if folding else int(arch["num_hidden_layers"]),
        dim=None if folding else int(arch["hidden_size"]),
        random_weights=random_weights,
        fingerprint=fingerprint(source),
        model_type=str(arch.get("model_type", "esm")),
    )
