"""Precision choice per device, bf16 staying close to fp32, contact maps, and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from esm_fixtures import ODD_SEQUENCES, ecoli_sequences
from transformers import EsmTokenizer

from esm_core.checkpoints import load_esm
from esm_core.embedding import Embedder, compare_to_fp32
from esm_core.precision import cpu_has_fast_bf16, resolve_precision
from esm_core.random_weights import write_random_fair_esm_checkpoint, write_random_hf_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_random_hf_checkpoint(tmp_path_factory.mktemp("hf"), "tiny_esm2", seed=6)


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return load_esm(str(hf_dir))


def test_resolve_precision():
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", CPU)


def test_bf16_close_to_fp32_and_leaves_model_fp32(loaded):
    items = ODD_SEQUENCES + ecoli_sequences(10, max_length=500)
    embedder = Embedder(loaded, precision="bf16")
    assert next(embedder.model.parameters()).dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert {r.precision for r in embedder.embed(items)} == {"bf16"}
    similarity = compare_to_fp32(loaded, items, precision="bf16")
    assert similarity.shape == (len(items),) and similarity.min() > 0.99


def test_contacts_match_transformers(hf_dir, loaded):
    items = ODD_SEQUENCES[:3] + ecoli_sequences(3, max_length=200)
    results = {r.key: r for r in Embedder(loaded, contacts=True, precision="fp32").embed(items)}
    assert loaded.model.config._attn_implementation == "sdpa"  # eager only while contacts are computed
    reference = load_esm(str(hf_dir)).model
    reference.set_attn_implementation("eager")
    tokenizer = EsmTokenizer.from_pretrained(hf_dir)
    batch = tokenizer([s for _, s in items], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = reference.predict_contacts(batch["input_ids"], batch["attention_mask"]).numpy()
    for i, (key, seq) in enumerate(items):
        contacts = results[key].contacts
        assert contacts.shape == (len(seq), len(seq)) and contacts.dtype == np.float32
        np.testing.assert_allclose(contacts, expected[i, : len(seq), : len(seq)], atol=1e-5)


def test_argument_checks(tmp_path, loaded):
    with pytest.raises(ValueError, match="out of range"):
        Embedder(loaded, layers=(3,))
    with pytest.raises(ValueError, match="poolings"):
        Embedder(loaded, poolings=("max",))
    with pytest.raises(ValueError, match="long_strategy"):
        Embedder(loaded, long_strategy="chop")
    with pytest.raises(ValueError, match="empty sequence"):
        list(Embedder(loaded).embed([("e", "")]))
    no_head = write_random_fair_esm_checkpoint(
        tmp_path / "esm2_nohead.pt", "tiny_esm2", contact_regression=False
    )
    with pytest.raises(ValueError, match="no contact regression"):
        Embedder(load_esm(str(no_head)), contacts=True)
    assert Embedder(loaded, layers=(-3, 0, 2)).layers == (0, 2)
