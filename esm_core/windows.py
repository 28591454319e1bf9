"""Sequences longer than the model's positions: overlapping windows, and stitching their outputs back.

Windows are ``max_residues`` long (1022 for ESM-2) with stride ``max_residues // 2`` (511): every residue
sits in one or two windows, and every residue has at least a quarter window of context on each side
except near the sequence ends. The last window is aligned to the sequence end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def plan_windows(length: int, window: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Half-open residue ranges [start, end) covering ``length``; a single range when it fits."""
    if length <= window:
        return [(0, length)]
    stride = stride or window // 2
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return [(s, s + window) for s in starts]


@dataclass(frozen=True)
class Piece:
    """A slice [start, end) of input ``item`` that fits in one forward pass."""

    item: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def cut_pieces(
    item: int, length: int, window: int, long_strategy: str, stride: int | None = None
) -> list[Piece]:
    """The slices one sequence runs as: whole when it fits the window, its first window (``truncate``), or
    overlapping windows (more than one piece: the caller stitches their outputs)."""
    if length <= window:
        return [Piece(item, 0, length)]
    if long_strategy == "truncate":
        return [Piece(item, 0, window)]
    return [Piece(item, start, end) for start, end in plan_windows(length, window, stride)]


class Stitcher:
    """Accumulates per-window outputs of one sequence; averages where windows overlap."""

    def __init__(self, length: int, n_windows: int):
        self.length = length
        self.remaining = n_windows
        self.counts = np.zeros(length, dtype=np.float32)
        self.sums: dict[int, np.ndarray] = {}
        self.bos: dict[int, list[np.ndarray]] = {}
        self.contact_sum: np.ndarray | None = None
        self.contact_count: np.ndarray | None = None

    def add(
        self,
        start: int,
        per_residue: dict[int, np.ndarray],
        bos: dict[int, np.ndarray],
        contacts: np.ndarray | None = None,
    ) -> None:
        """Add one window's per-residue vectors (per layer), BOS vectors and optional contact map."""
        end = start + next(iter(per_residue.values())).shape[0]
        self.counts[start:end] += 1
        for layer, values in per_residue.items():
            acc = self.sums.setdefault(layer, np.zeros((self.length, values.shape[1]), dtype=np.float32))
            acc[start:end] += values
        for layer, vector in bos.items():
            self.bos.setdefault(layer, []).append(vector)
        if contacts is not None:
            if self.contact_sum is None:
                self.contact_sum = np.zeros((self.length, self.length), dtype=np.float32)
                self.contact_count = np.zeros((self.length, self.length), dtype=np.float32)
            self.contact_sum[start:end, start:end] += contacts
            self.contact_count[start:end, start:end] += 1
        self.remaining -= 1

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def per_residue(self) -> dict[int, np.ndarray]:
        """(L, D) per layer: mean over the windows that cover each residue."""
        return {layer: acc / self.counts[:, None] for layer, acc in self.sums.items()}

    def bos_mean(self) -> dict[int, np.ndarray]:
        """BOS vector per layer: the mean of the windows' BOS vectors (no single BOS sees the whole sequence)."""
        return {layer: np.mean(vectors, axis=0).astype(np.float32) for layer, vectors in self.bos.items()}

    def contacts(self) -> np.ndarray | None:
        """(L, L) mean over windows holding both residues; NaN for pairs that share no window."""
        if self.contact_sum is None:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.contact_sum / self.contact_count).astype(np.float32)
