"""Load an ESM language model (ESM-2, ESM-1b, ESM-1v, ESM C) whatever format it ships in: a hub id or
registry short name (the cache first), a local Hugging Face directory, or a fair-esm ``.pt`` file. Where the
spec points is decided by :mod:`esm_core.sources`, shared with ESMFold.

``load_esm`` gives the encoder for embeddings (transformers' ``EsmModel``, or ESM C's ``EsmcModel`` seen
through :class:`esm_core.esmc.EsmcEncoderView`); ``load_esm_mlm`` gives the same encoder with its masked-LM
head for variant scores. Both record the same weights checksum for the same checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import EsmcConfig, EsmcForMaskedLM, EsmcModel, EsmConfig, EsmForMaskedLM, EsmModel

from esm_core.device import pick_device
from esm_core.esmc import EsmcEncoderView
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

__all__ = [
    "CheckpointMismatchError",
    "LoadedEsm",
    "LoadedMaskedLm",
    "ModelNotFoundError",
    "load_esm",
    "load_esm_mlm",
    "max_residues_of",
]

# What an EsmModel (no pooler) may legitimately leave out of a checkpoint: the LM head of an
# EsmForMaskedLM save, a pooler, and the contact head when the checkpoint has none.
_MISSING_OK = re.compile(r"^contact_head\.regression\.(weight|bias)$")
_UNEXPECTED_OK = re.compile(r"^(esm\.)?(lm_head|pooler)\.")
# The same for ESM C: an EsmcForMaskedLM save's LM head; nothing may be missing.
_ESMC_UNEXPECTED_OK = re.compile(r"^(esmc\.)?lm_head\.")
# An EsmForMaskedLM may miss its encoder's contact head; a missing LM head passes the generic check so that
# it is refused by name after loading (_LM_HEAD_KEY); a pooler in the file is dropped.
_MLM_MISSING_OK = re.compile(r"^(esm\.)?contact_head\.regression\.(weight|bias)$|^lm_head\.")
_LM_HEAD_KEY = re.compile(r"^lm_head\.")
_MLM_UNEXPECTED_OK = re.compile(r"^(esm\.)?pooler\.")
# A converted fair-esm state: the contact head when the file has none, and the tied LM projection.
_FAIR_MLM_MISSING_OK = re.compile(
    r"^esm\.contact_head\.regression\.(weight|bias)$|^lm_head\.decoder\.weight$"
)
_NOTHING = re.compile(r"(?!)")
# fair-esm LM head keys (RobertaLMHead) -> EsmLMHead keys; its ``weight`` is tied to the token embedding.
_LM_HEAD_RENAMES = {
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
}


@dataclass
class LoadedEsm:
    """An ``EsmModel`` in eval mode (fp32), or ESM C's ``EsmcModel`` under EsmModel's module names
    (:class:`esm_core.esmc.EsmcEncoderView`), plus what the pipeline records about it."""

    model: EsmModel | EsmcEncoderView  # ESM C: EsmcModel's modules under EsmModel's names
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
    model_type: str = "esm"  # "esm" (ESM-2, ESM-1b/1v) | "esmc" (ESM C)


@dataclass
class LoadedMaskedLm:
    """A masked language model (``EsmForMaskedLM`` or ``EsmcForMaskedLM``) in eval mode (fp32) plus what the
    pipeline records about it. ``sha`` is the encoder's checksum, the one :func:`load_esm` records for the
    same checkpoint; ``head_sha`` is the LM head's, so results record both."""

    model: EsmForMaskedLM | EsmcForMaskedLM
    name: str
    sha: str
    head_sha: str
    source: str  # "hub" | "hf_dir" | "fair_esm"
    num_layers: int
    dim: int
    max_residues: int
    random_weights: bool
    device: torch.device
    fingerprint: str | None = None
    model_type: str = "esm"  # "esm" | "esmc"

    @property
    def encoder(self) -> EsmModel | EsmcModel:
        """The model under the LM head (``model.esm`` or ``model.esmc``)."""
        return self.model.base_model


