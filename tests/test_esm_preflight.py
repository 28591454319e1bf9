"""inspect_checkpoint: what a loader would load, told from config files alone (fast, one-line errors),
agreeing with the loaders on name and shape, and a fingerprint that changes exactly when the files do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import huggingface_hub.constants
import pytest
import torch
from esm_fixtures import ROOT, fake_hub_cache, rewrite_safetensors
from transformers import EsmConfig

from esm_core.checkpoints import load_esm
from esm_core.preflight import ESM_CONFIG_DEFAULTS, NotCachedError, inspect_checkpoint
from esm_core.random_esmfold import write_random_esmfold_checkpoint
from esm_core.random_weights import write_random_fair_esm_checkpoint, write_random_hf_checkpoint
from esm_core.sources import ModelNotFoundError


def _quick(spec: str, kind: str = "esm"):
    """inspect_checkpoint, asserting it takes well under a second (no weights read)."""
    started = time.perf_counter()
    try:
        return inspect_checkpoint(spec, kind)
    finally:
        assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("masked_lm", [True, False])
def test_hf_directory_matches_the_loader(tmp_path, masked_lm):
    path = write_random_hf_checkpoint(tmp_path / "my_esm", "tiny_esm1b", masked_lm=masked_lm)
    info = _quick(str(path))
    loaded = load_esm(str(path))
    assert (info.name, info.source, info.kind, info.is_folding) == (loaded.name, "hf_dir", "esm", False)
    assert (info.num_layers, info.dim) == (loaded.num_layers, loaded.dim) == (2, 32)
    assert info.random_weights and info.fingerprint == loaded.fingerprint


@pytest.mark.parametrize("arch,stem", [("tiny_esm2", "esm2_tiny"), ("tiny_esm1b", "esm1b_tiny")])
def test_fair_esm_file_matches_the_loader(tmp_path, arch, stem):
    path = write_random_fair_esm_checkpoint(tmp_path / f"{stem}.pt", arch)
    info = _quick(str(path))
    loaded = load_esm(str(path))
    assert (info.name, info.source, info.num_layers, info.dim) == (stem, "fair_esm", 2, 32)
    assert (info.num_layers, info.dim, info.name) == (loaded.num_layers, loaded.dim, loaded.name)
    assert info.random_weights and info.fingerprint == loaded.fingerprint


def test_fingerprint_is_stable_and_follows_the_weights(tmp_path):
    path = write_random_hf_checkpoint(tmp_path / "m", "tiny_esm2")
    first = _quick(str(path)).fingerprint
    assert _quick(str(path)).fingerprint == first
    time.sleep(0.05)  # file timestamps tick in jiffies on Linux: make the rewrite land on a later one
    rewrite_safetensors(path, lambda state: {k: v + 1 for k, v in state.items()})
    second = _quick(str(path)).fingerprint
    assert second != first
    assert load_esm(str(path)).fingerprint == second


def test_fingerprint_covers_the_contact_regression_file(tmp_path):
    path = write_random_fair_esm_checkpoint(tmp_path / "esm2_tiny.pt", "tiny_esm2")
    with_contacts = _quick(str(path)).fingerprint
    (tmp_path / "esm2_tiny-contact-regression.pt").unlink()
    assert _quick(str(path)).fingerprint != with_contacts


def test_sharded_checkpoint(tmp_path):
    path = write_random_hf_checkpoint(tmp_path / "big", "tiny_esm2", masked_lm=False)
    model = load_esm(str(path)).model
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    (sharded / "config.json").write_text((path / "config.json").read_text())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    info = _quick(str(sharded))
    assert info.num_layers == 2 and info.fingerprint == load_esm(str(sharded)).fingerprint
    shards[-1].unlink()
    with pytest.raises(ModelNotFoundError, match=f"weight shard {shards[-1].name} .* is missing"):
        _quick(str(sharded))


def test_esmfold_directory_recognised(tmp_path):
    path = write_random_esmfold_checkpoint(tmp_path / "tiny_fold")
    info = _quick(str(path), kind="esmfold")
    assert (info.name, info.source, info.is_folding, info.num_layers) == ("tiny_fold", "hf_dir", True, None)
    assert info.random_weights and len(info.fingerprint) == 16
    with pytest.raises(ModelNotFoundError, match="is an ESMFold checkpoint"):
        _quick(str(path), kind="esm")


def test_missing_and_wrong_checkpoints_fail_fast_in_one_line(tmp_path):
    esm_dir = write_random_hf_checkpoint(tmp_path / "esm", "tiny_esm2")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    (bert / "model.safetensors").write_bytes(b"")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((esm_dir / "config.json").read_text())
    cases = [
        (str(tmp_path / "absent"), "esm", "no such local file or directory"),
        (str(tmp_path / "absent.pt"), "esm", "no such local file or directory"),
        (str(bert), "esm", "not an ESM checkpoint"),
        (str(tmp_path), "esm", "has no config.json"),
        (str(no_weights), "esm", "no weights"),
        (str(esm_dir), "esmfold", "not an ESMFold checkpoint"),
        ("not a model id!", "esm", "not a local path, a known model name or a hub id"),
    ]
    for spec, kind, message in cases:
        with pytest.raises(ModelNotFoundError, match=message) as info:
            _quick(spec, kind)
        assert "\n" not in str(info.value), spec


def test_not_a_fair_esm_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelNotFoundError, match="not a fair-esm checkpoint"):
        _quick(str(path))
    with pytest.raises(ModelNotFoundError, match="ESMFold loads from a Hugging Face directory"):
        _quick(str(path), kind="esmfold")


def test_hub_id_from_the_cache_and_not_cached(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    with pytest.raises(NotCachedError, match="downloaded when first loaded"):  # online: no network touched
        _quick("proteoflow-test/tiny_esm2")
    checkpoint = write_random_hf_checkpoint(tmp_path / "saved", "tiny_esm2")
    snapshot = fake_hub_cache(cache, "proteoflow-test/tiny_esm2", checkpoint, commit="b" * 40)
    info = _quick("proteoflow-test/tiny_esm2")
    assert (info.name, info.source, info.location, info.num_layers) == ("tiny_esm2", "hub", str(snapshot), 2)
    assert info.fingerprint == load_esm("proteoflow-test/tiny_esm2").fingerprint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _quick("proteoflow-test/tiny_esm2").fingerprint == info.fingerprint  # cached: fine offline
    os.unlink(snapshot / "model.safetensors")  # an interrupted download is not a usable snapshot
    with pytest.raises(ModelNotFoundError, match="offline"):
        _quick("proteoflow-test/tiny_esm2")


def test_config_defaults_are_transformers_defaults():
    """A config.json may leave out what equals EsmConfig's defaults; the pre-flight must read the same."""
    config = EsmConfig()
    assert ESM_CONFIG_DEFAULTS == {key: getattr(config, key) for key in ESM_CONFIG_DEFAULTS}


def test_preflight_imports_no_torch(tmp_path):
    """The CLI inspects before starting anything: for a Hugging Face directory, neither torch nor
    transformers is imported (seconds of start-up)."""
    path = write_random_hf_checkpoint(tmp_path / "m", "tiny_esm2")
    code = (
        "import sys\n"
        "from esm_core.preflight import inspect_checkpoint\n"
        f"assert inspect_checkpoint({str(path)!r}).num_layers == 2\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
