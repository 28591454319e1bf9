"""ESM C through the same front door as ESM-2: registry names and hub ids, the pre-flight look, load_esm from
a directory and (offline) from the hub cache by short name, and the embedding engine on it: pooled and
per-residue embeddings equal transformers' EsmcModel at fp32, windows for a protein longer than its window,
bf16 close to fp32; no contact head; weights that do not fit refused."""

from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from esm_fixtures import ODD_SEQUENCES, ecoli_sequences, fake_hub_cache, residue_mean, rewrite_safetensors

from esm_core import registry
from esm_core.checkpoints import CheckpointMismatchError, load_esm, load_esm_mlm
from esm_core.embedding import Embedder, compare_to_fp32
from esm_core.preflight import inspect_checkpoint
from esm_core.random_weights import write_random_hf_checkpoint

ATOL = 1e-5


@pytest.fixture(scope="module")
def esmc_dir(tmp_path_factory):
    return write_random_hf_checkpoint(tmp_path_factory.mktemp("models") / "tiny_esmc", "tiny_esmc", seed=1)


@pytest.fixture(scope="module")
def sequences():
    return ODD_SEQUENCES + ecoli_sequences(6, max_length=300)


def esmc_reference(path, sequences):
    """Hidden states per layer (incl. BOS) and last_hidden_state of transformers' EsmcModel + its own
    tokenizer, one padded batch."""
    from transformers import AutoTokenizer, EsmcModel

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = EsmcModel.from_pretrained(path).eval()
    batch = tokenizer([s for _, s in sequences], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    hidden = {
        key: {layer: h[i, : len(seq) + 1].numpy() for layer, h in enumerate(out.hidden_states)}
        for i, (key, seq) in enumerate(sequences)
    }
    last = {key: out.last_hidden_state[i, : len(seq) + 1].numpy() for i, (key, seq) in enumerate(sequences)}
    return hidden, last


def test_registry_names():
    assert registry.resolve("esmc_300m") == "biohub/ESMC-300M"
    assert registry.resolve("esmc_600m") == "biohub/ESMC-600M"
    assert registry.lookup("biohub/ESMC-600M").family == "esmc"
    assert 3.0e8 < registry.ESMC_MODELS["esmc_300m"].params < 3.5e8
    assert 5.5e8 < registry.ESMC_MODELS["esmc_600m"].params < 6.0e8
    from transformers import EsmcConfig, EsmcModel

    arch = registry.architecture("tiny_esmc")
    model = EsmcModel(EsmcConfig(**arch))
    assert sum(p.numel() for p in model.parameters()) == registry.count_parameters(arch)
    names = [row["name"] for row in registry.model_table(include_esmc=True)]
    assert names[-2:] == ["esmc_300m", "esmc_600m"] and "esmc_300m" not in registry.MODELS


def test_preflight_and_load(esmc_dir):
    info = inspect_checkpoint(str(esmc_dir))
    assert (info.model_type, info.num_layers, info.dim, info.random_weights) == ("esmc", 2, 32, True)
    loaded = load_esm(str(esmc_dir))
    assert (loaded.name, loaded.source, loaded.model_type) == ("tiny_esmc", "hf_dir", "esmc")
    assert (loaded.num_layers, loaded.dim, loaded.max_residues) == (2, 32, 2046)
    assert loaded.random_weights and not loaded.has_contact_head and not loaded.model.training
    assert loaded.fingerprint == info.fingerprint
    assert load_esm(str(esmc_dir)).sha == loaded.sha == load_esm_mlm(str(esmc_dir)).sha
    with pytest.raises(ValueError, match="no contact regression"):
        Embedder(loaded, contacts=True)


def test_short_name_from_the_hub_cache(tmp_path, esmc_dir, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    fake_hub_cache(cache, "biohub/ESMC-300M", esmc_dir)
    info = inspect_checkpoint("esmc_300m")
    loaded = load_esm("esmc_300m")
    assert (info.name, info.source, loaded.name, loaded.source) == ("esmc_300m", "hub", "esmc_300m", "hub")
    assert loaded.sha == load_esm(str(esmc_dir)).sha


def test_embeddings_match_transformers(esmc_dir, sequences):
    hidden, last = esmc_reference(esmc_dir, sequences)
    embedder = Embedder(
        load_esm(str(esmc_dir)),
        layers=(-1, 1, 0),
        poolings=("mean", "bos"),
        per_residue=True,
        precision="fp32",
    )
    results = {r.key: r for r in embedder.embed(sequences)}
    assert len({len(s) for _, s in sequences}) > 5
    for key, seq in sequences:
        got = results[key]
        assert got.strategy == "full" and got.length == len(seq)
        np.testing.assert_allclose(got.pooled[(2, "mean")], residue_mean(last[key]), atol=ATOL, rtol=0)
        np.testing.assert_allclose(got.pooled[(2, "bos")], last[key][0], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got.per_residue[2], last[key][1:], atol=ATOL, rtol=0)
        for layer in (0, 1):
            np.testing.assert_allclose(
                got.pooled[(layer, "mean")], residue_mean(hidden[key][layer]), atol=ATOL, rtol=0
            )
            np.testing.assert_allclose(got.pooled[(layer, "bos")], hidden[key][layer][0], atol=ATOL, rtol=0)
    vectors = np.stack([results[k].pooled[(2, "mean")] for k, _ in sequences])
    assert np.ptp(vectors, axis=0).max() > 1e-2  # embeddings that depend on the sequence


def test_windows_and_precision(esmc_dir, sequences):
    key, protein = ecoli_sequences(1, max_length=10_000, min_length=2100)[0]
    protein = protein[:2100]  # window 2,046 residues: two windows, stride 1,023
    loaded = load_esm(str(esmc_dir))
    [got] = Embedder(loaded, per_residue=True, precision="fp32").embed([(key, protein)])
    assert got.strategy == "window" and got.per_residue[2].shape == (2100, 32)
    _, first = esmc_reference(esmc_dir, [(key, protein[:2046])])
    np.testing.assert_allclose(got.per_residue[2][:54], first[key][1:55], atol=ATOL, rtol=0)
    assert compare_to_fp32(loaded, sequences, "bf16").min() > 0.99


def test_mismatched_weights_refused(tmp_path):
    path = write_random_hf_checkpoint(tmp_path / "esmc", "tiny_esmc")
    rewrite_safetensors(
        path, lambda state: {k.replace("layers.1.", "blocks.1."): v for k, v in state.items()}
    )
    with pytest.raises(CheckpointMismatchError, match="missing: layers.1.") as info:
        load_esm(str(path))
    assert "\n" not in str(info.value)