def load_esm(spec: str, device: str | torch.device | None = None) -> LoadedEsm:
    """Load ``spec`` (hub id, registry short name, HF directory or fair-esm .pt) onto ``device``.

    Raises ModelNotFoundError (one line) when there is no such model, and CheckpointMismatchError when its
    weights do not fit its architecture. Prints nothing: a random-weights checkpoint is reported through
    ``random_weights`` (the caller shows :data:`esm_core.weights.RANDOM_WEIGHTS_NOTICE`).
    """
    target = pick_device(str(device) if device is not None else None)
    source = resolve_source(spec)
    if source.kind == "fair_esm":
        encoder, has_contacts = _load_fair_esm(source)
    else:
        raw = read_model_config(source)
        if raw.get("model_type") == "esmc":
            encoder, _ = load_hf_class(source, EsmcModel, raw, _NOTHING, _ESMC_UNEXPECTED_OK)
            has_contacts = False
        else:
            encoder, has_contacts = _load_hf(source, raw)
    _zero_absent_contact_head(encoder, has_contacts)
    encoder = encoder.to(device=target, dtype=torch.float32).eval()
    model = EsmcEncoderView(encoder) if isinstance(encoder, EsmcModel) else encoder
    return LoadedEsm(
        model=model,
        name=source.name,
        sha=weights_checksum(encoder),  # under the model's own key names (EsmcModel's for ESM C)
        source=source.kind,
        num_layers=model.config.num_hidden_layers,
        dim=model.config.hidden_size,
        max_residues=max_residues_of(model.config),
        random_weights=bool(getattr(model.config, RANDOM_WEIGHTS_KEY, False)),
        has_contact_head=has_contacts,
        device=target,
        fingerprint=loaded_fingerprint(source),
        model_type=model.config.model_type,
    )


def load_esm_mlm(spec: str, device: str | torch.device | None = None) -> LoadedMaskedLm:
    """Load ``spec`` with its masked-LM head: ``EsmForMaskedLM`` (HF directory or hub id saved with the head;
    fair-esm ESM-2 / ESM-1b / ESM-1v files, whose ``lm_head.*`` keys are mapped) or ``EsmcForMaskedLM``.

    fair-esm ties the LM head's projection to the token embedding (``lm_head.weight``); so does
    transformers, so the projection is the embedding (ESM-1b/1v: with the <mask> row zeroed, as fair-esm's
    loader leaves both). Raises CheckpointMismatchError (one line) for a checkpoint without an LM head (an
    ``EsmModel`` save) or whose weights do not fit, ModelNotFoundError when there is no such model.
    """
    target = pick_device(str(device) if device is not None else None)
    source = resolve_source(spec)
    if source.kind == "fair_esm":
        model = _load_fair_esm_mlm(source)
    else:
        raw = read_model_config(source)
        esmc = raw.get("model_type") == "esmc"
        model_class = EsmcForMaskedLM if esmc else EsmForMaskedLM
        model, missing = load_hf_class(
            source, model_class, raw, _MLM_MISSING_OK, _NOTHING if esmc else _MLM_UNEXPECTED_OK
        )
        head = sorted(k for k in missing if _LM_HEAD_KEY.search(k))
        if head:
            raise CheckpointMismatchError(
                f"model {spec!r} has no masked-LM head ({head[0]} missing; an EsmModel save?); "
                "variant scores need a masked-LM checkpoint"
            )
        _zero_absent_contact_head(model.base_model, not missing)
    model = model.to(device=target, dtype=torch.float32).eval()
    config = model.config
    return LoadedMaskedLm(
        model=model,
        name=source.name,
        sha=weights_checksum(model.base_model),
        head_sha=weights_checksum(model.lm_head),
        source=source.kind,
        num_layers=config.num_hidden_layers,
        dim=config.hidden_size,
        max_residues=max_residues_of(config),
        random_weights=bool(getattr(config, RANDOM_WEIGHTS_KEY, False)),
        device=target,
        fingerprint=loaded_fingerprint(source),
        model_type=config.model_type,
    )


def max_residues_of(config: EsmConfig | EsmcConfig) -> int:
    """Residues per forward pass: position slots minus the padding offset (pad id + 1) minus BOS/EOS.

    1022 for ESM-2 and ESM-1b (1026 slots). Rotary ESM-2 could run longer but was trained on 1024 tokens.
    ESM C (rotary, positions from 0, no padding offset): ``max_position_embeddings`` minus BOS/EOS.
    """
    if config.model_type == "esmc":
        return config.max_position_embeddings - 2
    return config.max_position_embeddings - (config.pad_token_id + 1) - 2


def read_model_config(source: Source) -> dict[str, Any]:
    """The raw ``config.json`` of a Hugging Face source (a hub id not cached yet is fetched), refused
    unless it is an ESM language model (ESM-2 / ESM-1 or ESM C)."""

    def load(location: str, local_only: bool) -> dict[str, Any]:
        raw, _ = EsmConfig.get_config_dict(location, local_files_only=local_only)
        return raw

    raw = load_pretrained(source, load)
    check_config(raw, "esm", source.spec)
    return raw


