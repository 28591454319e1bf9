"""Per-sequence confidence from ESMFold's batched outputs.

transformers' ``EsmForProteinFolding.forward`` returns ``ptm`` as ONE scalar for the whole batch:
``compute_tm`` is applied to the padded [B, L, L, bins] logits, takes d0 from the padded length L and
returns the per-alignment maximum over every sequence of the batch. Here pTM is recomputed with the same
``compute_tm`` on each sequence's own residues; pLDDT is rescaled from transformers' 0-1 to 0-100.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.esm.openfold_utils import compute_tm, residue_constants

PAE_MAX_BIN = 31  # as EsmForProteinFolding.forward: compute_tm / compute_predicted_aligned_error(max_bin=31)
CA_INDEX = residue_constants.atom_order["CA"]


def sequence_ptm(ptm_logits: torch.Tensor, keep: torch.Tensor) -> float:
    """pTM of one sequence from its [T, T, bins] logits, restricted to the residues where ``keep``."""
    logits = ptm_logits[keep][:, keep].float()
    return float(compute_tm(logits, max_bin=PAE_MAX_BIN, no_bins=logits.shape[-1]))


def residue_plddt(plddt_atom37: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    """Per-residue pLDDT, 0-100 (the CA atom's value, as AlphaFold reports it), of the kept residues."""
    return (plddt_atom37[keep, CA_INDEX].float() * 100.0).cpu().numpy().astype(np.float32)


def sequence_pae(pae: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    """Predicted aligned error (Angstrom, [N, N], row = aligned residue) of the kept residues."""
    return pae[keep][:, keep].float().cpu().numpy().astype(np.float32)
