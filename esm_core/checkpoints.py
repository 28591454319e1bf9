"""Load an ESM language model (ESM-2, ESM-1b, ESM-1v) into transformers' ``EsmModel``, whatever format it
ships in: a hub id or registry short name (the cache first), a local Hugging Face directory, or a fair-esm
``.pt`` file. Where the spec points is decided by :mod:`esm_core.sources`, shared with ESMFold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import EsmConfig, EsmModel

from esm_core.device import pick_device
from esm_core.fair_esm import CONTACT_KEYS, convert_state, fair_esm_arch, read_checkpoint
from esm_core.hf_loading import load_pretrained, refuse_mismatch
from esm_core.sources import (
    CheckpointMismatchError,
    ModelNotFoundError,
    Source,
    check_config,
    loaded_fingerprint,
    resolve_source,
)
from esm_core.weights import RANDOM_WEIGHTS_KEY, weights_checksum

__all__ = ["CheckpointMismatchError", "LoadedEsm", "ModelNotFoundError", "load_esm", "max_residues_of"]

# What an EsmModel (no pooler) may legitimately leave out of a checkpoint: the LM head of an
# EsmForMaskedLM save, a pooler, and the contact head when the checkpoint has none.
_MISSING_OK = re.compile(r"^contact_head\.regression\.(weight|bias)$")
_UNEXPECTED_OK = re.compile(r"^(esm\.)?(lm_head|pooler)\.")
_NOTHING = re.compile(r"(?!)")


@dataclass
class LoadedEsm:
    """An ``EsmModel`` in eval mode (fp32) plus what the pipeline records about it."""

    model: EsmModel
    name: str
    sha: str
    source: str  # "hub" | "hf_dir" | "fair_esm"
    num_layers: int
    dim: int
    max_residues: int
    random_weights: bool
    has_contact_head: bool
    device: torch.device
    fingerprint: str | None = None  # esm_core.sources.fingerprint of the files loaded


def load_esm(spec: str, device: str | torch.device | None = None) -> LoadedEsm:
    """Load ``spec`` (hub id, registry short name, HF directory or fair-esm .pt) onto ``device``.

    Raises ModelNotFoundError (one line) when there is no such model, and CheckpointMismatchError when its
    weights do not fit its architecture. Prints nothing: a random-weights checkpoint is reported through
    ``random_weights`` (the caller shows :data:`esm_core.weights.RANDOM_WEIGHTS_NOTICE`).
    """
    target = pick_device(str(device) if device is not None else None)
    source = resolve_source(spec)
    if source.kind == "fair_esm":
        model, has_contacts = _load_fair_esm(source)
    else:
        model, has_contacts = _load_hf(source)
    model = model.to(device=target, dtype=torch.float32).eval()
    return LoadedEsm(
        model=model,
        name=source.name,
        sha=weights_checksum(model),
        source=source.kind,
        num_layers=model.config.num_hidden_layers,
        dim=model.config.hidden_size,
        max_residues=max_residues_of(model.config),
        random_weights=bool(getattr(model.config, RANDOM_WEIGHTS_KEY, False)),
        has_contact_head=has_contacts,
        device=target,
        fingerprint=loaded_fingerprint(source),
    )


def max_residues_of(config: EsmConfig) -> int:
    """Residues per forward pass: position slots minus the padding offset (pad id + 1) minus BOS/EOS.

    1022 for ESM-2 and ESM-1b (1026 slots). Rotary ESM-2 could run longer but was trained on 1024 tokens.
    """
    return config.max_position_embeddings - (config.pad_token_id + 1) - 2


def _load_hf(source: Source) -> tuple[EsmModel, bool]:
    """EsmModel (no pooler) from a hub id or directory; EsmForMaskedLM saves load too (``esm.`` prefix)."""

    def load(location: str, local_only: bool) -> tuple[EsmModel, dict]:
        raw, _ = EsmConfig.get_config_dict(location, local_files_only=local_only)
        check_config(raw, "esm", source.spec)
        return EsmModel.from_pretrained(
            location,
            config=EsmConfig.from_dict(raw),
            add_pooling_layer=False,
            attn_implementation="sdpa",
            dtype=torch.float32,
            local_files_only=local_only,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported by refuse_mismatch in one line
        )

    model, info = load_pretrained(source, load)
    missing = refuse_mismatch(source.spec, info, _MISSING_OK, _UNEXPECTED_OK)
    return model, not missing.intersection(CONTACT_KEYS)


def _load_fair_esm(source: Source) -> tuple[EsmModel, bool]:
    data, state = read_checkpoint(source.location, source.spec)
    arch = fair_esm_arch(data, state, source.spec)
    config = EsmConfig(**arch, attn_implementation="sdpa")
    if data.get(RANDOM_WEIGHTS_KEY):
        setattr(config, RANDOM_WEIGHTS_KEY, True)
    hf_state = convert_state(state, arch, source.spec)
    model = EsmModel(config, add_pooling_layer=False)
    expected = model.state_dict()
    info = {
        "missing_keys": expected.keys() - hf_state.keys(),
        "unexpected_keys": hf_state.keys() - expected.keys(),
        "mismatched_keys": [
            (key, value.shape, expected[key].shape)
            for key, value in hf_state.items()
            if key in expected and value.shape != expected[key].shape
        ],
    }
    refuse_mismatch(source.spec, info, _MISSING_OK, _NOTHING)
    model.load_state_dict(hf_state, strict=False)
    return model, all(k in hf_state for k in CONTACT_KEYS)
