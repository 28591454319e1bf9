"""score-variants, predict and ESM C embeddings through the same flow as embed (real Prefect test harness, real
Ray actors), compared with esm_core run in process and with transformers' own forward; resume, a variants
CSV scored from the stored tables (an ensemble of two checkpoints, a multi-mutant, refused mutants as
rejected rows), the SQL a user asks of them, and checkpoints refused before anything starts."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ECOLI, run_cli, write_slice
from test_pipeline import sequences_of

from esm_core.checkpoints import load_esm, load_esm_mlm
from esm_core.embedding import Embedder
from esm_core.random_weights import write_random_head_checkpoint, write_random_hf_checkpoint
from esm_core.variants import VariantScorer
from flows import variants
from flows.engines import PredictOptions, VariantOptions
from flows.job import Job, PoolOptions
from flows.pipeline import FLOWS, embed_flow, predict_flow, score_variants_flow
from storage.catalog import query
from storage.check import check_store

pytestmark = pytest.mark.filterwarnings("ignore:Regression weights not found")
ATOL = 1e-5
CLASSES = ("cytoplasm", "membrane", "secreted")
STATES = ("helix", "strand", "coil")


@pytest.fixture(scope="module")
def proteins(tmp_path_factory) -> Path:
    """Four real E. coli proteins of 38 to 73 residues."""
    return write_slice(ECOLI, tmp_path_factory.mktemp("inputs") / "short.fasta", count=4, max_length=80)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Random checkpoints as transformers saves them: a second masked LM (an ESM-1v shape), sequence and
    token classification heads, and ESM C."""
    root = tmp_path_factory.mktemp("family-models")
    return {
        "esm1v": write_random_hf_checkpoint(root / "tiny_esm1v", arch="tiny_esm1v", seed=1),
        "sequence": write_random_head_checkpoint(root / "classes", head="sequence", labels=CLASSES, seed=2),
        "token": write_random_head_checkpoint(root / "states", head="token", labels=STATES, seed=3),
        "esmc": write_random_hf_checkpoint(root / "tiny_esmc", arch="tiny_esmc", seed=4),
    }


def job(store: Path, inputs: list[Path], model: Path, kind: str, options) -> Job:
    return Job(kind=kind, store=str(store), inputs=[str(p) for p in inputs], model=str(model),
               engine_options=options, pool=PoolOptions(workers=1, cpus_per_worker=1, gpus_per_worker=0),
               progress=False)  # fmt: skip


def ids_of(path: Path) -> list[tuple[str, str]]:
    """(seq_id, normalised sequence) per record, in file order."""
    found = []
    for chunk in path.read_text().split(">")[1:]:
        lines = chunk.splitlines()
        found.append((lines[0].split()[0], "".join(lines[1:]).rstrip("*").upper()))
    return found


def stored_scores(store: Path, run_id: str) -> dict[tuple, float]:
    rows = query(
        store, f"SELECT seq_hash, position, wt, mt, score FROM variant_scores WHERE run_id = '{run_id}'"
    )[1]
    return {(h, p, wt, mt): s for h, p, wt, mt, s in rows}


def in_process_scores(model: Path, seqs: dict[str, str], method: str, offset: int = 1) -> dict[tuple, float]:
    scorer = VariantScorer(load_esm_mlm(str(model)), method=method, precision="fp32")
    return {
        (r.key, p, wt, mt): s for r in scorer.score(list(seqs.items())) for p, wt, mt, s in r.rows(offset)
    }


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    assert max(abs(got[k] - want[k]) for k in want) < ATOL


def test_score_variants_equals_in_process_scorer_and_resumes(
    prefect_harness, ray_cluster, tiny_esm2, proteins, tmp_path
):
    store, seqs = tmp_path / "store", sequences_of([proteins])
    masked = VariantOptions(method="masked-marginals", precision="fp32")
    record = score_variants_flow(job(store, [proteins], tiny_esm2, "score-variants", masked))
    assert record.status == "completed" and record.counts.sequences == len(seqs)
    assert_same(stored_scores(store, record.run_id), in_process_scores(tiny_esm2, seqs, "masked-marginals"))
    # the same command again: nothing computed, nothing duplicated
    again = score_variants_flow(job(store, [proteins], tiny_esm2, "score-variants", masked))
    assert again.run_id == record.run_id and again.counts.shards_computed == 0 and again.counts.attempts == 2
    # another method is another table of each sequence, numbered from --offset
    wt = VariantOptions(method="wt-marginals", offset=5, precision="fp32")
    other = score_variants_flow(job(store, [proteins], tiny_esm2, "score-variants", wt))
    assert other.counts.sequences == len(seqs)
    assert_same(stored_scores(store, other.run_id), in_process_scores(tiny_esm2, seqs, "wt-marginals", 5))
    n, distinct = query(
        store, "SELECT count(*), count(DISTINCT (seq_hash, method, position, mt)) FROM variant_scores"
    )[1][0]
    assert n == distinct == 2 * 20 * sum(len(s) for s in seqs.values())
    report = check_store(store)
    assert report.sound, [f.line() for f in report.findings]


