"""Variant-effect scores against the references themselves: fair-esm's own model and loader (the loop of
its examples/variant-prediction/predict.py, one masked copy per forward pass) on ESM-2 and ESM-1v files,
transformers' EsmForMaskedLM / EsmcForMaskedLM on Hugging Face directories; batched passes equal one copy
per pass; multi-mutants, per-mutant errors, windows centred on each residue, the ESM-1v ensemble, and
checkpoints without an LM head refused."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from esm_fixtures import ecoli_sequences

from esm_core.checkpoints import CheckpointMismatchError, load_esm, load_esm_mlm
from esm_core.fair_esm import read_fair_esm_file
from esm_core.random_weights import write_random_fair_esm_checkpoint, write_random_hf_checkpoint
from esm_core.variants import (
    AMINO_ACIDS,
    MutantError,
    VariantScorer,
    centred_window,
    mutant_scores,
    parse_mutant,
    score_ensemble,
    score_mutant_sets,
    score_mutants,
)

pytestmark = pytest.mark.filterwarnings("ignore:Regression weights not found")
ATOL = 1e-4


@pytest.fixture(scope="module")
def protein() -> str:
    """A real E. coli protein, cut to 32 residues, with an X (non-standard residue) inside."""
    _, sequence = ecoli_sequences(1, max_length=1022, min_length=60)[0]
    return sequence[:20] + "X" + sequence[21:32]


def fair_esm_reference(path, sequence: str) -> tuple[np.ndarray, np.ndarray]:
    """(masked-marginals, wt-marginals) as fair-esm's predict.py computes them: fair-esm's loader, alphabet
    and model; residue i masked alone in its own forward pass; log-softmax over the vocabulary."""
    import esm

    with torch.serialization.safe_globals([argparse.Namespace]):
        model, fair_alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    model.eval()
    _, _, tokens = fair_alphabet.get_batch_converter()([("x", sequence)])
    columns = [fair_alphabet.get_idx(a) for a in AMINO_ACIDS]
    masked = np.zeros((len(sequence), 20))
    with torch.no_grad():
        unmasked = torch.log_softmax(model(tokens)["logits"], dim=-1)[0]
        for i in range(len(sequence)):
            copy = tokens.clone()
            copy[0, i + 1] = fair_alphabet.mask_idx
            logp = torch.log_softmax(model(copy)["logits"], dim=-1)[0, i + 1]
            masked[i] = (logp[columns] - logp[tokens[0, i + 1]]).numpy()
    wt = (unmasked[1:-1, columns] - unmasked[1:-1].gather(1, tokens[0, 1:-1, None])).numpy()
    return masked, wt


def transformers_reference(path, sequence: str, method: str, spans=None) -> np.ndarray:
    """The same loop with transformers' AutoModelForMaskedLM and AutoTokenizer on a saved directory;
    residue i is read in the window ``spans[i]`` (default: the whole sequence)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    out = np.zeros((len(sequence), 20))
    columns = tokenizer.convert_tokens_to_ids(list(AMINO_ACIDS))
    unmasked: dict[tuple[int, int], torch.Tensor] = {}  # wt-marginals: one pass per window
    for i in range(len(sequence)):
        start, end = spans[i] if spans else (0, len(sequence))
        ids = tokenizer(sequence[start:end], return_tensors="pt")["input_ids"]
        wt = ids[0, 1 + i - start].item()
        with torch.no_grad():
            if method == "masked-marginals":
                ids[0, 1 + i - start] = tokenizer.mask_token_id
                logp = torch.log_softmax(model(input_ids=ids).logits, dim=-1)[0]
            else:
                if (start, end) not in unmasked:
                    unmasked[(start, end)] = torch.log_softmax(model(input_ids=ids).logits, dim=-1)[0]
                logp = unmasked[(start, end)]
        out[i] = (logp[1 + i - start, columns] - logp[1 + i - start, wt]).numpy()
    return out


