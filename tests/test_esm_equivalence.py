"""Numerical equivalence at fp32 (1e-5 absolute) with the reference implementations, on checkpoints written
in their real formats and loaded through load_esm: transformers' EsmModel (HF directory) and fair-esm's
ESM2 / ProteinBertModel (fair-esm .pt), for X/U/B/Z/O sequences and real E. coli proteins batched together
with padding; last layer, an intermediate layer, the embedding layer and the BOS vector."""

from __future__ import annotations

import numpy as np
import pytest
from esm_fixtures import (
    ODD_SEQUENCES,
    ecoli_sequences,
    fair_esm_reference,
    residue_mean,
    transformers_reference,
)

from esm_core.checkpoints import load_esm
from esm_core.embedding import Embedder
from esm_core.random_weights import write_random_fair_esm_checkpoint, write_random_hf_checkpoint

# fair-esm: ESM-1v ships no contact regression
pytestmark = pytest.mark.filterwarnings("ignore:Regression weights not found")
ATOL = 1e-5


@pytest.fixture(scope="module")
def sequences():
    # mixed lengths in one padded batch: 1 .. ~300 residues
    return ODD_SEQUENCES + ecoli_sequences(8, max_length=300)


def embed_all(loaded, sequences, **kwargs):
    embedder = Embedder(loaded, precision="fp32", **kwargs)
    return embedder, {r.key: r for r in embedder.embed(sequences)}


def test_matches_transformers(tmp_path, sequences):
    path = write_random_hf_checkpoint(tmp_path / "hf", "tiny_esm2", seed=1)
    hidden, last = transformers_reference(path, sequences)
    loaded = load_esm(str(path))
    embedder, results = embed_all(
        loaded, sequences, layers=(-1, 1, 0), poolings=("mean", "bos"), per_residue=True
    )
    assert embedder.layers == (0, 1, 2)
    assert len({len(s) for _, s in sequences}) > 5
    for key, seq in sequences:
        got = results[key]
        assert got.strategy == "full" and got.length == len(seq) and got.precision == "fp32"
        np.testing.assert_allclose(got.pooled[(2, "mean")], residue_mean(last[key]), atol=ATOL, rtol=0)
        np.testing.assert_allclose(got.pooled[(2, "bos")], last[key][0], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got.per_residue[2], last[key][1:], atol=ATOL, rtol=0)
        for layer in (0, 1):
            np.testing.assert_allclose(
                got.pooled[(layer, "mean")], residue_mean(hidden[key][layer]), atol=ATOL, rtol=0
            )
            np.testing.assert_allclose(got.pooled[(layer, "bos")], hidden[key][layer][0], atol=ATOL, rtol=0)
        assert got.pooled[(2, "mean")].dtype == np.float32


@pytest.mark.parametrize(
    "arch,stem", [("tiny_esm2", "esm2_tiny"), ("tiny_esm1b", "esm1b_tiny"), ("tiny_esm1v", "esm1v_tiny")]
)
def test_matches_fair_esm(tmp_path, sequences, arch, stem):
    path = write_random_fair_esm_checkpoint(tmp_path / f"{stem}.pt", arch, seed=2)
    reference = fair_esm_reference(path, sequences, layers=[0, 1, 2])
    _, results = embed_all(load_esm(str(path)), sequences, layers=(-1, -2, 0), poolings=("mean", "bos"))
    for key, _ in sequences:
        for layer in (0, 1, 2):
            ref = reference[key][layer]
            np.testing.assert_allclose(
                results[key].pooled[(layer, "mean")], residue_mean(ref), atol=ATOL, rtol=0
            )
            np.testing.assert_allclose(results[key].pooled[(layer, "bos")], ref[0], atol=ATOL, rtol=0)


def test_batching_does_not_change_results(tmp_path, sequences):
    loaded = load_esm(str(write_random_hf_checkpoint(tmp_path / "hf", "tiny_esm2")))
    _, together = embed_all(loaded, sequences)
    _, alone = embed_all(loaded, sequences, max_tokens=1)  # every sequence in its own batch
    for key, _ in sequences:
        np.testing.assert_allclose(
            together[key].pooled[(2, "mean")], alone[key].pooled[(2, "mean")], atol=ATOL
        )


def test_only_requested_layers_run(tmp_path, sequences):
    loaded = load_esm(str(write_random_hf_checkpoint(tmp_path / "hf", "tiny_esm2")))
    calls = []
    hooks = [
        layer.register_forward_hook(lambda *_a, i=i: calls.append(i))
        for i, layer in enumerate(loaded.model.encoder.layer)
    ]
    norm_calls = []
    hooks.append(
        loaded.model.encoder.emb_layer_norm_after.register_forward_hook(lambda *_a: norm_calls.append(1))
    )
    embedder, results = embed_all(loaded, sequences[:3], layers=(1,))
    assert set(calls) == {0} and not norm_calls
    assert set(next(iter(results.values())).pooled) == {(1, "mean")}
    for hook in hooks:
        hook.remove()
