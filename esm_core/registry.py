"""Known ESM checkpoints: hub id, size and an architecture that builds a same-shaped (random) model.

Architectures are plain dicts of transformers config keyword arguments (``EsmConfig``; ``EsmcConfig`` for
ESM C, whose dicts carry ``model_type="esmc"``) so that they can be written to config.json, compared and
rebuilt without importing a model class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from esm_core import alphabet

# What every ESM-2 / ESM-1b config shares (values as in the hub's config.json files).
_COMMON: dict[str, Any] = {
    "vocab_size": alphabet.VOCAB_SIZE,
    "pad_token_id": alphabet.PAD,
    "mask_token_id": alphabet.MASK,
    "max_position_embeddings": 1026,
    "layer_norm_eps": 1e-5,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "token_dropout": True,
    "is_folding_model": False,
}


def esm2_arch(layers: int, dim: int, heads: int) -> dict[str, Any]:
    """ESM-2 shape: rotary positions, FFN 4x, no layer norm before the encoder."""
    return {
        **_COMMON,
        "num_hidden_layers": layers,
        "hidden_size": dim,
        "num_attention_heads": heads,
        "intermediate_size": 4 * dim,
        "position_embedding_type": "rotary",
        "emb_layer_norm_before": False,
    }


def esm1b_arch(
    layers: int, dim: int, heads: int, ffn: int, emb_layer_norm_before: bool = True
) -> dict[str, Any]:
    """ESM-1b / ESM-1v shape: learned absolute positions (1024 + padding offset)."""
    return {
        **_COMMON,
        "num_hidden_layers": layers,
        "hidden_size": dim,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "position_embedding_type": "absolute",
        "emb_layer_norm_before": emb_layer_norm_before,
    }


def esmc_arch(layers: int, dim: int, heads: int, max_positions: int = 2048) -> dict[str, Any]:
    """ESM C shape (transformers ``EsmcConfig``): pre-norm blocks with QK layer norm, SwiGLU FFN of
    8/3 x dim rounded up to a multiple of 256, rotary positions, a 64-token vocabulary whose first 33 ids are
    the ESM-2 alphabet's."""
    return {
        "model_type": "esmc",
        "vocab_size": 64,
        "pad_token_id": alphabet.PAD,
        "mask_token_id": alphabet.MASK,
        "num_hidden_layers": layers,
        "hidden_size": dim,
        "num_attention_heads": heads,
        "intermediate_size": -(-(8 * dim // 3) // 256) * 256,
        "max_position_embeddings": max_positions,
    }


def model_type_of(arch: dict[str, Any]) -> str:
    """ "esmc" for ESM C architectures, else "esm"."""
    return arch.get("model_type", "esm")


def count_parameters(arch: dict[str, Any]) -> int:
    """Parameters of the encoder without heads: ``EsmModel`` without pooler (embeddings, encoder, contact
    head; no LM head) or ``EsmcModel``."""
    if model_type_of(arch) == "esmc":
        d, f, n = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
        # q/k/v/o (no bias), q/k norms (no bias), SwiGLU (no bias), two block norms (with bias)
        per_layer = 4 * d * d + 2 * d + 3 * d * f + 2 * 2 * d
        return arch["vocab_size"] * d + n * per_layer + d
    d, f, n, h = (
        arch["hidden_size"],
        arch["intermediate_size"],
        arch["num_hidden_layers"],
        arch["num_attention_heads"],
    )
    per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    total = arch["vocab_size"] * d + n * per_layer + 2 * d + (n * h + 1)
    if arch["position_embedding_type"] == "absolute":
        total += arch["max_position_embeddings"] * d
    if arch["emb_layer_norm_before"]:
        total += 2 * d
    return total


@dataclass(frozen=True)
class ModelInfo:
    """One known checkpoint: short name, hub id, family and architecture."""

    name: str
    hub_id: str
    family: str  # "esm2" | "esm1b" | "esm1v" | "esmc"
    nominal: str  # size as in the name: "8M", "650M", "15B"
    arch: dict[str, Any] = field(repr=False)

    @property
    def layers(self) -> int:
        return self.arch["num_hidden_layers"]

    @property
    def dim(self) -> int:
        return self.arch["hidden_size"]

    @property
    def params(self) -> int:
        return count_parameters(self.arch)


def _esm2(name: str, nominal: str, layers: int, dim: int, heads: int) -> ModelInfo:
    return ModelInfo(name, f"facebook/{name}", "esm2", nominal, esm2_arch(layers, dim, heads))


_MODELS = [
    _esm2("esm2_t6_8M_UR50D", "8M", 6, 320, 20),
    _esm2("esm2_t12_35M_UR50D", "35M", 12, 480, 20),
    _esm2("esm2_t30_150M_UR50D", "150M", 30, 640, 20),
    _esm2("esm2_t33_650M_UR50D", "650M", 33, 1280, 20),
    _esm2("esm2_t36_3B_UR50D", "3B", 36, 2560, 40),
    _esm2("esm2_t48_15B_UR50D", "15B", 48, 5120, 40),
    ModelInfo(
        "esm1b_t33_650M_UR50S",
        "facebook/esm1b_t33_650M_UR50S",
        "esm1b",
        "650M",
        esm1b_arch(33, 1280, 20, 5120),
    ),
    *(
        # ESM-1v checkpoints carry no layer norm before the encoder (the loader reads it from the keys anyway).
        ModelInfo(
            f"esm1v_t33_650M_UR90S_{i}",
            f"facebook/esm1v_t33_650M_UR90S_{i}",
            "esm1v",
            "650M",
            esm1b_arch(33, 1280, 20, 5120, emb_layer_norm_before=False),
        )
        for i in range(1, 6)
    ),
]
MODELS: dict[str, ModelInfo] = {m.name: m for m in _MODELS}

# ESM C (transformers' Esmc* classes), kept apart from MODELS so the ESM-2 / ESM-1 listing stays as it is;
# resolve() and lookup() know both.
ESMC_MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        ModelInfo("esmc_300m", "biohub/ESMC-300M", "esmc", "300M", esmc_arch(30, 960, 15)),
        ModelInfo("esmc_600m", "biohub/ESMC-600M", "esmc", "600M", esmc_arch(36, 1152, 18)),
    )
}
_KNOWN: dict[str, ModelInfo] = {**MODELS, **ESMC_MODELS}

