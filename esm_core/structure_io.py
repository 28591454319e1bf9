"""PDB and mmCIF text of a predicted structure, with per-residue pLDDT (0-100) as the B-factor of every
atom (the AlphaFold DB convention) so both formats carry the same confidence values."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import numpy as np
from transformers.models.esm.openfold_utils import OFProtein, residue_constants, to_pdb

# openfold's to_pdb names chains with upper-case letters only, so at most 26 chains per structure.
CHAIN_IDS = string.ascii_uppercase
_RESNAMES = residue_constants.resnames  # 20 standard three-letter codes, then "UNK"


@dataclass(frozen=True)
class Structure:
    """One predicted structure in atom37 layout; N residues, linker residues already removed."""

    aatype: np.ndarray  # [N] int, residue_constants.restypes_with_x order (20 = unknown)
    atom_positions: np.ndarray  # [N, 37, 3] float32, Angstrom
    atom_mask: np.ndarray  # [N, 37] float32, 1 where the atom is written
    residue_index: np.ndarray  # [N] int, 1-based numbering within each chain
    chain_index: np.ndarray  # [N] int, 0 -> chain A, 1 -> chain B, ...
    plddt: np.ndarray  # [N] float32, 0-100, written as every atom's B-factor

    def __post_init__(self) -> None:
        if self.chain_index.size and int(self.chain_index.max()) >= len(CHAIN_IDS):
            raise ValueError(
                f"at most {len(CHAIN_IDS)} chains can be written, got {int(self.chain_index.max()) + 1}"
            )


def to_pdb_text(structure: Structure) -> str:
    """PDB text through transformers' openfold ``to_pdb`` (chains, TER records), B-factor = pLDDT 0-100."""
    protein = OFProtein(
        aatype=structure.aatype,
        atom_positions=structure.atom_positions,
        atom_mask=structure.atom_mask,
        residue_index=structure.residue_index,
        b_factors=np.repeat(structure.plddt[:, None], residue_constants.atom_type_num, axis=1),
        chain_index=structure.chain_index,
    )
    return to_pdb(protein)


_ATOM_SITE_FIELDS = (
    "group_PDB",
    "id",
    "type_symbol",
    "label_atom_id",
    "label_alt_id",
    "label_comp_id",
    "label_asym_id",
    "label_entity_id",
    "label_seq_id",
    "pdbx_PDB_ins_code",
    "Cartn_x",
    "Cartn_y",
    "Cartn_z",
    "occupancy",
    "B_iso_or_equiv",
    "auth_seq_id",
    "auth_comp_id",
    "auth_asym_id",
    "auth_atom_id",
    "pdbx_PDB_model_num",
)


def cif_block_name(key: str) -> str:
    """The mmCIF ``data_`` block name (and ``_entry.id``) written inside the file, not a file name:
    characters outside [A-Za-z0-9_.-] become '_' so every CIF reader parses it. File names of exported
    structures are the exporter's business (flows/export.py); keys are seq_hash hex, unchanged here."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) or "structure"


def to_mmcif_text(structure: Structure, name: str = "structure") -> str:
    """Minimal mmCIF (one ``_atom_site`` loop, one entity per chain) with the same atoms and B-factors
    as :func:`to_pdb_text`; coordinates keep 3 decimals like PDB."""
    block = cif_block_name(name)
    lines = [f"data_{block}", "#", f"_entry.id {block}", "#", "loop_"]
    lines += [f"_atom_site.{field}" for field in _ATOM_SITE_FIELDS]
    atom_id = 0
    label_seq = 0
    previous_chain = -1
    for i in range(structure.aatype.shape[0]):
        chain = int(structure.chain_index[i])
        label_seq = label_seq + 1 if chain == previous_chain else 1
        previous_chain = chain
        chain_id = CHAIN_IDS[chain]
        resname = _RESNAMES[int(structure.aatype[i])]
        resnum = int(structure.residue_index[i])
        bfactor = float(structure.plddt[i])
        for atom_index, atom_name in enumerate(residue_constants.atom_types):
            if structure.atom_mask[i, atom_index] < 0.5:
                continue
            atom_id += 1
            x, y, z = (float(v) for v in structure.atom_positions[i, atom_index])
            lines.append(
                f"ATOM {atom_id} {atom_name[0]} {atom_name} . {resname} {chain_id} {chain + 1} {label_seq} ? "
                f"{x:.3f} {y:.3f} {z:.3f} 1.00 {bfactor:.2f} {resnum} {resname} {chain_id} {atom_name} 1"
            )
    lines += ["#", ""]
    return "\n".join(lines)
