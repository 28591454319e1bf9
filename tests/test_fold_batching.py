"""Folding input rules without a model: complex encoding as ESMFold does it, token budgets, chunk sizes."""

from __future__ import annotations

import pytest
import torch

from esm_core.fold_batching import (
    GPU_FOLD_TOKENS,
    LINKER,
    RESIDUE_INDEX_OFFSET,
    auto_chunk_size,
    encode,
    fold_token_budget,
    smaller_chunk_size,
    sort_longest_first,
    take_batch,
)
from storage.normalize import normalize_text


def test_complex_encoding_matches_esmfold_convention():
    item = encode("k", "MKV:WWWW")
    tokens = 3 + len(LINKER) + 4
    assert item.tokens == tokens and item.length == 7
    assert item.keep.tolist() == [True] * 3 + [False] * len(LINKER) + [True] * 4
    # position ids: running position, +512 for the second chain; the linker continues chain A
    assert item.residue_index.tolist() == list(range(3 + len(LINKER))) + [
        RESIDUE_INDEX_OFFSET + 3 + len(LINKER) + i for i in range(4)
    ]
    assert item.chain_index.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert set(item.aatype[3 : 3 + len(LINKER)].tolist()) == {7}  # glycine in restypes order


def test_sequence_normalisation_and_errors():
    assert encode("k", " mkv*\n").chains == ("MKV",)  # Prodigal stop and case
    assert encode("k", "mkv*:aa a*").chains == ("MKV", "AAA")  # per chain
    # ingest's rule drops exactly one terminal stop: "MKV**" is stored as nothing (internal stop), so
    # it does not fold as "MKV" either
    assert normalize_text("MKV**") == "MKV*"
    with pytest.raises(ValueError, match="Invalid character"):
        encode("k", "MKV**")
    with pytest.raises(ValueError, match="outside the protein alphabet"):
        encode("k", "MK\u20acV")
    assert encode("k", "MKUXB").aatype.tolist()[2:] == [20, 20, 20]  # non-standard -> X
    with pytest.raises(ValueError, match="empty"):
        encode("k", "MKV::AAA")
    with pytest.raises(ValueError, match="Invalid character"):
        encode("k", "MK1V")


def test_token_budget_counts_padding():
    queue = sort_longest_first([encode(str(n), "A" * n) for n in (10, 100, 40, 60, 90)])
    assert [item.tokens for item in queue] == [100, 90, 60, 40, 10]
    assert [item.key for item in take_batch(queue, 250)] == ["100", "90"]  # 3 * 100 > 250
    assert [item.key for item in take_batch(queue, 250)] == ["60", "40", "10"]
    assert not queue
    assert len(take_batch([encode("long", "A" * 300)], 100)) == 1  # over budget: alone


def test_default_budget_per_device():
    assert fold_token_budget(torch.device("cuda")) == GPU_FOLD_TOKENS == 1024
    queue = sort_longest_first([encode(str(n), "A" * n) for n in (1, 2, 3)])
    budget = fold_token_budget(torch.device("cpu"))
    assert [len(take_batch(queue, budget)) for _ in range(3)] == [1, 1, 1]  # CPU: one input per batch


def test_chunk_size_rules():
    assert [auto_chunk_size(n) for n in (100, 256, 257, 512, 1000, 2000)] == [None, None, 128, 128, 64, 32]
    assert smaller_chunk_size(None, 300) == 256
    assert smaller_chunk_size(128, 1000) == 64
    assert smaller_chunk_size(128, 50) == 32
    assert smaller_chunk_size(8, 1000) is None
