"""ESMFold engine on a tiny random-weight checkpoint (real transformers, no mocks except the injected
out-of-memory failures): loading, structure text, agreement with transformers' own ``infer``,
batched == one-at-a-time (the pTM bug), complexes, confidence ranges, back-off bookkeeping."""

from __future__ import annotations

import dataclasses
import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from Bio.PDB import MMCIFParser, PDBParser
from conftest import ECOLI as DATA  # honours PROTEOFLOW_SHARED_DATA like every test
from esm_fixtures import rewrite_safetensors
from transformers import EsmConfig, EsmForProteinFolding
from transformers.models.esm.openfold_utils import atom14_to_atom37, residue_constants

from esm_core import folding
from esm_core.folding import Folder, FoldOutOfMemoryError, ModelNotFoundError, load_esmfold
from esm_core.preflight import inspect_checkpoint
from esm_core.random_esmfold import random_esmfold_config, write_random_esmfold_checkpoint
from esm_core.sources import CheckpointMismatchError
from esm_core.weights import weights_checksum

STANDARD = set(residue_constants.restypes)
COORD_TOL = 1e-3 + 1e-4  # 1e-3 Angstrom, plus one unit in the last written decimal where values straddle it


def _read_fasta(path: Path) -> list[tuple[str, str]]:
    records, key, parts = [], None, []
    with gzip.open(path, "rt") as handle:
        for line in handle:
            if line.startswith(">"):
                if key is not None:
                    records.append((key, "".join(parts)))
                key, parts = line[1:].split()[0], []
            else:
                parts.append(line.strip())
    if key is not None:
        records.append((key, "".join(parts)))
    return records


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU OpenMP spin-waiting made this
    file 4x slower (40 s vs 9 s); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sequences() -> list[tuple[str, str]]:
    """The first six E. coli proteins of 40-100 standard residues with distinct lengths (file order)."""
    if not DATA.exists():
        pytest.skip(f"shared test data not found at {DATA} (expected ../shared/data beside the repo)")
    chosen: dict[int, tuple[str, str]] = {}
    for key, seq in _read_fasta(DATA):
        if 40 <= len(seq) <= 100 and set(seq) <= STANDARD and len(seq) not in chosen:
            chosen[len(seq)] = (key, seq)
        if len(chosen) == 6:
            break
    return list(chosen.values())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_esmfold_checkpoint(tmp_path_factory.mktemp("tiny_esmfold"), tiny=True, seed=0)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_esmfold(str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def batched(loaded, sequences):
    folder = Folder(loaded, pae=True, max_tokens=1024)  # all six in one padded batch
    return {r.key: r for r in folder.fold(sequences)}


@pytest.fixture(scope="module")
def single(loaded, sequences):
    folder = Folder(loaded, pae=True, max_tokens=1)  # every sequence alone
    return {r.key: r for r in folder.fold(sequences)}


def _pdb_structure(text: str):
    return PDBParser(QUIET=True).get_structure("s", io.StringIO(text))


def _cif_structure(text: str):
    return MMCIFParser(QUIET=True).get_structure("s", io.StringIO(text))


def _coords(structure) -> np.ndarray:
    return np.array([atom.coord for atom in structure.get_atoms()], dtype=np.float64)


# -- loading -----------------------------------------------------------------------------------
def test_load_random_checkpoint(checkpoint, capfd):
    capfd.readouterr()
    folder = load_esmfold(str(checkpoint), device="cpu")
    assert capfd.readouterr() == ("", "")  # no RANDOM WEIGHTS notice (the caller's), no progress bars
    assert folder.random_weights and folder.name == checkpoint.name
    assert folder.fingerprint == inspect_checkpoint(str(checkpoint), kind="esmfold").fingerprint
    assert folder.sha == weights_checksum(folder.model) and len(folder.sha) == 16
    assert not folder.model.training and folder.device == torch.device("cpu")
    assert {p.dtype for p in folder.model.esm.parameters()} == {torch.float32}  # fp32 stem on CPU
    assert {p.dtype for p in folder.model.trunk.parameters()} == {torch.float32}


def test_fp16_esm_checkpoint_loads_at_full_precision_on_cpu(tmp_path):
    """transformers halves the stem in __init__ when fp16_esm is set, before the weights load."""
    config = random_esmfold_config(tiny=True)
    config.esmfold_config.fp16_esm = True
    model = EsmForProteinFolding(config).float()
    torch.nn.init.normal_(model.esm.embeddings.word_embeddings.weight, std=1.0)
    model.save_pretrained(tmp_path)
    folder = load_esmfold(str(tmp_path), device="cpu")
    assert folder.model.esm.embeddings.word_embeddings.weight.dtype == torch.float32
    assert torch.equal(
        folder.model.esm.embeddings.word_embeddings.weight, model.esm.embeddings.word_embeddings.weight
    )
    assert folder.model.config.esmfold_config.fp16_esm  # the config still says what the checkpoint says


def test_missing_models_fail_with_one_line(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no such local file or directory"):
        load_esmfold(str(tmp_path / "absent"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network attempt: only the (empty) cache is tried
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="proteoflow-test/no-such-esmfold") as info:
        load_esmfold("proteoflow-test/no-such-esmfold")
    assert "\n" not in str(info.value)


def test_non_folding_checkpoint_is_rejected(tmp_path):
    EsmConfig(vocab_size=33, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelNotFoundError, match="not an ESMFold checkpoint"):
        load_esmfold(str(tmp_path))


def test_mismatched_weights_are_refused(checkpoint, tmp_path):
    """Renamed trunk keys would leave the trunk at random init under transformers; refused in one line."""
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    rewrite_safetensors(
        broken, lambda state: {k.replace("trunk.", "folding_trunk."): v for k, v in state.items()}
    )
    with pytest.raises(CheckpointMismatchError, match=r"missing: trunk\.") as info:
        load_esmfold(str(broken), device="cpu")
    assert "\n" not in str(info.value) and "unexpected: folding_trunk." in str(info.value)


def test_checkpoint_without_contact_head_loads(checkpoint, tmp_path):
    """The ESM-2 stem's contact head is unused by folding; a checkpoint may leave it out."""
    plain = shutil.copytree(checkpoint, tmp_path / "plain")
    rewrite_safetensors(plain, lambda state: {k: v for k, v in state.items() if "contact_head" not in k})
    assert load_esmfold(str(plain), device="cpu").name == "plain"


# -- structures ------------------------------------------------------------------------------
def _check_atoms(structure, sequence: str) -> None:
    residues = list(structure.get_residues())
    assert len(residues) == len(sequence)
    for residue, letter in zip(residues, sequence, strict=True):
        resname = residue_constants.restype_1to3.get(letter, "UNK")
        assert residue.get_resname() == resname
        expected = set(residue_constants.residue_atoms.get(resname, ["CA"]))  # unknown residues: CA only
        assert {atom.get_id() for atom in residue} == expected, (resname, residue.id)


def test_structures_parse_with_standard_heavy_atoms(batched, sequences):
    for key, seq in sequences:
        result = batched[key]
        for structure in (_pdb_structure(result.pdb), _cif_structure(result.cif)):
            assert [chain.id for chain in structure[0]] == ["A"]
            _check_atoms(structure, seq)
            bfactors = {res.id[1]: {a.get_bfactor() for a in res} for res in structure.get_residues()}
            assert [len(values) for values in bfactors.values()] == [1] * len(seq)  # per-residue B
            np.testing.assert_allclose([v.pop() for v in bfactors.values()], result.plddt, atol=0.006)
        assert np.allclose(_coords(_pdb_structure(result.pdb)), _coords(_cif_structure(result.cif)))


def test_unknown_residues_keep_a_ca(loaded, sequences):
    key, seq = sequences[0]
    mutated = seq[:10] + "X" + seq[11:20] + "U" + seq[21:]  # U (selenocysteine) folds as X
    (result,) = Folder(loaded, num_recycles=0).fold([(key, mutated)])
    assert result.length == len(seq)
    _check_atoms(_pdb_structure(result.pdb), mutated.replace("U", "X"))


def test_coordinates_match_transformers_infer(loaded, single, sequences):
    model = loaded.model
    for key, seq in sequences[:3]:
        output = model.infer(seq)
        positions = atom14_to_atom37(output["positions"][-1], output)[0].numpy()
        mask = output["atom37_atom_exists"][0].numpy() > 0.5
        ours = _coords(_pdb_structure(single[key].pdb))
        assert ours.shape == (mask.sum(), 3)
        assert np.abs(ours - positions[mask]).max() <= COORD_TOL  # same atom order (atom37)
        theirs = _pdb_structure(model.output_to_pdb(output)[0])
        assert np.abs(ours - _coords(theirs)).max() <= COORD_TOL
        # transformers writes per-atom pLDDT in 0-1 as B-factor; ours is the residue's CA value x 100
        their_ca_b = [res["CA"].get_bfactor() for res in theirs.get_residues()]
        assert max(their_ca_b) <= 1.0
        np.testing.assert_allclose(single[key].plddt, np.array(their_ca_b) * 100, atol=0.51)
        assert single[key].ptm == pytest.approx(float(output["ptm"]), abs=1e-5)  # batch of one: same


def test_batched_equals_one_at_a_time(loaded, batched, single, sequences):
    assert {len(r.fallbacks) for r in batched.values()} == {0}
    for key, _ in sequences:
        b, s = batched[key], single[key]
        assert np.abs(_coords(_pdb_structure(b.pdb)) - _coords(_pdb_structure(s.pdb))).max() <= COORD_TOL
        np.testing.assert_allclose(b.plddt, s.plddt, atol=1e-3)
        np.testing.assert_allclose(b.pae, s.pae, atol=1e-3)
        assert b.ptm == pytest.approx(s.ptm, abs=1e-5)
    # transformers' own batched pTM is a single scalar for the whole padded batch, equal to at most
    # one sequence's pTM: the reason proteoflow recomputes pTM per sequence.
    raw = loaded.model.infer([seq for _, seq in sequences])["ptm"]
    assert raw.ndim == 0
    per_sequence = np.array([single[key].ptm for key, _ in sequences])
    assert np.sum(np.isclose(per_sequence, float(raw), atol=1e-5)) <= 1
    assert len(set(np.round(per_sequence, 5))) > 1


def test_confidence_ranges(batched):
    for result in batched.values():
        assert result.plddt.dtype == np.float32 and result.plddt.shape == (result.length,)
        assert 0.0 <= result.plddt.min() and result.plddt.max() <= 100.0
        assert result.mean_plddt == pytest.approx(float(result.plddt.mean()), rel=1e-5)
        assert 0.0 < result.ptm < 1.0
        assert result.pae.shape == (result.length, result.length) and result.pae.min() >= 0
        assert result.settings == {
            "num_recycles": 1,
            "chunk_size": None,
            "device": "cpu",
            "stem_dtype": "float32",
        }


def test_fp16_stem_as_on_gpu(checkpoint, single, sequences, monkeypatch):
    """The GPU precision (fp16 ESM-2 stem, fp32 trunk), forced on the CPU: runs, recorded, close to fp32."""
    monkeypatch.setattr(folding, "stem_dtype", lambda device: torch.float16)
    loaded = load_esmfold(str(checkpoint), device="cpu")
    assert {p.dtype for p in loaded.model.esm.parameters()} == {torch.float16}
    assert {p.dtype for p in loaded.model.trunk.parameters()} == {torch.float32}
    key, seq = sequences[0]
    (result,) = Folder(loaded).fold([(key, seq)])
    assert result.settings["stem_dtype"] == "float16"
    np.testing.assert_allclose(result.plddt, single[key].plddt, atol=1.0)
    assert result.ptm == pytest.approx(single[key].ptm, abs=0.02)


def test_complex_has_two_chains_without_linker(loaded, sequences):
    (_, a), (_, b) = sequences[0], sequences[1]
    (result,) = Folder(loaded, num_recycles=0, pae=True).fold([("ab", f"{a}:{b}")])
    assert result.chains == ["A", "B"] and result.length == len(a) + len(b)
    assert result.plddt.shape == (len(a) + len(b),) and result.pae.shape == (len(a) + len(b),) * 2
    for structure in (_pdb_structure(result.pdb), _cif_structure(result.cif)):
        chains = {chain.id: list(chain.get_residues()) for chain in structure[0]}
        assert list(chains) == ["A", "B"]
        assert [len(chains["A"]), len(chains["B"])] == [len(a), len(b)]
        for chain_id, seq in (("A", a), ("B", b)):
            assert [res.id[1] for res in chains[chain_id]] == list(range(1, len(seq) + 1))
            names = "".join(residue_constants.restype_3to1[res.get_resname()] for res in chains[chain_id])
            assert names == seq  # no glycine linker residues anywhere


# -- out-of-memory back-off (injected failures) ---------------------------------------------------
def _inject_oom(monkeypatch, folder: Folder, fails) -> list[tuple[int, int | None, str]]:
    calls: list[tuple[int, int | None, str]] = []
    real = folder._predict

    def predict(batch, chunk, device):
        calls.append((len(batch), chunk, device.type))
        if fails(len(batch), chunk, device):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real(batch, chunk, device)

    monkeypatch.setattr(folder, "_predict", predict)
    return calls


def test_oom_splits_batch_then_shrinks_chunks(loaded, single, sequences, monkeypatch):
    folder = Folder(loaded, max_tokens=1024)
    items = sequences[3:]  # 83, 47 and 87 residues: one batch of three
    calls = _inject_oom(monkeypatch, folder, lambda n, chunk, _: n > 1 or chunk is None or chunk > 32)
    results = {r.key: r for r in folder.fold(items)}
    assert set(results) == {key for key, _ in items}
    longest = max(items, key=lambda kv: len(kv[1]))[0]
    assert results[longest].fallbacks == [
        "out of memory: batch of 3 split into 2+1",
        "out of memory: batch of 2 split into 1+1",
        "out of memory: chunk_size None -> 64",
        "out of memory: chunk_size 64 -> 32",
    ]
    assert all(r.settings["chunk_size"] == 32 for r in results.values())
    assert calls[0] == (3, None, "cpu")
    assert folder._budget < folder.max_tokens  # later batches start smaller
    for key, result in results.items():  # chunking changes memory, not results
        np.testing.assert_allclose(result.plddt, single[key].plddt, atol=1e-3)
        assert result.ptm == pytest.approx(single[key].ptm, abs=1e-5)


def test_oom_falls_back_to_cpu_then_gives_up(loaded, sequences, monkeypatch):
    folder = Folder(loaded, num_recycles=0)
    # pretend the model lives on an accelerator: every attempt there fails, the CPU one runs for real
    folder.loaded = dataclasses.replace(loaded, device=torch.device("meta"))
    placed: list[str] = []
    monkeypatch.setattr(folder, "_place", lambda device: placed.append(device.type))
    _inject_oom(monkeypatch, folder, lambda n, chunk, device: device.type != "cpu")
    (result,) = folder.fold(sequences[:1])
    assert result.fallbacks[-1] == "out of memory on meta: folded on cpu"
    assert result.fallbacks[0].startswith("out of memory: chunk_size None -> ")
    assert placed == ["cpu", "meta"] and result.settings["device"] == "cpu"

    folder = Folder(loaded, num_recycles=0)
    _inject_oom(monkeypatch, folder, lambda *_: True)
    with pytest.raises(FoldOutOfMemoryError, match=sequences[0][0].replace("|", r"\|")):
        list(folder.fold(sequences[:1]))
