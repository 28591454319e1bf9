"""Random-weight ESMFold checkpoints: a normal Hugging Face directory built from an ``EsmConfig`` with
``is_folding_model=True``, so tests and benchmarks exercise the real loading and folding path offline."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import EsmConfig, EsmForProteinFolding, EsmTokenizer
from transformers.models.esm.configuration_esm import get_default_vocab_list

from esm_core.hf_loading import quiet_loading
from esm_core.weights import RANDOM_WEIGHTS_KEY

# Seconds for ~10 sequences of 50-150 residues on a CPU: 2-layer ESM-2 stem, 1 trunk block, 2 passes.
TINY_STEM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_FOLD = dict(
    lddt_head_hid_dim=16,
    trunk=dict(
        num_blocks=1,
        sequence_state_dim=32,
        pairwise_state_dim=16,
        sequence_head_width=8,
        pairwise_head_width=8,
        position_bins=32,
        max_recycles=2,
        chunk_size=None,
        structure_module=dict(
            sequence_dim=32,
            pairwise_dim=16,
            ipa_dim=8,
            resnet_dim=16,
            num_heads_ipa=2,
            num_qk_points=2,
            num_v_points=2,
            num_blocks=2,
        ),
    ),
)
# Realistic compute for the folding part: the esmfold_v1 trunk (48 blocks, 1024/128 dims, 8-block
# structure module) on an ESM-2 35M-sized stem (the 3B stem would make a 14 GB random file).
REALISTIC_STEM = dict(hidden_size=480, num_hidden_layers=12, num_attention_heads=20, intermediate_size=1920)
REALISTIC_FOLD = dict(lddt_head_hid_dim=128, trunk=dict(num_blocks=48, chunk_size=None))


def random_esmfold_config(tiny: bool = True) -> EsmConfig:
    """The ``EsmConfig`` of a random ESMFold: tiny (tests) or esmfold_v1-sized trunk (benchmarks)."""
    vocab = list(get_default_vocab_list())
    stem = TINY_STEM if tiny else REALISTIC_STEM
    return EsmConfig(
        vocab_size=len(vocab),
        pad_token_id=vocab.index("<pad>"),
        mask_token_id=vocab.index("<mask>"),
        max_position_embeddings=1026,
        position_embedding_type="rotary",
        emb_layer_norm_before=False,
        token_dropout=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_folding_model=True,
        vocab_list=vocab,
        esmfold_config=dict(fp16_esm=not tiny, **(TINY_FOLD if tiny else REALISTIC_FOLD)),
        **stem,
    )


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn afresh (fan-in scaled), because transformers zero-initialises the final
    layers of the structure module: left as is, every atom would sit at the origin and tests of
    coordinates, batching and pTM would pass trivially."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.ndim >= 2:
            std = 1.0 / math.sqrt(param.shape[-1])
            values = torch.randn(param.shape, generator=generator) * std
        elif name.endswith("weight"):  # layer norms and the like: around one
            values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:  # biases and mixing weights
            values = 0.1 * torch.randn(param.shape, generator=generator)
        param.copy_(values.to(param.dtype))


def write_random_esmfold_checkpoint(out_dir: str | Path, tiny: bool = True, seed: int = 0) -> Path:
    """Write a random-weight ``EsmForProteinFolding`` (config, safetensors, tokenizer) to ``out_dir``.

    The config carries ``proteoflow_random_weights: true`` so every loader flags it; load it with
    ``esm_core.folding.load_esmfold(str(out_dir))``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = random_esmfold_config(tiny)
    setattr(config, RANDOM_WEIGHTS_KEY, True)
    torch.manual_seed(seed)
    model = EsmForProteinFolding(config).float().eval()
    _randomise(model, seed)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(config.vocab_list) + "\n")
    with quiet_loading():  # no "Writing model shards" bar
        model.save_pretrained(out)
        EsmTokenizer(vocab_file=str(vocab_file)).save_pretrained(out)
    return out
