"""ESM C (transformers' ``EsmcModel``) seen under ``EsmModel``'s module names, so the embedding engine runs it
unchanged: ``embeddings``, ``rotary_embeddings``, ``encoder.layer[i]`` and ``encoder.emb_layer_norm_after``.

The view holds EsmcModel's own modules (no copies, no new weights) and calls them in the order
``EsmcModel.forward`` does: token embedding, rotary cos/sin from positions 0..T-1, the blocks with the
bidirectional mask, the final layer norm. ESM C has no contact head and no pooler.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import EsmcConfig, EsmcModel
from transformers.masking_utils import create_bidirectional_mask


class EsmcTokenEmbedding(nn.Module):
    """``EsmEmbeddings``' call signature over ESM C's plain token embedding (no positions, no token
    dropout: ESM C scales nothing by the masked fraction)."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class EsmcBlocks(nn.Module):
    """``EsmEncoder``'s names over ESM C's blocks and final norm."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module):
        super().__init__()
        self.layer = layers
        self.emb_layer_norm_after = norm


class EsmcEncoderView(nn.Module):
    """An ``EsmcModel``'s modules under ``EsmModel``'s attribute names (see the module docstring)."""

    def __init__(self, esmc: EsmcModel):
        super().__init__()
        self.config: EsmcConfig = esmc.config
        self.embeddings = EsmcTokenEmbedding(esmc.embed_tokens)
        self.rotary_embeddings = esmc.rotary_emb
        self.encoder = EsmcBlocks(esmc.layers, esmc.norm)
        self.contact_head = None
        self.pooler = None
        self.train(esmc.training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state (final norm applied), as ``EsmcModel(...).last_hidden_state``."""
        hidden = self.embeddings(input_ids, attention_mask)
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        rotary = self.rotary_embeddings(hidden, positions)
        for layer in self.encoder.layer:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary)
        return self.encoder.emb_layer_norm_after(hidden)