def scores(loaded, sequence: str, method: str, **kwargs) -> np.ndarray:
    result = next(VariantScorer(loaded, method, precision="fp32", **kwargs).score([("x", sequence)]))
    assert result.method == method and result.precision == "fp32" and result.scores.dtype == np.float32
    return result.scores


@pytest.mark.parametrize("arch,stem", [("tiny_esm2", "esm2_tiny"), ("tiny_esm1v", "esm1v_tiny")])
def test_matches_fair_esm(tmp_path, protein, arch, stem):
    # ESM-1v ships no contact regression (fair-esm's loader demands one for ESM-2 names)
    regression = arch == "tiny_esm2"
    path = write_random_fair_esm_checkpoint(
        tmp_path / f"{stem}.pt", arch, seed=5, contact_regression=regression
    )
    loaded = load_esm_mlm(str(path))
    assert (loaded.name, loaded.source, loaded.random_weights, loaded.max_residues) == (
        stem,
        "fair_esm",
        True,
        1022,
    )
    assert loaded.sha == load_esm(str(path)).sha  # the encoder checksum load_esm records
    torch.manual_seed(123)  # an absent contact head must not make the checksum depend on the RNG
    assert load_esm(str(path)).sha == loaded.sha and load_esm_mlm(str(path)).head_sha == loaded.head_sha
    masked_ref, wt_ref = fair_esm_reference(path, protein)
    assert np.ptp(masked_ref) > 0.05 and np.ptp(wt_ref) > 0.05  # scores that could tell a wrong model
    np.testing.assert_allclose(scores(loaded, protein, "masked-marginals"), masked_ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(scores(loaded, protein, "wt-marginals"), wt_ref, atol=ATOL, rtol=0)
    assert not np.allclose(masked_ref, wt_ref, atol=1e-3)  # the two methods differ


@pytest.mark.parametrize("arch", ["tiny_esm2", "tiny_esmc"])
def test_matches_transformers(tmp_path, protein, arch):
    path = write_random_hf_checkpoint(tmp_path / arch, arch, seed=6)
    loaded = load_esm_mlm(str(path))
    assert loaded.model_type == ("esmc" if arch == "tiny_esmc" else "esm")
    assert loaded.sha == load_esm(str(path)).sha
    for method in ("masked-marginals", "wt-marginals"):
        reference = transformers_reference(path, protein, method)
        assert np.ptp(reference) > 0.05
        np.testing.assert_allclose(scores(loaded, protein, method), reference, atol=ATOL, rtol=0)


def test_batched_equals_one_copy_per_pass(tmp_path):
    loaded = load_esm_mlm(str(write_random_hf_checkpoint(tmp_path / "m", "tiny_esm2", seed=7)))
    items = [(key, seq[:30]) for key, seq in ecoli_sequences(2, min_length=80)]
    items[1] = (items[1][0], items[1][1][:17])  # mixed lengths: padded batches
    passes = []
    hook = loaded.model.esm.register_forward_hook(lambda *_: passes.append(1))
    for method in ("masked-marginals", "wt-marginals"):
        passes.clear()
        batched = {r.key: r.scores for r in VariantScorer(loaded, method, precision="fp32").score(items)}
        batched_passes = len(passes)
        passes.clear()
        alone = {r.key: r.scores for r in VariantScorer(loaded, method, "fp32", max_tokens=1).score(items)}
        copies = sum(len(s) for _, s in items) if method == "masked-marginals" else len(items)
        assert len(passes) == copies and batched_passes < copies
        for key, _ in items:
            np.testing.assert_allclose(batched[key], alone[key], atol=1e-5, rtol=0)
    hook.remove()


def test_multi_mutants_sum_their_sites(tmp_path, protein):
    loaded = load_esm_mlm(str(write_random_hf_checkpoint(tmp_path / "m", "tiny_esm2", seed=8)))
    scorer = VariantScorer(loaded, precision="fp32")
    table = next(scorer.score([("p", protein)]))
    a, b = protein[24], protein[29]
    single = [f"{a}25G", f"{b}30T"]
    double = f"{a}25G:{b}30T"
    got = {m.mutant: m for m in mutant_scores(table, [*single, double])}
    assert all(m.error is None for m in got.values())
    assert got[single[0]].score == pytest.approx(table.scores[24, AMINO_ACIDS.index("G")], abs=1e-6)
    assert got[double].score == pytest.approx(got[single[0]].score + got[single[1]].score, abs=1e-5)
    assert parse_mutant(double, protein).sites[1].index == 29
    # --offset: the same residues numbered from 101
    shifted = mutant_scores(table, [f"{a}124G:{b}129T"], offset=100)[0]
    assert shifted.score == pytest.approx(got[double].score, abs=1e-6)
    # only the mutated residues are scored, with the same numbers
    passes = []
    hook = loaded.model.esm.register_forward_hook(lambda *_: passes.append(1))
    direct = {m.mutant: m.score for m in score_mutants(scorer, "p", protein, [*single, double])}
    assert len(passes) == 1  # two masked copies, one pass
    for label, score in direct.items():
        assert score == pytest.approx(got[label].score, abs=1e-5)
    # several sequences' mutants share passes
    other = protein[::-1]
    passes.clear()
    sets = score_mutant_sets(scorer, [("p", protein, [double]), ("q", other, [f"{other[0]}1W"])])
    hook.remove()
    assert len(passes) == 1 and set(sets) == {"p", "q"}
    assert sets["p"][0].score == pytest.approx(got[double].score, abs=1e-5)
    reversed_table = next(scorer.score([("q", other)]))
    assert sets["q"][0].score == pytest.approx(reversed_table.scores[0, AMINO_ACIDS.index("W")], abs=1e-5)
    rows = list(table.rows())
    assert len(rows) == 20 * len(protein) and rows[0][:3] == (1, protein[0], "A")
    assert [score for pos, wt, mt, score in rows if mt == wt] == [0.0] * sum(
        c in AMINO_ACIDS for c in protein
    )


def test_wild_type_mismatch_and_bad_mutants_are_reported(tmp_path, protein):
    loaded = load_esm_mlm(str(write_random_hf_checkpoint(tmp_path / "m", "tiny_esm2", seed=8)))
    wrong = "W" if protein[4] != "W" else "A"
    good = f"{protein[0]}1A"
    labels = [f"{wrong}5A", good, f"{protein[0]}1A:{wrong}5A", "A999G", "5A", f"{protein[0]}1B", ""]
    results = score_mutants(VariantScorer(loaded, precision="fp32"), "p", protein, labels)
    assert [r.mutant for r in results] == labels
    by_label = {r.mutant: r for r in results}
    assert by_label[good].error is None and by_label[good].score is not None
    for label in labels:
        if label != good:
            assert by_label[label].score is None and "\n" not in by_label[label].error
    mismatch = by_label[f"{wrong}5A"].error
    assert f"wild type {wrong} at position 5" in mismatch and f"has {protein[4]}" in mismatch
    assert "does not match" in by_label[f"{protein[0]}1A:{wrong}5A"].error
    assert "outside the sequence" in by_label["A999G"].error
    assert "not <wt><position><mt>" in by_label["5A"].error
    assert "20 standard" in by_label[f"{protein[0]}1B"].error
    with pytest.raises(MutantError, match="mutated twice"):
        parse_mutant(f"{protein[0]}1A:{protein[0]}1C", protein)


def test_windows_centred_on_each_residue(tmp_path, protein):
    path = write_random_hf_checkpoint(tmp_path / "m", "tiny_esm2", seed=9)
    loaded = load_esm_mlm(str(path))
    length, window = len(protein), 16
    spans = [centred_window(i, length, window) for i in range(length)]
    assert spans[0] == spans[8] == (0, 16) and spans[20] == (12, 28) and spans[-1] == (length - 16, length)
    assert spans[length - 8] == (length - 16, length) and spans[length - 9] == (length - 17, length - 1)
    assert all(end - start == window and start <= i < end for i, (start, end) in enumerate(spans))
    for method in ("masked-marginals", "wt-marginals"):
        result = next(VariantScorer(loaded, method, "fp32", window=window).score([("p", protein)]))
        assert result.strategy == "window"
        reference = transformers_reference(path, protein, method, spans)
        np.testing.assert_allclose(result.scores, reference, atol=ATOL, rtol=0)
    # the model's own window (1,022 residues) on a longer real protein, a few residues only
    key, long_protein = ecoli_sequences(1, max_length=5000, min_length=1030)[0]
    long_protein = long_protein[:1030]
    wanted = [0, 515, 1029]
    assert [centred_window(i, 1030, 1022) for i in wanted] == [(0, 1022), (4, 1026), (8, 1030)]
    result = next(VariantScorer(loaded, "wt-marginals", "fp32").score([(key, long_protein)], {key: wanted}))
    assert result.strategy == "window"
    assert np.isnan(result.scores[1]).all() and not np.isnan(result.scores[wanted]).any()
    spans = {i: centred_window(i, 1030, 1022) for i in wanted}
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    for i, (start, end) in spans.items():
        ids = torch.tensor([[0, *(t for t in _ids(long_protein[start:end])), 2]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits, dim=-1)[0, 1 + i - start]
        wt = ids[0, 1 + i - start]
        expected = (logp[_ids(AMINO_ACIDS)] - logp[wt]).numpy()
        np.testing.assert_allclose(result.scores[i], expected, atol=ATOL, rtol=0)


def _ids(text: str) -> list[int]:
    from esm_core import alphabet

    return alphabet.encode(text).tolist()


def test_esm1v_ensemble(tmp_path, protein):
    members = [
        write_random_fair_esm_checkpoint(tmp_path / f"esm1v_tiny_{i}.pt", "tiny_esm1v", seed=i)
        for i in (1, 2)
    ]
    short = protein[:24]
    [result] = score_ensemble([str(m) for m in members], [("p", short)], precision="fp32")
    assert result.members == ("esm1v_tiny_1", "esm1v_tiny_2") and result.random_weights
    singles = [scores(load_esm_mlm(str(m)), short, "masked-marginals") for m in members]
    np.testing.assert_allclose(result.member_scores, np.stack(singles), atol=1e-6, rtol=0)
    np.testing.assert_allclose(result.scores, (singles[0] + singles[1]) / 2, atol=1e-6, rtol=0)
    assert not np.allclose(singles[0], singles[1], atol=1e-3)
    [mutant] = mutant_scores(result, [f"{short[2]}3A"])
    column = AMINO_ACIDS.index("A")
    assert mutant.member_scores == pytest.approx([s[2, column] for s in singles], abs=1e-6)
    assert mutant.score == pytest.approx(np.mean([s[2, column] for s in singles]), abs=1e-6)


def test_checkpoints_without_lm_head_are_refused(tmp_path):
    plain = write_random_hf_checkpoint(tmp_path / "plain", "tiny_esm2", masked_lm=False)
    with pytest.raises(CheckpointMismatchError, match="has no masked-LM head") as info:
        load_esm_mlm(str(plain))
    assert "\n" not in str(info.value)
    path = write_random_fair_esm_checkpoint(tmp_path / "esm2_headless.pt", "tiny_esm2")
    data = read_fair_esm_file(path)
    data["model"] = {k: v.clone() for k, v in data["model"].items() if "lm_head.dense" not in k}
    torch.save(data, path)
    with pytest.raises(CheckpointMismatchError, match="has no masked-LM head"):
        load_esm_mlm(str(path))
    loaded = load_esm_mlm(str(write_random_hf_checkpoint(tmp_path / "m", "tiny_esm2")))
    with pytest.raises(ValueError, match="method 'pll'"):
        VariantScorer(loaded, "pll")
    with pytest.raises(ValueError, match="window 2000"):
        VariantScorer(loaded, window=2000)
