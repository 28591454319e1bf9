"""Helpers for the ESM embedding tests: tiny random checkpoints written in the real formats, real E. coli
sequences from ../shared/data, and the reference outputs of transformers and fair-esm themselves."""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROTEOFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
ECOLI = SHARED_DATA / "ecoli_k12_UP000000625.fasta.gz"

# Short sequences with every non-standard letter ESM knows (X, U, B, Z, O) and mixed lengths.
ODD_SEQUENCES = [
    ("odd_all", "MKXUBZOLAGVSERTIDPKQNFYMHWC"),
    ("odd_short", "XUBZO"),
    ("odd_mid", "MSTNPKPQRKTKRNTNRRPQDVKFPGGXQIVGGVYLLPRRGPRLGVRATRKUSERSQPRGRRQPIPKAZBO"),
    ("one", "M"),
]


def ecoli_sequences(count: int, max_length: int = 1022, min_length: int = 1) -> list[tuple[str, str]]:
    """The first ``count`` E. coli proteins within the length bounds, as (accession, sequence); skips
    the test when the shared data is absent."""
    if not ECOLI.exists():
        pytest.skip(f"real data {ECOLI} not present (expected at ../shared/data beside the repo root)")
    picked: list[tuple[str, str]] = []
    header, chunks = None, []

    def take() -> None:
        seq = "".join(chunks).rstrip("*")
        if header is not None and min_length <= len(seq) <= max_length:
            picked.append((header.split("|")[1] if "|" in header else header.split()[0], seq))

    with gzip.open(ECOLI, "rt") as fh:
        for line in fh:
            if line.startswith(">"):
                take()
                if len(picked) >= count:
                    break
                header, chunks = line[1:].strip(), []
            else:
                chunks.append(line.strip())
        else:
            take()
    return picked[:count]


def fair_esm_reference(
    path: Path, sequences: list[tuple[str, str]], layers: list[int]
) -> dict[str, dict[int, np.ndarray]]:
    """Per-residue representations (incl. BOS at row 0) from fair-esm's own loader, alphabet and model,
    run as one padded batch."""
    import esm

    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    model.eval()
    _, _, tokens = alphabet.get_batch_converter()(sequences)
    with torch.no_grad():
        reps = model(tokens, repr_layers=layers)["representations"]
    return {
        key: {layer: reps[layer][i, : len(seq) + 1].numpy() for layer in layers}
        for i, (key, seq) in enumerate(sequences)
    }


def transformers_reference(
    model_dir: Path, sequences: list[tuple[str, str]]
) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, np.ndarray]]:
    """Hidden states (per layer, incl. BOS) and last_hidden_state of transformers' EsmModel +
    EsmTokenizer on the saved directory, one padded batch."""
    from transformers import EsmModel, EsmTokenizer

    tokenizer = EsmTokenizer.from_pretrained(model_dir)
    model = EsmModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    batch = tokenizer([s for _, s in sequences], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    hidden = {
        key: {layer: h[i, : len(seq) + 1].numpy() for layer, h in enumerate(out.hidden_states)}
        for i, (key, seq) in enumerate(sequences)
    }
    last = {key: out.last_hidden_state[i, : len(seq) + 1].numpy() for i, (key, seq) in enumerate(sequences)}
    return hidden, last


def residue_mean(rows: np.ndarray) -> np.ndarray:
    """Mean over residue rows of a (L+1, D) array whose row 0 is BOS."""
    return rows[1:].mean(axis=0)


def rewrite_safetensors(
    directory: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
) -> Path:
    """Rewrite ``directory``'s model.safetensors through ``change`` (rename, drop or reshape tensors), as a
    hand-edited or mismatched checkpoint would look on disk."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    save_file(change(load_file(path)), path, metadata={"format": "pt"})
    return path


def fake_hub_cache(cache: Path, repo_id: str, checkpoint: Path, commit: str = "0" * 40) -> Path:
    """Lay ``checkpoint``'s files out as huggingface_hub caches a download (blobs, a snapshot of symlinks,
    refs/main), so the hub path is exercised without a network. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for index, file in enumerate(sorted(f for f in checkpoint.iterdir() if f.is_file())):
        blob = repo / "blobs" / f"blob{index}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot
