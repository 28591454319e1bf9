"""Sequence normalization, validation and hashing: the rules that decide what enters the store.

A sequence is normalized by removing whitespace, upper-casing and dropping one terminal ``*``; it is
accepted when every residue is one of the 20 standard amino acids or X, B, Z, U, O. ``seq_hash`` is the
lowercase hex MD5 of the normalized sequence, the key every result in the store is filed under.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

ALPHABET = b"ACDEFGHIKLMNPQRSTVWYXBZUO"
WHITESPACE = b" \t\r\n\v\f"
_UPPER = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
GAP_CHARS = b"-."
DIGITS = b"0123456789"
NUCLEOTIDE_LETTERS = b"ACGTUN"


@dataclass(frozen=True)
class Rejection:
    """Why a record was refused: a short rule name (for grouping) and a sentence naming the culprit."""

    rule: str
    reason: str


def normalize_many(raws: list[bytes]) -> list[bytes]:
    """Normalize a block of raw sequences (whitespace removed, upper-cased, one terminal '*' dropped)."""
    seqs = [raw.translate(_UPPER, WHITESPACE) for raw in raws]
    return [s[:-1] if s[-1:] == b"*" else s for s in seqs]


def normalize(raw: bytes) -> bytes:
    """Normalize one raw sequence; see :func:`normalize_many`."""
    return normalize_many([raw])[0]


def find_rejections(
    seqs: list[bytes], min_length: int | None = None, max_length: int | None = None
) -> dict[int, Rejection]:
    """Indices of the normalized sequences in a block that break a rule, with why; the rest are accepted."""
    suspects = [i for i, s in enumerate(seqs) if not s or s.translate(None, ALPHABET)]
    if min_length is not None or max_length is not None:
        lo, hi = min_length or 0, max_length or float("inf")
        suspects += [i for i, s in enumerate(seqs) if not lo <= len(s) <= hi]
    found = {}
    for i in suspects:
        rejection = validate(seqs[i], min_length, max_length)
        if rejection is not None:
            found[i] = rejection
    return found


def validate(seq: bytes, min_length: int | None = None, max_length: int | None = None) -> Rejection | None:
    """Check a normalized sequence against the alphabet and length bounds; None means accepted."""
    if not seq:
        return Rejection("empty", "empty sequence")
    bad = seq.translate(None, ALPHABET)
    if bad:
        char = bad[:1]
        pos = seq.index(char) + 1
        shown = char.decode("latin-1")
        if char == b"*":
            return Rejection("internal_stop", f"internal stop '*' at position {pos}")
        if char in GAP_CHARS:
            return Rejection("gap", f"gap character '{shown}' at position {pos}")
        if char in DIGITS:
            return Rejection("digit", f"digit '{shown}' at position {pos}")
        if not 32 < char[0] < 127:
            shown = f"\\x{char[0]:02x}"
        return Rejection(
            "invalid_character", f"character '{shown}' outside the protein alphabet at position {pos}"
        )
    if min_length is not None and len(seq) < min_length:
        return Rejection("too_short", f"length {len(seq)} is below --min-length {min_length}")
    if max_length is not None and len(seq) > max_length:
        return Rejection("too_long", f"length {len(seq)} is above --max-length {max_length}")
    return None


def seq_hash(seq: bytes | str) -> str:
    """Lowercase hex MD5 of a normalized sequence: the store's content address."""
    if isinstance(seq, str):
        seq = seq.encode("ascii")
    return hashlib.md5(seq, usedforsecurity=False).hexdigest()


def normalize_text(seq: str) -> str:
    """Normalize a sequence given as text (API users, tests); same rules as :func:`normalize`."""
    return normalize(seq.encode("latin-1")).decode("latin-1")