def test_variants_csv_ensemble_multi_mutant_and_rejections(
    prefect_harness, ray_cluster, tiny_esm2, models, proteins, tmp_path
):
    store = tmp_path / "store"
    (id0, s0), (id1, s1) = ids_of(proteins)[:2]
    other = {aa for aa in "ACDEFGHIKLMNPQRSTVWY"}
    single = f"{s0[2]}3{sorted(other - {s0[2]})[0]}"
    double = f"{s0[1]}2{sorted(other - {s0[1]})[-1]}:{s0[9]}10{sorted(other - {s0[9]})[3]}"
    wrong_wt = f"{sorted(other - {s1[4]})[0]}5A"
    outside = f"A{len(s1) + 1}G"
    rows = [(id0, single), (id1, wrong_wt), (id0, double), (id1, outside), ("sp|NOPE|NONE", "A1G")]
    table = tmp_path / "dms.csv"
    table.write_text("seq_id,mutant,DMS_score\n" + "".join(f"{i},{m},0.5\n" for i, m in rows))
    spec = f"{tiny_esm2},{models['esm1v']}"
    options = VariantOptions(method="masked-marginals", precision="fp32")
    jobs = [job(store, [proteins], Path(m), "score-variants", options) for m in spec.split(",")]
    runs: list = []

    def run(one: Job):
        runs.append(FLOWS[one.kind](one))
        return runs[-1]

    done = variants.score_variants(jobs, variants.read_variants_csv(str(table)), spec, run)
    # only the two proteins the CSV names were computed, by each checkpoint in a run of its own
    assert [r.counts.sequences for r in runs] == [2, 2] and runs[0].run_id != runs[1].run_id
    assert done.scored == 2 and done.rejected == 3
    got = query(
        store, "SELECT seq_id, mutant, score, member_scores, members, model, method FROM mutant_scores"
    )[1]
    names = [r.params["identity"]["model"] for r in runs]
    protein = f"SEMI JOIN (SELECT seq_hash FROM members WHERE seq_id = '{id0}') m USING (seq_hash)"
    assert [g[:2] for g in got] == [(id0, single), (id0, double)]
    assert all(g[4] == names and g[5] == "+".join(names) and g[6] == "masked-marginals" for g in got)
    # each member's score is the sum of its sites in that member's stored table; score is their mean
    for _, mutant, score, member_scores, _, _, _ in got:
        for name, member_score in zip(names, member_scores, strict=True):
            sites = " OR ".join(f"(position = {s[1:-1]} AND mt = '{s[-1]}')" for s in mutant.split(":"))
            sql = f"SELECT sum(score) FROM variant_scores v {protein} WHERE v.model = '{name}' AND ({sites})"
            assert member_score == pytest.approx(query(store, sql)[1][0][0], abs=ATOL)
        assert score == pytest.approx(np.mean(member_scores), abs=ATOL)
    assert len(mutant.split(":")) == 2
    rejected = query(store, f"SELECT seq_id, description, rule, reason FROM rejected WHERE run_id = '{done.run_id}' "
                            "ORDER BY record_index")[1]  # fmt: skip
    assert [(r[0], r[1], r[2]) for r in rejected] == [
        (id1, wrong_wt, "invalid_mutant"), (id1, outside, "invalid_mutant"), ("sp|NOPE|NONE", "A1G", "invalid_mutant")
    ]  # fmt: skip
    assert "does not match" in rejected[0][3] and "outside the sequence" in rejected[1][3]
    assert "not an accepted record" in rejected[2][3]
    assert all("\n" not in r[3] for r in rejected)
    # the ten most damaging substitutions of a protein, as a user asks (through the CLI): the ensemble mean
    # is a GROUP BY over the members' saturation tables
    sql = f"""
        SELECT v.position, v.wt, v.mt, avg(v.score) AS score, count(*) AS members
        FROM variant_scores v {protein}
        WHERE v.method = 'masked-marginals' AND v.model IN ('{names[0]}', '{names[1]}')
        GROUP BY ALL ORDER BY score, v.position, v.mt LIMIT 10"""
    result = run_cli("sql", "--store", str(store), "--format", "csv", sql)
    assert result.returncode == 0, result.stderr
    top = list(csv.DictReader(io.StringIO(result.stdout.decode())))
    every = query(store, f"SELECT position, mt, score FROM variant_scores v {protein}")[1]
    mean: dict[tuple, list] = {}
    for position, mt, score in every:
        mean.setdefault((position, mt), []).append(score)
    want = sorted((np.mean(v), p, mt) for (p, mt), v in mean.items())[:10]
    assert [(int(r["position"]), r["mt"]) for r in top] == [(p, mt) for _, p, mt in want]
    assert all(r["members"] == "2" and s0[int(r["position"]) - 1] == r["wt"] for r in top)
    report = check_store(store)
    assert report.sound, [f.line() for f in report.findings]


