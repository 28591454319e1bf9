"""The fair-esm ``.pt`` format (ESM-2, ESM-1b, ESM-1v): read safely, its architecture as ``EsmConfig``
keyword arguments, and its state-dict keys renamed to transformers' ``EsmModel`` names. No model code is
copied and transformers is not imported, so reading the architecture is a cheap pre-flight step."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from esm_core import alphabet, registry
from esm_core.sources import CheckpointMismatchError, ModelNotFoundError, fair_esm_files, first_line

CONTACT_KEYS = ("contact_head.regression.weight", "contact_head.regression.bias")

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
    """``torch.load`` with ``weights_only=True`` (only ``argparse.Namespace`` allowed) and memory-mapped,
    so tensors are read from disk only when used; files in torch's legacy format are read whole."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path, spec: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the file's top-level dict, its state dict with the contact regression merged in and the
    ``encoder.`` prefixes removed). ModelNotFoundError when the file is not a fair-esm checkpoint."""
    main, *regression = fair_esm_files(path)
    try:
        data = read_fair_esm_file(main)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is "not a checkpoint", said in one line
        raise ModelNotFoundError(
            f"model {spec!r}: {main} is not a readable fair-esm checkpoint: {first_line(exc)}"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ModelNotFoundError(
            f"model {spec!r}: {main} is not a fair-esm checkpoint (expected a dict with a 'model' state dict)"
        )
    state = {_PREFIX.sub("", k): v for k, v in data["model"].items()}
    for extra in regression:
        state.update({_PREFIX.sub("", k): v for k, v in read_fair_esm_file(extra)["model"].items()})
    return data, state


def fair_esm_arch(data: dict[str, Any], state_keys: set[str] | dict[str, Any], spec: str) -> dict[str, Any]:
    """``EsmConfig`` kwargs from an ESM-2 file's ``cfg["model"]`` or an ESM-1b/1v file's ``args``
    (arch roberta_large); ESM-1b's layer norm before the encoder is read from the keys."""
    if "cfg" in data:  # ESM-2: fair-esm builds ESM2(encoder_layers, encoder_embed_dim, heads), FFN = 4 * dim
        cfg = data["cfg"]["model"]
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        arch = registry.esm2_arch(
            get("encoder_layers"), get("encoder_embed_dim"), get("encoder_attention_heads")
        )
        arch["token_dropout"] = bool(get("token_dropout", True))
        return arch
    if "args" in data:
        args = vars(data["args"]) if not isinstance(data["args"], dict) else data["args"]
        if args.get("arch") != "roberta_large":
            raise ModelNotFoundError(
                f"model {spec!r}: unsupported fair-esm arch {args.get('arch')!r}; "
                "only ESM-2 and ESM-1b/ESM-1v load"
            )
        arch = registry.esm1b_arch(
            args["encoder_layers"],
            args["encoder_embed_dim"],
            args["encoder_attention_heads"],
            args["encoder_ffn_embed_dim"],
            emb_layer_norm_before=any(k.startswith("emb_layer_norm_before") for k in state_keys),
        )
        # LearnedPositionalEmbedding holds max_positions + padding_idx + 1 rows.
        arch["max_position_embeddings"] = int(args.get("max_positions", 1024)) + alphabet.PAD + 1
        arch["token_dropout"] = bool(args.get("token_dropout", False))
        return arch
    raise ModelNotFoundError(
        f"model {spec!r}: not a fair-esm checkpoint (neither 'cfg' of ESM-2 nor 'args' of ESM-1b present)"
    )


def convert_state(state: dict[str, torch.Tensor], arch: dict[str, Any], spec: str) -> dict[str, torch.Tensor]:
    """Rename fair-esm keys to EsmModel keys; drop the LM head; one shared rotary ``inv_freq``.

    ESM-1b: zero the <mask> embedding row, as fair-esm's own loader does for roberta_large checkpoints.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
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
                unknown.append(key)
        elif key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(
            f"model {spec!r}: {len(unknown)} keys that are not fair-esm ESM weights: {', '.join(unknown[:3])}"
        )
    if arch["position_embedding_type"] == "absolute" and "embeddings.word_embeddings.weight" in out:
        words = out["embeddings.word_embeddings.weight"].clone()
        words[alphabet.MASK].zero_()
        out["embeddings.word_embeddings.weight"] = words
    return out
