"""`fold` through the same flow, shard planning, actor pool, resume and fault handling as `embed`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from Bio.PDB import MMCIFParser, PDBParser
from conftest import ECOLI, MAG, run_cli, write_slice

from esm_core.folding import Folder, load_esmfold
from esm_core.random_esmfold import write_random_esmfold_checkpoint
from flows.pipeline import Job, fold_flow
from flows.pool import PoolOptions
from storage.catalog import query
from storage.normalize import normalize_text


@pytest.fixture(scope="module")
def fold_model(tmp_path_factory) -> Path:
    return write_random_esmfold_checkpoint(tmp_path_factory.mktemp("esmfold") / "tiny_esmfold", tiny=True)


@pytest.fixture(scope="module")
def fold_inputs(tmp_path_factory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("fold_inputs")
    ecoli = write_slice(ECOLI, tmp / "ecoli.fasta", start=11, count=5, step=53, max_length=110)
    mag = write_slice(MAG, tmp / "mag.faa", start=5, count=4, step=61, max_length=110)
    # one long record that --max-length must reject with a reason instead of folding
    long = tmp / "long.fasta"
    long.write_text(">too_long_for_this_run\n" + "MKV" * 60 + "\n")
    return [ecoli, mag, long]


def fold_job(store: Path, inputs: list[Path], model: Path, workers: int = 2) -> Job:
    return Job(
        kind="fold",
        store=str(store),
        inputs=[str(p) for p in inputs],
        model=str(model),
        max_length=150,
        engine_options={"num_recycles": 1, "chunk_size": "auto"},
        pool=PoolOptions(workers=workers, cpus_per_worker=1, gpus_per_worker=0),
        progress=False,
    )


def in_process(model: Path, inputs: list[Path]) -> dict[str, tuple[float, float]]:
    items = {}
    for path in inputs:
        for chunk in path.read_text().split(">")[1:]:
            seq = normalize_text("".join(chunk.splitlines()[1:]))
            if len(seq) <= 150:
                items[hashlib.md5(seq.encode()).hexdigest()] = seq
    folder = Folder(load_esmfold(str(model)), num_recycles=1)
    return {r.key: (r.mean_plddt, r.ptm, r.pdb) for r in folder.fold(sorted(items.items()))}


def test_fold_flow_equals_in_process_and_exports(
    prefect_harness, ray_cluster, fold_model, fold_inputs, tmp_path, monkeypatch
):
    monkeypatch.setenv("PROTEOFLOW_KILL_SHARD", "0")  # the actor holding shard 0 dies once: shard retried
    monkeypatch.setenv("PROTEOFLOW_FAULT_DIR", str(tmp_path / "faults"))
    store = tmp_path / "store"
    record = fold_flow(fold_job(store, fold_inputs, fold_model))
    assert record.status == "completed" and record.counts.replaced_workers >= 1
    want = in_process(fold_model, fold_inputs)
    rows = query(store, "SELECT seq_hash, mean_plddt, ptm, pdb, plddt FROM structures")[1]
    assert {h for h, *_ in rows} == set(want)
    for h, plddt, ptm, pdb, per_residue in rows:
        assert plddt == pytest.approx(want[h][0], abs=1e-3) and ptm == pytest.approx(want[h][1], abs=1e-4)
        assert 0 <= min(per_residue) and max(per_residue) <= 100
        coords = [line[30:54] for line in pdb.splitlines() if line.startswith("ATOM")]
        ref = [line[30:54] for line in want[h][2].splitlines() if line.startswith("ATOM")]
        assert np.allclose(
            np.array([c.split() for c in coords], float), np.array([c.split() for c in ref], float), atol=1e-3
        )
    assert query(store, "SELECT seq_id, rule FROM rejected WHERE rule = 'too_long'")[1] == [
        ("too_long_for_this_run", "too_long")
    ]
    joined = run_cli(
        "sql",
        "--store",
        str(store),
        "--format",
        "json",
        "SELECT m.seq_id, s.mean_plddt, s.ptm FROM structures s JOIN members m USING (seq_hash) "
        "WHERE s.ptm > 0.0",
    )
    assert joined.returncode == 0 and joined.stdout.count(b"seq_id") == len(want)

    # resume: the same run again computes nothing
    again = fold_flow(fold_job(store, fold_inputs, fold_model))
    assert again.run_id == record.run_id and again.counts.shards_computed == 0

    out = tmp_path / "pdb"
    result = run_cli("export-structures", "--store", str(store), "--out", str(out), "--min-plddt", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == f"wrote {len(want)} PDB file(s) to {out}"
    files = sorted(out.glob("*.pdb"))
    assert len(files) == len(want) and all("|" not in f.name for f in files)
    for path in files:
        chain = next(PDBParser(QUIET=True).get_structure(path.stem, path)[0].get_chains())
        assert len(list(chain.get_residues())) > 10
    cif_out = tmp_path / "cif"
    assert (
        run_cli(
            "export-structures",
            "--store",
            str(store),
            "--out",
            str(cif_out),
            "--format",
            "cif",
            "--min-plddt",
            "101",
        ).returncode
        == 0
    )
    assert not list(cif_out.glob("*.cif"))  # nothing passes pLDDT > 100
    assert (
        run_cli(
            "export-structures", "--store", str(store), "--out", str(cif_out), "--format", "cif"
        ).returncode
        == 0
    )
    as_json = run_cli(
        "export-structures", "--store", str(store), "--out", str(cif_out), "--format", "cif", "--json"
    )
    assert json.loads(as_json.stdout) == {"written": len(want), "out": str(cif_out), "fmt": "cif"}
    not_a_dir = run_cli("export-structures", "--store", str(store), "--out", str(files[0]))
    assert (
        not_a_dir.returncode == 2
        and not_a_dir.stderr.decode().count("\n") == 1
        and "is a file" in not_a_dir.stderr.decode()
    )
    first = sorted(cif_out.glob("*.cif"))[0]
    assert MMCIFParser(QUIET=True).get_structure("x", first) is not None
