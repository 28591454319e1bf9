"""load_esm from each source: HF directories (EsmForMaskedLM and EsmModel saves), a hub id read from the
HF cache, fair-esm ESM-2 and ESM-1b files (also read back by fair-esm's own loader), the random-weights
marker, silence while loading, one-line errors for missing models, and checkpoints whose weights do not
fit their architecture refused instead of run with random layers."""

from __future__ import annotations

import argparse
import warnings

import huggingface_hub.constants
import pytest
import torch
from esm_fixtures import fake_hub_cache, rewrite_safetensors

from esm_core.checkpoints import CheckpointMismatchError, ModelNotFoundError, load_esm
from esm_core.fair_esm import read_fair_esm_file
from esm_core.random_esmfold import write_random_esmfold_checkpoint
from esm_core.random_weights import write_random_fair_esm_checkpoint, write_random_hf_checkpoint
from esm_core.weights import RANDOM_WEIGHTS_KEY


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache: nothing is downloaded, the hub is never contacted."""
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("masked_lm", [True, False])
def test_hf_directory(tmp_path, masked_lm):
    path = write_random_hf_checkpoint(tmp_path / "my_esm", "tiny_esm2", masked_lm=masked_lm)
    loaded = load_esm(str(path))
    assert (loaded.name, loaded.source, loaded.random_weights) == ("my_esm", "hf_dir", True)
    assert (loaded.num_layers, loaded.dim, loaded.max_residues) == (2, 32, 1022)
    assert loaded.has_contact_head
    assert loaded.model.pooler is None and not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    again = load_esm(str(path))
    assert again.sha == loaded.sha and len(loaded.sha) == 16
    assert again.fingerprint == loaded.fingerprint and len(loaded.fingerprint) == 16


def test_loading_is_silent(tmp_path, capfd):
    """No RANDOM WEIGHTS notice (the caller prints it once), no warnings, no progress bars or load reports."""
    hf = write_random_hf_checkpoint(tmp_path / "m", "tiny_esm2")
    fair = write_random_fair_esm_checkpoint(tmp_path / "esm2_tiny.pt", "tiny_esm2")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_esm(str(hf)).random_weights and load_esm(str(fair)).random_weights
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert [str(w.message) for w in caught if "RANDOM" in str(w.message)] == []


def test_hub_id_read_from_the_cache(tmp_path, offline_cache):
    checkpoint = write_random_hf_checkpoint(tmp_path / "saved", "tiny_esm2", seed=2)
    snapshot = fake_hub_cache(offline_cache, "proteoflow-test/tiny_esm2", checkpoint, commit="a" * 40)
    loaded = load_esm("proteoflow-test/tiny_esm2")
    assert (loaded.name, loaded.source, loaded.num_layers) == ("tiny_esm2", "hub", 2)
    assert loaded.sha == load_esm(str(checkpoint)).sha  # the same weights, read through the cache
    assert loaded.fingerprint != load_esm(str(snapshot)).fingerprint  # the commit is part of the identity


@pytest.mark.parametrize("arch,stem", [("tiny_esm2", "esm2_tiny"), ("tiny_esm1b", "esm1b_tiny")])
def test_fair_esm_file(tmp_path, arch, stem):
    import esm

    path = write_random_fair_esm_checkpoint(tmp_path / f"{stem}.pt", arch, seed=3)
    raw = read_fair_esm_file(path)  # weights_only=True with only argparse.Namespace allowed
    assert raw[RANDOM_WEIGHTS_KEY] is True
    assert ("cfg" in raw) == (arch == "tiny_esm2") and ("args" in raw) == (arch == "tiny_esm1b")
    assert all(k.startswith("encoder.") for k in raw["model"])
    with torch.serialization.safe_globals([argparse.Namespace]):  # fair-esm's own loader reads our file
        fair_model, _ = esm.pretrained.load_model_and_alphabet_local(str(path))
    loaded = load_esm(str(path))
    assert (loaded.name, loaded.source, loaded.random_weights) == (stem, "fair_esm", True)
    assert loaded.max_residues == 1022 and loaded.has_contact_head
    expected_type = "rotary" if arch == "tiny_esm2" else "absolute"
    assert loaded.model.config.position_embedding_type == expected_type
    assert loaded.model.config.emb_layer_norm_before == (arch == "tiny_esm1b")
    n_fair = sum(p.numel() for n, p in fair_model.named_parameters() if not n.startswith("lm_head"))
    assert sum(p.numel() for p in loaded.model.parameters()) == n_fair


def test_fair_esm_without_contact_regression(tmp_path):
    path = write_random_fair_esm_checkpoint(
        tmp_path / "esm1v_tiny.pt", "tiny_esm1b", contact_regression=False
    )
    assert not load_esm(str(path)).has_contact_head


def test_hub_id_not_cached_and_offline(offline_cache):
    with pytest.raises(ModelNotFoundError) as info:
        load_esm("esm2_t6_8M_UR50D")
    message = str(info.value)
    assert "\n" not in message
    assert "'facebook/esm2_t6_8M_UR50D'" in message and "cache" in message and "hub" in message


def test_missing_local_file():
    with pytest.raises(ModelNotFoundError, match="no such local file"):
        load_esm("/nonexistent/esm2_t6_8M_UR50D.pt")


def test_wrong_kind_of_checkpoint_is_refused(tmp_path):
    folding = write_random_esmfold_checkpoint(tmp_path / "fold")
    with pytest.raises(ModelNotFoundError, match="is an ESMFold checkpoint"):
        load_esm(str(folding))
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a torch file")
    with pytest.raises(ModelNotFoundError, match="not a readable fair-esm checkpoint") as info:
        load_esm(str(not_a_checkpoint))
    assert "\n" not in str(info.value)


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("encoder.layer.1.", "encoder.block.1."): v for k, v in state.items()}


@pytest.mark.parametrize("masked_lm", [True, False])
def test_renamed_weights_are_refused(tmp_path, masked_lm):
    """transformers would load this with layer 1 at random init; it must not pass as pretrained."""
    path = write_random_hf_checkpoint(tmp_path / "renamed", "tiny_esm2", masked_lm=masked_lm)
    rewrite_safetensors(path, _renamed)
    with pytest.raises(CheckpointMismatchError) as info:
        load_esm(str(path))
    message = str(info.value)
    assert "\n" not in message and "'" + str(path) + "'" in message
    assert "missing: encoder.layer.1." in message and "encoder.block.1." in message
    assert "more" in message  # 16 keys per side, a few named
    assert isinstance(info.value, ModelNotFoundError)  # callers catching "no usable model" catch it too


def test_wrong_shape_is_refused(tmp_path):
    path = write_random_hf_checkpoint(tmp_path / "shape", "tiny_esm2")
    key = "esm.embeddings.word_embeddings.weight"
    rewrite_safetensors(path, lambda state: {**state, key: state[key][:, :16].contiguous()})
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape: embeddings.word_embeddings.weight"):
        load_esm(str(path))


def test_legitimately_absent_weights_load(tmp_path):
    """An EsmModel save with a pooler and without the contact head: both dropped, nothing refused."""
    path = write_random_hf_checkpoint(tmp_path / "plain", "tiny_esm2", masked_lm=False)
    pooler = {"pooler.dense.weight": torch.zeros(32, 32), "pooler.dense.bias": torch.zeros(32)}
    rewrite_safetensors(
        path, lambda state: {**{k: v for k, v in state.items() if "contact_head" not in k}, **pooler}
    )
    loaded = load_esm(str(path))
    assert not loaded.has_contact_head and loaded.model.pooler is None


def test_fair_esm_with_foreign_keys_is_refused(tmp_path):
    path = write_random_fair_esm_checkpoint(tmp_path / "esm2_odd.pt", "tiny_esm2", contact_regression=False)
    data = read_fair_esm_file(path)
    data["model"] = {
        k.replace("layers.1.fc1.", "layers.1.mlp_in."): v.clone() for k, v in data["model"].items()
    }
    torch.save(data, path)
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.mlp_in\.") as info:
        load_esm(str(path))
    assert "\n" not in str(info.value)
