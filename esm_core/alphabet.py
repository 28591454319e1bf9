"""ESM vocabulary and a vectorised tokenizer: one numpy table lookup per batch instead of per-character
Python work. Ids are those of fair-esm's ESM-1b/ESM-2 alphabet and transformers' EsmTokenizer. Sequences
are normalised by ingest's rule before they are tokenised, by the embedding and the folding engines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from storage.normalize import normalize_text

# Index = token id. Shared by ESM-1b, ESM-1v and every ESM-2 size.
TOKENS: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
)  # fmt: skip
CLS, PAD, EOS, UNK = 0, 1, 2, 3
MASK = TOKENS.index("<mask>")
VOCAB_SIZE = len(TOKENS)

_LOOKUP = np.full(256, UNK, dtype=np.int64)
for _id, _tok in enumerate(TOKENS):
    if len(_tok) == 1:
        _LOOKUP[ord(_tok)] = _id


def normalise(sequence: str, key: str = "") -> str:
    """``sequence`` normalised by ingest's rule (:func:`storage.normalize.normalize_text`: whitespace
    removed, upper case, one terminal stop '*' dropped), so a sequence is computed exactly as it is stored.
    ValueError (naming ``key``) for characters outside latin-1, which ingest would never store."""
    try:
        return normalize_text(sequence)
    except UnicodeEncodeError as exc:
        raise ValueError(f"{key!r}: character {sequence[exc.start]!r} outside the protein alphabet") from None


def encode(sequence: str) -> np.ndarray:
    """Residue token ids of one sequence (no BOS/EOS); any character outside the vocabulary maps to <unk>."""
    raw = np.frombuffer(sequence.encode("ascii", errors="replace"), dtype=np.uint8)
    return _LOOKUP[raw]


def batch_tokens(sequences: Sequence[str], pad_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token matrix (B, T) as <cls> residues <eos> <pad>..., and the residue count of each row.

    T is the longest sequence + 2, rounded up to ``pad_multiple`` when the batch needs padding anyway (mixed
    lengths); equal-length batches stay unpadded so attention can run without a mask (flash kernels).
    """
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    width = int(lengths.max(initial=0)) + 2
    if lengths.size and lengths.min() != lengths.max():
        width = -(-width // pad_multiple) * pad_multiple
    tokens = np.full((len(sequences), width), PAD, dtype=np.int64)
    tokens[:, 0] = CLS
    for row, seq in enumerate(sequences):
        tokens[row, 1 : 1 + len(seq)] = encode(seq)
    tokens[np.arange(len(sequences)), lengths + 1] = EOS
    return tokens, lengths


def write_vocab(path: str | Path) -> Path:
    """Write the vocabulary as EsmTokenizer's vocab.txt (one token a line, in id order)."""
    path = Path(path)
    path.write_text("\n".join(TOKENS) + "\n")
    return path
