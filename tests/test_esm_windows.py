"""Sequences beyond the model's 1,022 residues: overlapping windows stitched back to full length, or
truncation; sequences that fit are untouched by either strategy."""

from __future__ import annotations

import numpy as np
import pytest
from esm_fixtures import ecoli_sequences

from esm_core.checkpoints import load_esm
from esm_core.embedding import Embedder
from esm_core.random_weights import write_random_hf_checkpoint
from esm_core.windows import plan_windows


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_esm(str(write_random_hf_checkpoint(tmp_path_factory.mktemp("hf"), "tiny_esm2", seed=4)))


@pytest.fixture(scope="module")
def long_sequence():
    """3,000 real residues: E. coli proteins joined end to end."""
    joined = "".join(seq for _, seq in ecoli_sequences(40, max_length=1022))
    assert len(joined) >= 3000
    return joined[:3000]


def test_plan_windows():
    assert plan_windows(1022, 1022) == [(0, 1022)]
    spans = plan_windows(3000, 1022)
    assert spans == [(0, 1022), (511, 1533), (1022, 2044), (1533, 2555), (1978, 3000)]
    covered = np.zeros(3000, int)
    for s, e in spans:
        covered[s:e] += 1
    assert covered.min() >= 1 and covered.max() <= 3


def test_window_long_sequence(loaded, long_sequence):
    embedder = Embedder(loaded, layers=(-1,), poolings=("mean", "bos"), per_residue=True, precision="fp32")
    (result,) = embedder.embed([("long", long_sequence)])
    assert (result.strategy, result.length) == ("window", 3000)
    assert result.per_residue[2].shape == (3000, 32)
    assert result.pooled[(2, "mean")].shape == (32,) and np.isfinite(result.pooled[(2, "mean")]).all()
    np.testing.assert_allclose(result.pooled[(2, "mean")], result.per_residue[2].mean(0), atol=1e-6)
    # stitching: residues seen by one window equal that window alone; overlaps are the mean of two
    w = {s: next(embedder.embed([("w", long_sequence[s:e])])) for s, e in plan_windows(3000, 1022)[:2]}
    np.testing.assert_allclose(result.per_residue[2][:511], w[0].per_residue[2][:511], atol=1e-5)
    overlap = (w[0].per_residue[2][511:1022] + w[511].per_residue[2][:511]) / 2
    np.testing.assert_allclose(result.per_residue[2][511:1022], overlap, atol=1e-5)
    bos = np.mean([next(embedder.embed([("w", long_sequence[s:e])])).pooled[(2, "bos")]
                   for s, e in plan_windows(3000, 1022)], axis=0)  # fmt: skip
    np.testing.assert_allclose(result.pooled[(2, "bos")], bos, atol=1e-5)


def test_truncate_long_sequence(loaded, long_sequence):
    embedder = Embedder(loaded, per_residue=True, long_strategy="truncate", precision="fp32")
    (result,) = embedder.embed([("long", long_sequence)])
    (head,) = embedder.embed([("head", long_sequence[:1022])])
    assert (result.strategy, result.length) == ("truncate", 3000)
    assert result.per_residue[2].shape == (1022, 32)
    np.testing.assert_array_equal(result.pooled[(2, "mean")], head.pooled[(2, "mean")])


def test_fitting_sequences_unchanged_by_strategy(loaded, long_sequence):
    items = [("max", long_sequence[:1022]), ("mid", long_sequence[:500])]
    out = {}
    for strategy in ("window", "truncate"):
        embedder = Embedder(loaded, per_residue=True, long_strategy=strategy, precision="fp32")
        out[strategy] = {r.key: r for r in embedder.embed(items)}
    for key, seq in items:
        a, b = out["window"][key], out["truncate"][key]
        assert a.strategy == b.strategy == "full"
        assert a.per_residue[2].shape == (len(seq), 32)
        np.testing.assert_array_equal(a.per_residue[2], b.per_residue[2])
        np.testing.assert_array_equal(a.pooled[(2, "mean")], b.pooled[(2, "mean")])


def test_window_contacts(loaded, long_sequence):
    embedder = Embedder(loaded, contacts=True, precision="fp32")
    (result,) = embedder.embed([("long", long_sequence[:1600])])
    assert result.strategy == "window" and result.contacts.shape == (1600, 1600)
    assert np.isfinite(result.contacts[:1022, :1022]).all()
    assert np.isnan(result.contacts[0, 1599])  # no window holds both ends
