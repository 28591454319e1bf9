"""ESMFold structure prediction on transformers' ``EsmForProteinFolding``: loading (through
:mod:`esm_core.sources`, shared with the embedding models), token-budget batching, complexes,
per-sequence confidence and out-of-memory back-off. No Ray, Prefect or store layout here."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import EsmConfig, EsmForProteinFolding
from transformers.models.esm.openfold_utils import atom14_to_atom37, residue_constants

from esm_core.confidence import CA_INDEX, residue_plddt, sequence_pae, sequence_ptm
from esm_core.device import free_cached_memory, is_out_of_memory, pick_device
from esm_core.fold_batching import (
    FoldInput,
    auto_chunk_size,
    collate,
    encode,
    fold_token_budget,
    smaller_chunk_size,
    sort_longest_first,
    take_batch,
)
from esm_core.hf_loading import load_pretrained, refuse_mismatch
from esm_core.sources import ModelNotFoundError, check_config, loaded_fingerprint, resolve_source
from esm_core.structure_io import CHAIN_IDS, Structure, to_mmcif_text, to_pdb_text
from esm_core.weights import RANDOM_WEIGHTS_KEY, weights_checksum

__all__ = [
    "FoldOutOfMemoryError",
    "FoldResult",
    "Folder",
    "LoadedFolder",
    "ModelNotFoundError",
    "load_esmfold",
]

logger = logging.getLogger(__name__)

# What a folding checkpoint may legitimately leave out: the ESM-2 stem's contact head (unused by folding)
# and a pooler.
_MISSING_OK = re.compile(r"^(esm\.)?contact_head\.regression\.(weight|bias)$")
_UNEXPECTED_OK = re.compile(r"^esm\.pooler\.")


class FoldOutOfMemoryError(RuntimeError):
    """A single sequence ran out of memory at the smallest chunk size and on the CPU fallback."""


@dataclass
class LoadedFolder:
    """An ESMFold model in eval mode with its identity: hub short name or directory name, weights checksum."""

    model: EsmForProteinFolding
    name: str
    sha: str
    random_weights: bool
    device: torch.device
    fingerprint: str | None = None  # esm_core.sources.fingerprint of the files loaded


def stem_dtype(device: torch.device) -> torch.dtype:
    """ESM-2 stem precision: fp16 on GPU (as ESMFold runs it; halves the 3B stem's memory), fp32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def place_model(model: EsmForProteinFolding, device: torch.device) -> None:
    """Move ``model`` (loaded in fp32) to ``device`` with its ESM-2 stem in :func:`stem_dtype`; the stem
    is halved before a move to the GPU and widened after a move off it, never fp32 on the GPU."""
    dtype = stem_dtype(device)
    if dtype == torch.float16:
        model.esm.to(dtype=dtype)
        model.to(device=device)
    else:
        model.to(device=device)
        model.esm.to(dtype=dtype)


def load_esmfold(spec: str, device: str | torch.device | None = None) -> LoadedFolder:
    """Load ESMFold from a hub id (``facebook/esmfold_v1``; the local HF cache first, then the hub unless
    offline) or a local Hugging Face directory, in eval mode on ``device`` (default: GPU if any).

    Raises ModelNotFoundError (one line) for a missing or non-ESMFold checkpoint and CheckpointMismatchError
    when its weights do not fit its architecture. Prints nothing; ``random_weights`` tells the caller.
    """
    target = pick_device(str(device) if device is not None else None)
    source = resolve_source(spec)
    if source.kind == "fair_esm":
        raise ModelNotFoundError(
            f"model {spec!r} is a file; ESMFold loads from a Hugging Face directory or hub id"
        )

    def load(location: str, local_only: bool) -> tuple[EsmForProteinFolding, dict]:
        raw, _ = EsmConfig.get_config_dict(location, local_files_only=local_only)
        check_config(raw, "esmfold", spec)
        config = EsmConfig.from_dict(raw)
        # fp16_esm makes __init__ halve the stem before the weights load, rounding fp32 checkpoints
        # to fp16 even on a CPU; load at full precision and let place_model pick the stem dtype.
        fp16_esm, config.esmfold_config.fp16_esm = config.esmfold_config.fp16_esm, False
        model, info = EsmForProteinFolding.from_pretrained(
            location,
            config=config,
            local_files_only=local_only,
            dtype=torch.float32,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported by refuse_mismatch in one line
        )
        model.config.esmfold_config.fp16_esm = fp16_esm
        return model, info

    model, info = load_pretrained(source, load)
    refuse_mismatch(spec, info, _MISSING_OK, _UNEXPECTED_OK)
    model.eval().requires_grad_(False)
    sha = weights_checksum(model)  # on CPU in fp32, before the stem is halved for a GPU
    place_model(model, target)
    return LoadedFolder(
        model=model,
        name=source.name,
        sha=sha,
        random_weights=bool(getattr(model.config, RANDOM_WEIGHTS_KEY, False)),
        device=target,
        fingerprint=loaded_fingerprint(source),
    )


@dataclass
class FoldResult:
    """One folded sequence or complex; all per-residue arrays exclude the glycine linker."""

    key: str
    length: int  # residues, linker excluded
    chains: list[str]  # chain ids in the structure: ["A"], ["A", "B"], ...
    mean_plddt: float  # mean of per-residue pLDDT, 0-100
    ptm: float  # pTM of this sequence alone
    plddt: np.ndarray  # [length] float32, 0-100 (CA atom)
    pae: np.ndarray | None  # [length, length] float32 Angstrom, when Folder(pae=True)
    pdb: str
    cif: str
    fallbacks: list[str] = field(default_factory=list)  # out-of-memory back-offs taken, in order
    settings: dict = field(default_factory=dict)  # num_recycles, chunk_size, device, stem_dtype


@dataclass
class _Prediction:
    """Model outputs of one batch item, linker removed, on the CPU."""

    positions: np.ndarray  # [N, 37, 3]
    atom_mask: np.ndarray  # [N, 37]
    plddt: np.ndarray  # [N]
    ptm: float
    pae: np.ndarray | None


class Folder:
    """Folds (key, sequence) items with token-budget batching and out-of-memory back-off.

    ``chunk_size``: "auto" (:func:`esm_core.fold_batching.auto_chunk_size` of each batch's longest input),
    an int, or None (no chunking). ``max_tokens``: batch size * longest input in tokens (residues plus
    complex linkers, padding counted); default :func:`esm_core.fold_batching.fold_token_budget` (1024 on a
    GPU as ESMFold's fold.py, one sequence per batch on a CPU).
    ``num_recycles``: None = the model's training default, max_recycles - 1 recycles after the first
    pass (what transformers runs for None); the number actually run is in every result's settings.
    """

    def __init__(
        self,
        loaded: LoadedFolder,
        num_recycles: int | None = None,
        chunk_size: str | int | None = "auto",
        max_tokens: int | None = None,
        pae: bool = False,
    ) -> None:
        if not (
            chunk_size is None or chunk_size == "auto" or (isinstance(chunk_size, int) and chunk_size > 0)
        ):
            raise ValueError(f"chunk_size must be 'auto', a positive int or None, got {chunk_size!r}")
        if num_recycles is not None and num_recycles < 0:
            raise ValueError("num_recycles must be >= 0")
        self.loaded = loaded
        max_recycles = loaded.model.config.esmfold_config.trunk.max_recycles
        self.num_recycles = max(max_recycles - 1, 0) if num_recycles is None else num_recycles
        self.chunk_size = chunk_size
        self.max_tokens = max_tokens or fold_token_budget(loaded.device)
        self.pae = pae
        self._budget = self.max_tokens  # lowered after a batch runs out of memory

    def fold(self, items: Sequence[tuple[str, str]]) -> Iterator[FoldResult]:
        """Fold every (key, sequence); chains of a complex separated by ':'.

        Results come longest first (batch order), not in input order: match them on ``key``.
        """
        queue = sort_longest_first([encode(key, sequence) for key, sequence in items])
        while queue:
            yield from self._fold_batch(take_batch(queue, self._budget), [])

    # -- back-off: split the batch, then smaller chunks, then the CPU -------------------------------
    def _fold_batch(self, batch: list[FoldInput], notes: list[str]) -> Iterator[FoldResult]:
        chunk = self._chunk_for(batch[0].tokens)
        predictions = self._try(batch, chunk, self.loaded.device)
        if predictions is not None:
            yield from self._results(batch, predictions, chunk, self.loaded.device, notes)
            return
        if len(batch) == 1:
            yield self._fold_alone(batch[0], chunk, list(notes))
            return
        half = (len(batch) + 1) // 2
        note = f"out of memory: batch of {len(batch)} split into {half}+{len(batch) - half}"
        logger.warning("%s (longest %s: %d tokens)", note, batch[0].key, batch[0].tokens)
        self._budget = max(1, min(self._budget, len(batch) * batch[0].tokens // 2))
        for part in (batch[:half], batch[half:]):
            yield from self._fold_batch(part, [*notes, note])

    def _fold_alone(self, item: FoldInput, chunk: int | None, notes: list[str]) -> FoldResult:
        device = self.loaded.device
        while (smaller := smaller_chunk_size(chunk, item.tokens)) is not None:
            notes.append(f"out of memory: chunk_size {chunk} -> {smaller}")
            logger.warning("%s: %s", item.key, notes[-1])
            chunk = smaller
            predictions = self._try([item], chunk, device)
            if predictions is not None:
                return self._results([item], predictions, chunk, device, notes)[0]
        cpu = torch.device("cpu")
        if device.type == "cpu":
            raise FoldOutOfMemoryError(f"{item.key}: out of memory folding {item.tokens} residues on cpu")
        notes.append(f"out of memory on {device}: folded on cpu")
        logger.warning("%s: %s", item.key, notes[-1])
        chunk = self._chunk_for(item.tokens)
        self._place(cpu)
        try:
            predictions = self._try([item], chunk, cpu)
        finally:
            self._place(device)
        if predictions is None:
            raise FoldOutOfMemoryError(
                f"{item.key}: out of memory folding {item.tokens} residues on {device} and cpu"
            )
        return self._results([item], predictions, chunk, cpu, notes)[0]

    def _place(self, device: torch.device) -> None:
        place_model(self.loaded.model, device)

    def _chunk_for(self, tokens: int) -> int | None:
        return auto_chunk_size(tokens) if self.chunk_size == "auto" else self.chunk_size

    def _try(
        self, batch: list[FoldInput], chunk: int | None, device: torch.device
    ) -> list[_Prediction] | None:
        """Predictions, or None on out-of-memory (handled outside ``except`` so the failed step's
        tensors, held by the traceback, are freed before retrying)."""
        try:
            return self._predict(batch, chunk, device)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        free_cached_memory(device)
        return None

    # -- one forward pass ----------------------------------------------------------------------
    @torch.no_grad()
    def _predict(self, batch: list[FoldInput], chunk: int | None, device: torch.device) -> list[_Prediction]:
        model = self.loaded.model
        model.trunk.set_chunk_size(chunk)
        input_ids, mask, position_ids = collate(batch, device)
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            num_recycles=self.num_recycles,
        )
        final_atom14 = out["positions"][-1]  # [B, T, 14, 3]
        positions = atom14_to_atom37(final_atom14, out)  # [B, T, 37, 3], zero where no atom
        atom_mask = out["atom37_atom_exists"].clone()
        # transformers gives unknown residues (X) no atoms at all; keep their CA (the backbone frame
        # origin) so the structure has one residue per sequence position.
        unknown = input_ids == residue_constants.unk_restype_index
        positions[..., CA_INDEX, :] = torch.where(
            unknown[..., None], final_atom14[..., 1, :], positions[..., CA_INDEX, :]
        )
        atom_mask[..., CA_INDEX] = torch.where(unknown, 1.0, atom_mask[..., CA_INDEX])
        predictions = []
        for row, item in enumerate(batch):
            keep = item.keep.to(device)
            tokens = item.tokens
            predictions.append(
                _Prediction(
                    positions=positions[row, :tokens][keep].float().cpu().numpy(),
                    atom_mask=atom_mask[row, :tokens][keep].float().cpu().numpy(),
                    plddt=residue_plddt(out["plddt"][row, :tokens], keep),
                    ptm=sequence_ptm(out["ptm_logits"][row, :tokens, :tokens], keep),
                    pae=sequence_pae(out["predicted_aligned_error"][row, :tokens, :tokens], keep)
                    if self.pae
                    else None,
                )
            )
        return predictions

    def _results(
        self,
        batch: list[FoldInput],
        predictions: list[_Prediction],
        chunk: int | None,
        device: torch.device,
        notes: list[str],
    ) -> list[FoldResult]:
        settings = {
            "num_recycles": self.num_recycles,
            "chunk_size": chunk,
            "device": str(device),
            "stem_dtype": str(stem_dtype(device)).removeprefix("torch."),
        }
        return [
            self._result(item, pred, settings, notes) for item, pred in zip(batch, predictions, strict=True)
        ]

    @staticmethod
    def _result(item: FoldInput, pred: _Prediction, settings: dict, notes: list[str]) -> FoldResult:
        structure = Structure(
            aatype=item.aatype[item.keep].numpy(),
            atom_positions=pred.positions,
            atom_mask=pred.atom_mask,
            residue_index=np.concatenate([np.arange(1, len(chain) + 1) for chain in item.chains]),
            chain_index=item.chain_index,
            plddt=pred.plddt,
        )
        return FoldResult(
            key=item.key,
            length=item.length,
            chains=list(CHAIN_IDS[: len(item.chains)]),
            mean_plddt=float(pred.plddt.mean()),
            ptm=pred.ptm,
            plddt=pred.plddt,
            pae=pred.pae,
            pdb=to_pdb_text(structure),
            cif=to_mmcif_text(structure, item.key),
            fallbacks=list(notes),
            settings=dict(settings),
        )