def load_hf_class(
    source: Source,
    model_class: type[torch.nn.Module],
    raw: dict[str, Any],
    missing_ok: re.Pattern[str],
    unexpected_ok: re.Pattern[str],
    **kwargs: Any,
) -> tuple[Any, set[str]]:
    """``model_class.from_pretrained`` on ``source`` with the config ``raw`` (EsmConfig or EsmcConfig by its
    model_type), SDPA attention, fp32, quiet; weights that do not fit refused in one line
    (CheckpointMismatchError). Returns the model and the allowed missing keys."""
    config_class = EsmcConfig if raw.get("model_type") == "esmc" else EsmConfig

    def load(location: str, local_only: bool) -> tuple[Any, dict]:
        return model_class.from_pretrained(
            location,
            config=config_class.from_dict(raw),
            attn_implementation="sdpa",
            dtype=torch.float32,
            local_files_only=local_only,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported by refuse_mismatch in one line
            **kwargs,
        )

    model, info = load_pretrained(source, load)
    return model, refuse_mismatch(source.spec, info, missing_ok, unexpected_ok)


def _zero_absent_contact_head(model: torch.nn.Module, has_contacts: bool) -> None:
    """Zero a contact head the checkpoint did not provide: it is never used, and left at its random
    initialisation it would make the weights checksum differ at every load."""
    head = getattr(model, "contact_head", None)
    if head is not None and not has_contacts:
        with torch.no_grad():
            for parameter in head.parameters():
                parameter.zero_()


def _load_hf(source: Source, raw: dict[str, Any]) -> tuple[EsmModel, bool]:
    """EsmModel (no pooler) from a hub id or directory; EsmForMaskedLM saves load too (``esm.`` prefix)."""
    model, missing = load_hf_class(
        source, EsmModel, raw, _MISSING_OK, _UNEXPECTED_OK, add_pooling_layer=False
    )
    return model, not missing.intersection(CONTACT_KEYS)


def _load_fair_esm(source: Source) -> tuple[EsmModel, bool]:
    data, state = read_checkpoint(source.location, source.spec)
    arch = fair_esm_arch(data, state, source.spec)
    config = EsmConfig(**arch, attn_implementation="sdpa")
    if data.get(RANDOM_WEIGHTS_KEY):
        setattr(config, RANDOM_WEIGHTS_KEY, True)
    hf_state = convert_state(state, arch, source.spec)
    model = EsmModel(config, add_pooling_layer=False)
    _check_and_load(model, hf_state, source.spec, _MISSING_OK)
    return model, all(k in hf_state for k in CONTACT_KEYS)


def _load_fair_esm_mlm(source: Source) -> EsmForMaskedLM:
    data, state = read_checkpoint(source.location, source.spec)
    arch = fair_esm_arch(data, state, source.spec)
    config = EsmConfig(**arch, attn_implementation="sdpa")
    if data.get(RANDOM_WEIGHTS_KEY):
        setattr(config, RANDOM_WEIGHTS_KEY, True)
    encoder = convert_state(state, arch, source.spec)
    head = _fair_esm_lm_head(state, source.spec)
    hf_state = {**{f"esm.{k}": v for k, v in encoder.items()}, **head}
    model = EsmForMaskedLM(config)
    # lm_head.decoder.weight is the token embedding (tied), filled with it
    _check_and_load(model, hf_state, source.spec, _FAIR_MLM_MISSING_OK)
    _zero_absent_contact_head(model.esm, all(k in encoder for k in CONTACT_KEYS))
    return model


def _fair_esm_lm_head(state: dict[str, torch.Tensor], spec: str) -> dict[str, torch.Tensor]:
    """EsmLMHead weights from a fair-esm state dict; its projection must be the token embedding (tied)."""
    missing = sorted(k for k in [*_LM_HEAD_RENAMES, "lm_head.weight"] if k not in state)
    if missing:
        raise CheckpointMismatchError(
            f"model {spec!r} has no masked-LM head ({missing[0]} missing); variant scores need one"
        )
    projection, embedding = state["lm_head.weight"], state.get("embed_tokens.weight")
    if embedding is None or projection.shape != embedding.shape or not torch.equal(projection, embedding):
        raise CheckpointMismatchError(
            f"model {spec!r}: lm_head.weight is not the token embedding; fair-esm ties them, so this "
            "checkpoint is not a fair-esm ESM model"
        )
    return {new: state[old] for old, new in _LM_HEAD_RENAMES.items()}


def _check_and_load(
    model: torch.nn.Module, state: dict[str, torch.Tensor], spec: str, missing_ok: re.Pattern[str]
) -> None:
    """``load_state_dict`` after refusing keys that are missing (beyond ``missing_ok``), unexpected, or of
    the wrong shape, in one line (CheckpointMismatchError)."""
    expected = model.state_dict()
    info = {
        "missing_keys": expected.keys() - state.keys(),
        "unexpected_keys": state.keys() - expected.keys(),
        "mismatched_keys": [
            (key, value.shape, expected[key].shape)
            for key, value in state.items()
            if key in expected and value.shape != expected[key].shape
        ],
    }
    refuse_mismatch(spec, info, missing_ok, _NOTHING)
    model.load_state_dict(state, strict=False)
