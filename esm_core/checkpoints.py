"""Load an ESM checkpoint into transformers' ``EsmModel``, whatever format it ships in.

Three sources: a Hugging Face hub id (or registry short name), a local Hugging Face directory, and a fair-esm
``.pt`` file (ESM-2, ESM-1b, ESM-1v layouts). fair-esm files are read with ``weights_only=True`` and their
state-dict keys renamed to transformers' names; no model code is copied.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from transformers import EsmConfig, EsmModel
from transformers.utils import logging as hf_logging

from esm_core import alphabet, registry
from esm_core.device import pick_device
from esm_core.weights import RANDOM_WEIGHTS_KEY, RANDOM_WEIGHTS_NOTICE, weights_checksum

CONTACT_KEYS = ("contact_head.regression.weight", "contact_head.regression.bias")


class ModelNotFoundError(Exception):
    """No checkpoint found for a spec: not a local path, not cached, hub not reachable or no such repo."""


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

    @property
    def config(self) -> EsmConfig:
        return self.model.config


def load_esm(spec: str, device: str | torch.device | None = None) -> LoadedEsm:
    """Load ``spec`` (hub id, registry short name, HF directory or fair-esm .pt) onto ``device``."""
    target = pick_device(str(device) if device is not None else None)
    path = Path(spec).expanduser()
    if path.is_dir():
        model, has_contacts = _load_hf(str(path), local_only=True)
        source, name = "hf_dir", path.resolve().name
    elif path.is_file():
        model, has_contacts = _load_fair_esm(path)
        source, name = "fair_esm", path.stem
    elif spec.endswith(".pt") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFoundError(f"model {spec!r} not found: no such local file or directory")
    else:
        hub_id = registry.resolve(spec)
        model, has_contacts = _load_hf(hub_id, local_only=False)
        info = registry.lookup(hub_id)
        source, name = "hub", info.name if info else hub_id.rsplit("/", 1)[-1]
    return _finish(model, name, source, has_contacts, target)


def max_residues_of(config: EsmConfig) -> int:
    """Residues per forward pass: position slots minus the padding offset (pad id + 1) minus BOS/EOS.

    1022 for ESM-2 and ESM-1b (1026 slots). Rotary ESM-2 could run longer but was trained on 1024 tokens.
    """
    return config.max_position_embeddings - (config.pad_token_id + 1) - 2


def _finish(model: EsmModel, name: str, source: str, has_contacts: bool, device: torch.device) -> LoadedEsm:
    model = model.to(device=device, dtype=torch.float32).eval()
    random_weights = bool(getattr(model.config, RANDOM_WEIGHTS_KEY, False))
    if random_weights:
        notice = RANDOM_WEIGHTS_NOTICE.format(name=name)
        warnings.warn(notice, stacklevel=3)
        print(notice, file=sys.stderr, flush=True)
    return LoadedEsm(
        model=model,
        name=name,
        sha=weights_checksum(model),
        source=source,
        num_layers=model.config.num_hidden_layers,
        dim=model.config.hidden_size,
        max_residues=max_residues_of(model.config),
        random_weights=random_weights,
        has_contact_head=has_contacts,
        device=device,
    )


# ---------------------------------------------------------------------------------------- Hugging Face


def _load_hf(location: str, local_only: bool) -> tuple[EsmModel, bool]:
    """EsmModel (no pooler) from a hub id or directory; EsmForMaskedLM saves load too (``esm.`` prefix)."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the LM head of an EsmForMaskedLM save is dropped on purpose
    hf_logging.disable_progress_bar()
    try:
        model, info = EsmModel.from_pretrained(
            location,
            add_pooling_layer=False,
            attn_implementation="sdpa",
            dtype=torch.float32,
            local_files_only=local_only,
            output_loading_info=True,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local_only:
            raise ModelNotFoundError(
                f"{location!r} is not a loadable Hugging Face ESM directory: {first}"
            ) from exc
        offline = hub_constants.HF_HUB_OFFLINE
        hub = "hub (offline: HF_HUB_OFFLINE=1)" if offline else "hub (unreachable or no such repo)"
        raise ModelNotFoundError(
            f"model {location!r} not found; tried: local path (absent), Hugging Face cache "
            f"({hub_constants.HF_HUB_CACHE}), {hub}. {first}"
        ) from exc
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()
    missing = set(info.get("missing_keys", ()))
    return model, not missing.intersection(CONTACT_KEYS)


# ---------------------------------------------------------------------------------------------- fair-esm

# fair-esm module names -> transformers EsmModel names, for keys after the "encoder." prefixes are removed.
_LAYER_RENAMES = (
    ("self_attn.q_proj.", "attention.self.query."),
    ("self_attn.k_proj.", "attention.self.key."),
    ("self_attn.v_proj.", "attention.self.value."),
    ("self_attn.out_proj.", "attention.output.dense."),
    ("self_attn_layer_norm.", "attention.LayerNorm."),
    ("fc1.", "intermediate.dense."),
    ("fc2.", "output.dense."),
    ("final_layer_norm.", "LayerNorm."),
)
_TOP_RENAMES = {
    "embed_tokens.weight": "embeddings.word_embeddings.weight",
    "embed_positions.weight": "embeddings.position_embeddings.weight",
    "emb_layer_norm_before.weight": "embeddings.layer_norm.weight",
    "emb_layer_norm_before.bias": "embeddings.layer_norm.bias",
    "emb_layer_norm_after.weight": "encoder.emb_layer_norm_after.weight",
    "emb_layer_norm_after.bias": "encoder.emb_layer_norm_after.bias",
    CONTACT_KEYS[0]: CONTACT_KEYS[0],
    CONTACT_KEYS[1]: CONTACT_KEYS[1],
}
_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.|sentence_encoder\.)")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def read_fair_esm_file(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a fair-esm file with ``weights_only=True``, allowing only ``argparse.Namespace``."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _load_fair_esm(path: Path) -> tuple[EsmModel, bool]:
    data = read_fair_esm_file(path)
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path}: not a fair-esm checkpoint (expected a dict with a 'model' state dict)")
    state = {_PREFIX.sub("", k): v for k, v in data["model"].items()}
    regression = path.with_name(path.stem + "-contact-regression.pt")
    if regression.is_file():
        state.update({_PREFIX.sub("", k): v for k, v in read_fair_esm_file(regression)["model"].items()})
    config = fair_esm_config(data, state)
    if data.get(RANDOM_WEIGHTS_KEY):
        setattr(config, RANDOM_WEIGHTS_KEY, True)
    hf_state = convert_fair_esm_state(state, config)
    model = EsmModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if k not in CONTACT_KEYS]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not fit EsmModel (missing {missing}, unexpected {unexpected})"
        )
    return model, all(k in hf_state for k in CONTACT_KEYS)


