"""Registry of known ESM checkpoints: names, hub ids, sizes, and architectures that build real models."""

from __future__ import annotations

import pytest
from transformers import EsmConfig, EsmModel

from esm_core import registry

ESM2 = ["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D", "esm2_t30_150M_UR50D", "esm2_t33_650M_UR50D",
        "esm2_t36_3B_UR50D", "esm2_t48_15B_UR50D"]  # fmt: skip


def test_all_sizes_and_families_listed():
    names = [row["name"] for row in registry.model_table()]
    assert names == [*ESM2, "esm1b_t33_650M_UR50S", *(f"esm1v_t33_650M_UR90S_{i}" for i in range(1, 6))]
    for row in registry.model_table():
        assert row["hub_id"] == f"facebook/{row['name']}"
        assert f"_t{row['layers']}_" in row["name"]
    dims = {r["name"]: r["dim"] for r in registry.model_table()}
    assert [dims[n] for n in ESM2] == [320, 480, 640, 1280, 2560, 5120]


@pytest.mark.parametrize("name,low,high", [("esm2_t6_8M_UR50D", 7e6, 9e6), ("esm2_t33_650M_UR50D", 6.2e8, 6.8e8),
                                           ("esm2_t48_15B_UR50D", 1.4e10, 1.6e10),
                                           ("esm1b_t33_650M_UR50S", 6.2e8, 6.8e8)])  # fmt: skip
def test_parameter_counts_match_names(name, low, high):
    assert low < registry.MODELS[name].params < high


@pytest.mark.parametrize("arch", ["tiny_esm2", "tiny_esm1b", "esm2_t6_8M_UR50D"])
def test_architecture_builds_model_with_counted_parameters(arch):
    model = EsmModel(EsmConfig(**registry.architecture(arch)), add_pooling_layer=False)
    assert sum(p.numel() for p in model.parameters()) == registry.count_parameters(
        registry.architecture(arch)
    )


def test_resolve_and_lookup():
    assert registry.resolve("esm2_t6_8M_UR50D") == "facebook/esm2_t6_8M_UR50D"
    assert registry.resolve("someone/other_model") == "someone/other_model"
    assert registry.lookup("facebook/esm1b_t33_650M_UR50S").family == "esm1b"
    assert registry.lookup("nope") is None
    with pytest.raises(KeyError, match="unknown architecture"):
        registry.architecture("esm3")
