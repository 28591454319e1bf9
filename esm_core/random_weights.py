"""Write random-weight ESM checkpoints in the real on-disk formats (HF directory, fair-esm .pt): ESM-2 /
ESM-1b / ESM-1v and ESM C language models, and ESM / ESM C classification heads.

They stand in for pretrained weights where none can be downloaded, and carry the marker
``proteoflow_random_weights`` so every result computed from them is flagged.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    EsmcConfig,
    EsmcForMaskedLM,
    EsmcForSequenceClassification,
    EsmcForTokenClassification,
    EsmcModel,
    EsmConfig,
    EsmForMaskedLM,
    EsmForSequenceClassification,
    EsmForTokenClassification,
    EsmModel,
    EsmTokenizer,
)

from esm_core import alphabet, registry
from esm_core.hf_loading import quiet_loading
from esm_core.weights import RANDOM_WEIGHTS_KEY

HEADS = ("sequence", "token")
_HEAD_CLASSES = {
    ("esm", "sequence"): EsmForSequenceClassification,
    ("esm", "token"): EsmForTokenClassification,
    ("esmc", "sequence"): EsmcForSequenceClassification,
    ("esmc", "token"): EsmcForTokenClassification,
}


def write_random_hf_checkpoint(
    out_dir: str | Path,
    arch: str | dict[str, Any] = "esm2_t6_8M_UR50D",
    masked_lm: bool = True,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised ``EsmForMaskedLM`` (or ``EsmModel``) plus tokenizer files to ``out_dir``;
    ESM C architectures (``tiny_esmc``, ``esmc_300m``...) as ``EsmcForMaskedLM`` (or ``EsmcModel``)."""
    config = _config(arch)
    torch.manual_seed(seed)
    if config.model_type == "esmc":
        model = EsmcForMaskedLM(config) if masked_lm else EsmcModel(config)
    else:
        model = EsmForMaskedLM(config) if masked_lm else EsmModel(config, add_pooling_layer=False)
    return _save(model, out_dir)


def write_random_head_checkpoint(
    out_dir: str | Path,
    arch: str | dict[str, Any] = "tiny_esm2",
    head: str = "sequence",
    labels: Sequence[str] = ("negative", "positive"),
    problem_type: str | None = None,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised classification model (``Esm`` / ``EsmcForSequenceClassification`` for
    ``head="sequence"``, ``...ForTokenClassification`` for ``"token"``) whose config names ``labels``
    (id2label), plus tokenizer files, to ``out_dir``."""
    if head not in HEADS:
        raise ValueError(f"head {head!r}: choose from {', '.join(HEADS)}")
    config = _config(arch)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    config.problem_type = problem_type
    torch.manual_seed(seed)
    model = _HEAD_CLASSES[(config.model_type, head)](config)
    with torch.no_grad():  # default init (std 0.02, zero biases) gives near-constant outputs; spread them
        for name, parameter in model.named_parameters():
            if name.startswith(("classifier.", "score.")) and parameter.dim() == 2:
                parameter.normal_(0.0, parameter.shape[1] ** -0.5)
            elif name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return _save(model, out_dir)


def _config(arch: str | dict[str, Any]) -> EsmConfig | EsmcConfig:
    shape = registry.architecture(arch)
    config = EsmcConfig(**shape) if registry.model_type_of(shape) == "esmc" else EsmConfig(**shape)
    setattr(config, RANDOM_WEIGHTS_KEY, True)
    return config


def _save(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """``save_pretrained`` plus the family's tokenizer files. ESM C's layer norms (ones/zeros at init) are
    perturbed first so that a norm mapped to the wrong place cannot pass unnoticed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model.config.model_type == "esmc":
        from transformers import EsmcTokenizer

        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.add_(0.1 * torch.randn_like(parameter))
        tokenizer = EsmcTokenizer()
    else:
        tokenizer = EsmTokenizer(str(alphabet.write_vocab(out_dir / "vocab.txt")))
    with quiet_loading():  # no "Writing model shards" bar
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return out_dir


def write_random_fair_esm_checkpoint(
    path: str | Path,
    arch: str | dict[str, Any] = "esm2_t6_8M_UR50D",
    seed: int = 0,
    contact_regression: bool = True,
) -> Path:
    """Save a random fair-esm model laid out like fair-esm's hub files (``esm.pretrained`` reads it).

    ESM-2 shapes: ``{"model": encoder.sentence_encoder.* state, "cfg": {"model": Namespace(...)}}``;
    ESM-1b/1v shapes: ``{"model": ..., "args": Namespace(arch="roberta_large", ...)}``. The contact head goes
    to ``<stem>-contact-regression.pt`` like the hub's regression files. fair-esm's loader picks the ESM-2
    path by the file name (``esm2*``), so name ESM-2 files accordingly if fair-esm itself must read them.
    """
    import esm  # dev dependency: only this writer needs fair-esm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = registry.architecture(arch)
    layers, dim, heads = shape["num_hidden_layers"], shape["hidden_size"], shape["num_attention_heads"]
    esm_alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    torch.manual_seed(seed)
    if shape["position_embedding_type"] == "rotary":
        if shape["intermediate_size"] != 4 * dim:
            raise ValueError("fair-esm ESM2 fixes the FFN width at 4 x dim")
        model = esm.model.esm2.ESM2(
            layers, dim, heads, alphabet=esm_alphabet, token_dropout=shape["token_dropout"]
        )
        meta: dict[str, Any] = {
            "cfg": {
                "model": argparse.Namespace(
                    encoder_layers=layers,
                    encoder_embed_dim=dim,
                    encoder_ffn_embed_dim=4 * dim,
                    encoder_attention_heads=heads,
                    max_positions=shape["max_position_embeddings"] - alphabet.PAD - 1,
                    token_dropout=shape["token_dropout"],
                    arch="esm2",
                )
            }
        }
    else:
        args = argparse.Namespace(
            arch="roberta_large",
            encoder_layers=layers,
            encoder_embed_dim=dim,
            encoder_ffn_embed_dim=shape["intermediate_size"],
            encoder_attention_heads=heads,
            max_positions=shape["max_position_embeddings"] - alphabet.PAD - 1,
            token_dropout=shape["token_dropout"],
        )
        model_args = argparse.Namespace(
            **{k.replace("encoder_", ""): v for k, v in vars(args).items()},
            emb_layer_norm_before=shape["emb_layer_norm_before"],
        )
        model = esm.model.esm1.ProteinBertModel(model_args, esm_alphabet)
        meta = {"args": args}
    state = model.state_dict()
    contact = {k: state.pop(k) for k in list(state) if k.startswith("contact_head.")}
    # LayerNorm init is ones/zeros; perturb it so that a wrong layer-norm mapping cannot pass unnoticed.
    for k in [k for k in state if "layer_norm" in k]:
        state[k] = state[k] + 0.1 * torch.randn_like(state[k])
    on_disk = {
        (f"encoder.{k}" if k.startswith("lm_head.") else f"encoder.sentence_encoder.{k}"): v
        for k, v in state.items()
    }
    torch.save({"model": on_disk, **meta, RANDOM_WEIGHTS_KEY: True}, path)
    if contact_regression:
        torch.save({"model": contact}, path.with_name(path.stem + "-contact-regression.pt"))
    return path