def fair_esm_config(data: dict[str, Any], state: dict[str, torch.Tensor]) -> EsmConfig:
    """EsmConfig from an ESM-2 file's ``cfg["model"]`` or an ESM-1b/1v file's ``args`` (arch roberta_large)."""
    if "cfg" in data:  # ESM-2: fair-esm builds ESM2(encoder_layers, encoder_embed_dim, heads), FFN = 4 * dim
        cfg = data["cfg"]["model"]
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        arch = registry.esm2_arch(
            get("encoder_layers"), get("encoder_embed_dim"), get("encoder_attention_heads")
        )
        arch["token_dropout"] = bool(get("token_dropout", True))
    elif "args" in data:
        args = vars(data["args"]) if not isinstance(data["args"], dict) else data["args"]
        if args.get("arch") != "roberta_large":
            raise ValueError(
                f"unsupported fair-esm arch {args.get('arch')!r}: only ESM-2 and ESM-1b/ESM-1v load"
            )
        arch = registry.esm1b_arch(
            args["encoder_layers"],
            args["encoder_embed_dim"],
            args["encoder_attention_heads"],
            args["encoder_ffn_embed_dim"],
            emb_layer_norm_before=any(k.startswith("emb_layer_norm_before") for k in state),
        )
        # LearnedPositionalEmbedding holds max_positions + padding_idx + 1 rows.
        arch["max_position_embeddings"] = int(args.get("max_positions", 1024)) + alphabet.PAD + 1
        arch["token_dropout"] = bool(args.get("token_dropout", False))
    else:
        raise ValueError("not a fair-esm checkpoint: neither 'cfg' (ESM-2) nor 'args' (ESM-1b) present")
    return EsmConfig(**arch, attn_implementation="sdpa")


def convert_fair_esm_state(state: dict[str, torch.Tensor], config: EsmConfig) -> dict[str, torch.Tensor]:
    """Rename fair-esm keys to EsmModel keys; drop the LM head; one shared rotary ``inv_freq``.

    ESM-1b: zero the <mask> embedding row, as fair-esm's own loader does for roberta_large checkpoints.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("lm_head.") or key.endswith(".version") or key == "version":
            continue
        layer = _LAYER.match(key)
        if layer:
            index, rest = layer.groups()
            if rest == "self_attn.rot_emb.inv_freq":
                out.setdefault("rotary_embeddings.inv_freq", value)
                continue
            for old, new in _LAYER_RENAMES:
                if rest.startswith(old):
                    out[f"encoder.layer.{index}.{new}{rest[len(old) :]}"] = value
                    break
            else:
                raise ValueError(f"unknown fair-esm layer key {key!r}")
        elif key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
        else:
            raise ValueError(f"unknown fair-esm key {key!r}")
    if config.position_embedding_type == "absolute":
        words = out["embeddings.word_embeddings.weight"].clone()
        words[alphabet.MASK].zero_()
        out["embeddings.word_embeddings.weight"] = words
    return out
