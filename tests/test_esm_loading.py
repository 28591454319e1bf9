"""load_esm from each source: HF directories (EsmForMaskedLM and EsmModel saves), fair-esm ESM-2 and
ESM-1b files (also read back by fair-esm's own loader), the random-weights marker, and a clear error when
a hub id is neither cached nor reachable."""

from __future__ import annotations

import argparse

import huggingface_hub.constants
import pytest
import torch

from esm_core.checkpoints import ModelNotFoundError, load_esm, read_fair_esm_file
from esm_core.random_weights import write_random_fair_esm_checkpoint, write_random_hf_checkpoint
from esm_core.weights import RANDOM_WEIGHTS_KEY

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM WEIGHTS")


@pytest.mark.parametrize("masked_lm", [True, False])
def test_hf_directory(tmp_path, masked_lm):
    path = write_random_hf_checkpoint(tmp_path / "my_esm", "tiny_esm2", masked_lm=masked_lm)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        loaded = load_esm(str(path))
    assert (loaded.name, loaded.source, loaded.random_weights) == ("my_esm", "hf_dir", True)
    assert (loaded.num_layers, loaded.dim, loaded.max_residues) == (2, 32, 1022)
    assert loaded.has_contact_head
    assert loaded.model.pooler is None and not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    again = load_esm(str(path))
    assert again.sha == loaded.sha and len(loaded.sha) == 16


def test_notice_goes_to_stderr(tmp_path, capfd):
    load_esm(str(write_random_hf_checkpoint(tmp_path / "m", "tiny_esm2")))
    assert "RANDOM WEIGHTS" in capfd.readouterr().err


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


def test_hub_id_not_cached_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    with pytest.raises(ModelNotFoundError) as info:
        load_esm("esm2_t6_8M_UR50D")
    message = str(info.value)
    assert "\n" not in message
    assert "'facebook/esm2_t6_8M_UR50D'" in message and "cache" in message and "hub" in message


def test_missing_local_file():
    with pytest.raises(ModelNotFoundError, match="no such local file"):
        load_esm("/nonexistent/esm2_t6_8M_UR50D.pt")
