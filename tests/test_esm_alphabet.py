"""Tokenizer: ids identical to transformers' EsmTokenizer and fair-esm's alphabet, BOS/EOS/padding layout."""

from __future__ import annotations

import numpy as np
import pytest
from esm_fixtures import ODD_SEQUENCES, ecoli_sequences
from transformers import EsmTokenizer

from esm_core import alphabet


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return EsmTokenizer(str(alphabet.write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")))


def test_vocabulary_is_fair_esm_alphabet():
    import esm

    fair = esm.data.Alphabet.from_architecture("ESM-1b")
    assert alphabet.TOKENS == tuple(fair.all_toks)
    assert (alphabet.CLS, alphabet.PAD, alphabet.EOS, alphabet.UNK, alphabet.MASK) == (
        fair.cls_idx, fair.padding_idx, fair.eos_idx, fair.unk_idx, fair.mask_idx,
    )  # fmt: skip


def test_ids_match_esm_tokenizer(tokenizer):
    sequences = [s for _, s in ODD_SEQUENCES] + [s for _, s in ecoli_sequences(20)]
    for seq in sequences:
        expected = tokenizer(seq)["input_ids"]
        ours = [alphabet.CLS, *alphabet.encode(seq).tolist(), alphabet.EOS]
        assert ours == expected, seq


def test_unknown_characters_map_to_unk(tokenizer):
    assert alphabet.encode("MJ*é").tolist() == [20, alphabet.UNK, alphabet.UNK, alphabet.UNK]


def test_batch_layout_and_padding_multiple():
    tokens, lengths = alphabet.batch_tokens(["MKV", "A"], pad_multiple=8)
    assert tokens.shape == (2, 8) and lengths.tolist() == [3, 1]
    assert tokens[0, :5].tolist() == [0, 20, 15, 7, 2]
    assert tokens[1, :3].tolist() == [0, 5, 2]
    assert np.all(tokens[0, 5:] == alphabet.PAD) and np.all(tokens[1, 3:] == alphabet.PAD)


def test_equal_lengths_are_not_rounded_up():
    tokens, _ = alphabet.batch_tokens(["MKV", "AAA"], pad_multiple=8)
    assert tokens.shape == (2, 5) and not np.any(tokens == alphabet.PAD)
