"""Token-budget packing and the out-of-memory ladder: an OOM injected at the first encoder block splits
the batch down to single sequences and then runs them on the CPU model, recording every step."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from esm_fixtures import ODD_SEQUENCES, ecoli_sequences

from esm_core.batching import CPU_MAX_TOKENS, embed_token_budget, pack_batches
from esm_core.checkpoints import load_esm
from esm_core.embedding import Embedder
from esm_core.random_weights import write_random_hf_checkpoint


def test_pack_batches_respects_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 1500) for _ in range(500)]
    batches = pack_batches(lengths, 4096)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for batch in batches:
        width = max(lengths[i] for i in batch) + 2
        assert len(batch) == 1 or len(batch) * width <= 4096
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    order = [lengths[i] for b in batches for i in b]
    assert order == sorted(order, reverse=True)  # longest first
    assert pack_batches([10, 20, 30], 10**6) == [[2, 1, 0]]
    assert pack_batches([], 100) == []


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_esm(str(write_random_hf_checkpoint(tmp_path_factory.mktemp("hf"), "tiny_esm2", seed=5)))


@pytest.fixture(scope="module")
def items():
    return ODD_SEQUENCES + ecoli_sequences(12, max_length=400)


def test_default_budget_on_cpu(loaded):
    assert embed_token_budget(loaded.model, torch.device("cpu")) == CPU_MAX_TOKENS
    assert Embedder(loaded).max_tokens == CPU_MAX_TOKENS
    assert 1026 <= Embedder(loaded, contacts=True).max_tokens <= CPU_MAX_TOKENS


def inject_oom(model, when):
    """Make the first encoder block raise a CUDA-style OOM whenever ``when(batch_size)`` holds."""
    block = model.encoder.layer[0]
    original = block.forward

    def forward(hidden_states, *args, **kwargs):
        if when(hidden_states.shape[0]):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(hidden_states, *args, **kwargs)

    block.forward = forward
    return lambda: setattr(block, "forward", original)


def test_oom_splits_batches(loaded, items):
    reference = {r.key: r for r in Embedder(loaded, precision="fp32").embed(items)}
    embedder = Embedder(loaded, precision="fp32")
    restore = inject_oom(embedder.model, lambda batch: batch > 2)
    try:
        results = {r.key: r for r in embedder.embed(items)}
    finally:
        restore()
    assert results.keys() == reference.keys()
    assert any(r.fallbacks for r in results.values())
    for key, result in results.items():
        np.testing.assert_allclose(result.pooled[(2, "mean")], reference[key].pooled[(2, "mean")], atol=1e-5)
        assert all("split" in note for note in result.fallbacks)
        assert "re-run on cpu" not in " ".join(result.fallbacks)


def test_oom_single_sequence_runs_on_cpu(loaded, items):
    embedder = Embedder(loaded, precision="fp32")
    cpu_copy = copy.deepcopy(loaded.model)  # stands in for the CPU copy a GPU run would build
    embedder._fallback_model = lambda: (cpu_copy, "fp32")
    restore = inject_oom(embedder.model, lambda batch: True)
    try:
        results = list(embedder.embed(items[:6]))
    finally:
        restore()
    assert len(results) == 6
    for result in results:
        assert result.fallbacks[-1] == "oom on cpu: single sequence re-run on cpu"
        assert np.isfinite(result.pooled[(2, "mean")]).all()
    assert any("split" in " ".join(r.fallbacks) for r in results)


def test_other_errors_propagate(loaded, items):
    embedder = Embedder(loaded, precision="fp32")
    block = embedder.model.encoder.layer[0]
    original = block.forward
    block.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            list(embedder.embed(items[:3]))
    finally:
        block.forward = original


def test_sequences_normalised_as_ingest_does(loaded):
    """Lower case, whitespace and one terminal stop: embedded exactly as the stored sequence would be."""
    raw = {"stored": "MKTAYIAKQR", "raw": " mktay\niakqr*"}
    results = {r.key: r for r in Embedder(loaded, precision="fp32").embed(list(raw.items()))}
    assert results["raw"].length == results["stored"].length == 10
    np.testing.assert_array_equal(results["raw"].pooled[(2, "mean")], results["stored"].pooled[(2, "mean")])