# The five ESM-1v checkpoints whose scores are averaged for variant effects (Meier et al. 2021).
ESM1V_ENSEMBLE: tuple[str, ...] = tuple(m.name for m in MODELS.values() if m.family == "esm1v")

# Small shapes for tests and smoke runs; never on the hub.
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "tiny_esm2": esm2_arch(2, 32, 4),
    "tiny_esm1b": esm1b_arch(2, 32, 4, 64),
    "tiny_esm1v": esm1b_arch(2, 32, 4, 64, emb_layer_norm_before=False),
    "tiny_esmc": esmc_arch(2, 32, 4),
}


def resolve(spec: str) -> str:
    """Hub id for a known short name ("esm2_t6_8M_UR50D" -> "facebook/esm2_t6_8M_UR50D",
    "esmc_300m" -> "biohub/ESMC-300M"); else ``spec``."""
    info = _KNOWN.get(spec)
    return info.hub_id if info else spec


def lookup(spec: str) -> ModelInfo | None:
    """The registry entry for a short name or hub id, or None."""
    if spec in _KNOWN:
        return _KNOWN[spec]
    return next((m for m in _KNOWN.values() if m.hub_id == spec), None)


def architecture(arch: str | dict[str, Any]) -> dict[str, Any]:
    """Config kwargs for a registry name, a tiny name, or a dict (returned as a copy)."""
    if isinstance(arch, dict):
        return dict(arch)
    if arch in TINY_ARCHS:
        return dict(TINY_ARCHS[arch])
    info = lookup(arch)
    if info is None:
        known = ", ".join([*_KNOWN, *TINY_ARCHS])
        raise KeyError(f"unknown architecture {arch!r}; known: {known}")
    return dict(info.arch)


def model_table(include_esmc: bool = False) -> list[dict[str, Any]]:
    """Rows for ``proteoflow models``: name, hub id, params, layers, dim (registry order); ESM C last when
    ``include_esmc``."""
    models = [*MODELS.values(), *(ESMC_MODELS.values() if include_esmc else ())]
    return [
        {
            "name": m.name,
            "hub_id": m.hub_id,
            "params": m.params,
            "nominal": m.nominal,
            "layers": m.layers,
            "dim": m.dim,
        }
        for m in models
    ]