def transformers_outputs(path: Path, kind: str, seqs: dict[str, str]) -> dict[str, np.ndarray]:
    """transformers' own forward, one sequence at a time: softmax over the head's logits."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    auto = AutoModelForSequenceClassification if kind == "sequence" else AutoModelForTokenClassification
    tokenizer, model = AutoTokenizer.from_pretrained(path), auto.from_pretrained(path).eval()
    out = {}
    with torch.no_grad():
        for key, sequence in seqs.items():
            probabilities = torch.softmax(model(**tokenizer(sequence, return_tensors="pt")).logits, dim=-1)[0]
            out[key] = probabilities.numpy() if kind == "sequence" else probabilities[1:-1].numpy()
    return out


def test_predict_equals_transformers_forward(prefect_harness, ray_cluster, models, proteins, tmp_path):
    store, seqs = tmp_path / "store", sequences_of([proteins])
    options = PredictOptions(head="sequence", precision="fp32")
    record = predict_flow(job(store, [proteins], models["sequence"], "predict", options))
    assert record.status == "completed"
    want = transformers_outputs(models["sequence"], "sequence", seqs)
    rows = query(store, "SELECT seq_hash, label, probability FROM predictions")[1]
    assert len(rows) == len(seqs) * len(CLASSES)
    for seq_hash, label, probability in rows:
        assert probability == pytest.approx(want[seq_hash][CLASSES.index(label)], abs=ATOL)
    # a join with members: each record's most probable class
    best = query(store, """SELECT m.seq_id, arg_max(p.label, p.probability), sum(p.probability)
                           FROM predictions p JOIN members m USING (seq_hash) GROUP BY m.seq_id""")[1]  # fmt: skip
    by_id = {seq_id: seq_hash for seq_hash, (seq_id, _) in zip(seqs, ids_of(proteins), strict=True)}
    assert {b[0]: b[1] for b in best} == {i: CLASSES[int(np.argmax(want[h]))] for i, h in by_id.items()}
    assert all(b[2] == pytest.approx(1.0, abs=1e-5) for b in best)
    options = PredictOptions(head="token", precision="fp32")
    record = predict_flow(job(store, [proteins], models["token"], "predict", options))
    want = transformers_outputs(models["token"], "token", seqs)
    rows = query(store, "SELECT seq_hash, position, label, probability FROM residue_predictions")[1]
    assert len(rows) == sum(len(s) for s in seqs.values())
    for seq_hash, position, label, probability in rows:
        expected = want[seq_hash][position - 1]
        assert label == STATES[int(np.argmax(expected))] and probability == pytest.approx(
            expected.max(), abs=ATOL
        )
    report = check_store(store)
    assert report.sound, [f.line() for f in report.findings]


def test_esmc_embeddings_through_the_flow_equal_the_embedder(
    prefect_harness, ray_cluster, models, proteins, tmp_path
):
    store, seqs = tmp_path / "store", sequences_of([proteins])
    options = {"layers": [-1, 1], "poolings": ["mean", "bos"], "precision": "fp32"}
    record = embed_flow(job(store, [proteins], models["esmc"], "embed", options))
    assert record.status == "completed" and record.params["identity"]["random_weights"]
    rows = query(store, "SELECT seq_hash, layer, pooling, embedding FROM embeddings")[1]
    embedder = Embedder(
        load_esm(str(models["esmc"])), layers=[-1, 1], poolings=["mean", "bos"], precision="fp32"
    )
    want = {(r.key, layer, pooling): v for r in embedder.embed(list(seqs.items())) for (layer, pooling), v in r.pooled.items()}  # fmt: skip
    got = {(h, layer, pooling): np.asarray(v, np.float32) for h, layer, pooling, v in rows}
    assert set(got) == set(want)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < ATOL


def test_wrong_checkpoints_are_refused_before_anything_starts(tiny_esm2, models, proteins, tmp_path):
    store = tmp_path / "store"
    result = run_cli("predict", str(proteins), "--store", str(store), "--model", str(tiny_esm2))
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "not a sequence- or token-classification checkpoint" in lines[0] and "EsmForMaskedLM" in lines[0]
    result = run_cli("score-variants", str(proteins), "--store", str(store), "--model", str(models["token"]))
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "no masked-LM head" in lines[0], result.stderr
    assert not store.exists()


def test_models_lists_esmc_and_the_parser_knows_esm_cores_choices():
    from esm_core.heads import LONG_STRATEGIES
    from esm_core.variants import METHODS
    from flows import cli_family

    assert cli_family.METHODS == METHODS and cli_family.LONG_STRATEGIES == LONG_STRATEGIES
    result = run_cli("models", "--format", "json")
    assert result.returncode == 0
    assert {"esmc_300m", "esmc_600m", "esm1v_t33_650M_UR90S_1"} <= {
        r["name"] for r in json.loads(result.stdout)
    }
