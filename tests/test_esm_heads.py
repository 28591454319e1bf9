"""Classification heads: sequence and token heads of ESM and ESM C, saved by transformers, loaded through
load_esm_head and compared with transformers' own Auto classes and tokenizers on a padded batch of real
E. coli proteins; multi-label and regression heads; windows for a protein longer than the model's window;
other head classes and fair-esm files refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from esm_fixtures import ODD_SEQUENCES, ecoli_sequences

from esm_core.heads import Classifier, ResiduePrediction, SequencePrediction, load_esm_head
from esm_core.random_weights import (
    write_random_fair_esm_checkpoint,
    write_random_head_checkpoint,
    write_random_hf_checkpoint,
)
from esm_core.sources import ModelNotFoundError
from esm_core.windows import plan_windows

ATOL = 1e-5
LABELS = ("helix", "strand", "coil")


def reference(path, kind: str, sequences: list[str]) -> list[np.ndarray]:
    """Logits of transformers' AutoModelFor{Sequence,Token}Classification + AutoTokenizer, one padded batch
    (token heads: the residue rows)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    auto = AutoModelForSequenceClassification if kind == "sequence" else AutoModelForTokenClassification
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = auto.from_pretrained(path).eval()
    batch = tokenizer(sequences, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    if kind == "sequence":
        return list(logits)
    return [logits[i, 1 : len(s) + 1] for i, s in enumerate(sequences)]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def items():
    return ODD_SEQUENCES[:3] + [(k, s[:120]) for k, s in ecoli_sequences(4, max_length=1022)]


@pytest.mark.parametrize("arch", ["tiny_esm2", "tiny_esmc"])
@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_matches_transformers(tmp_path, items, arch, kind):
    path = write_random_head_checkpoint(tmp_path / "head", arch, kind, labels=LABELS, seed=3)
    loaded = load_esm_head(str(path))
    assert (loaded.kind, loaded.labels, loaded.problem_type) == (kind, LABELS, "single_label_classification")
    assert loaded.random_weights and loaded.model_type == ("esmc" if arch == "tiny_esmc" else "esm")
    again = load_esm_head(str(path))
    assert (again.sha, again.head_sha) == (loaded.sha, loaded.head_sha) and loaded.sha != loaded.head_sha
    results = {r.key: r for r in Classifier(loaded, precision="fp32").predict(items)}
    expected = reference(path, kind, [s for _, s in items])
    for (key, seq), logits in zip(items, expected, strict=True):
        got = results[key]
        assert got.strategy == "full" and got.length == len(seq) and got.labels == LABELS
        np.testing.assert_allclose(got.probabilities, softmax(logits), atol=ATOL, rtol=0)
        if kind == "sequence":
            assert isinstance(got, SequencePrediction) and got.label == LABELS[int(logits.argmax())]
        else:
            assert isinstance(got, ResiduePrediction) and got.probabilities.shape == (len(seq), 3)
            assert got.residue_labels == tuple(LABELS[i] for i in logits.argmax(axis=1))
    rows = np.concatenate([np.atleast_2d(results[key].probabilities) for key, _ in items])
    assert np.ptp(rows, axis=0).max() > 1e-3  # the outputs depend on the input


def test_multi_label_and_regression_heads(tmp_path, items):
    multi = write_random_head_checkpoint(
        tmp_path / "multi", "tiny_esm2", "sequence", LABELS, problem_type="multi_label_classification"
    )
    loaded = load_esm_head(str(multi))
    assert loaded.problem_type == "multi_label_classification"
    expected = reference(multi, "sequence", [s for _, s in items])
    got = {r.key: r for r in Classifier(loaded, precision="fp32").predict(items)}
    for (key, _), logits in zip(items, expected, strict=True):
        np.testing.assert_allclose(got[key].probabilities, 1 / (1 + np.exp(-logits)), atol=ATOL, rtol=0)
    regression = write_random_head_checkpoint(tmp_path / "stability", "tiny_esm2", "sequence", ("stability",))
    loaded = load_esm_head(str(regression))
    assert loaded.problem_type == "regression"
    expected = reference(regression, "sequence", [s for _, s in items])
    got = {r.key: r for r in Classifier(loaded, precision="fp32").predict(items)}
    for (key, _), values in zip(items, expected, strict=True):
        assert got[key].label is None
        np.testing.assert_allclose(got[key].probabilities, values, atol=ATOL, rtol=0)


def test_long_protein_windows(tmp_path):
    key, protein = ecoli_sequences(1, max_length=5000, min_length=1100)[0]
    protein = protein[:1100]
    spans = plan_windows(1100, 1022)
    assert spans == [(0, 1022), (78, 1100)]
    token = write_random_head_checkpoint(tmp_path / "token", "tiny_esm2", "token", LABELS, seed=4)
    [got] = Classifier(load_esm_head(str(token)), precision="fp32").predict([(key, protein)])
    pieces = [softmax(x) for x in reference(token, "token", [protein[s:e] for s, e in spans])]
    expected = np.zeros((1100, 3))
    expected[:78], expected[1022:] = pieces[0][:78], pieces[1][-78:]
    expected[78:1022] = (pieces[0][78:] + pieces[1][:-78]) / 2
    assert got.strategy == "window" and got.probabilities.shape == (1100, 3)
    np.testing.assert_allclose(got.probabilities, expected, atol=ATOL, rtol=0)
    sequence = write_random_head_checkpoint(tmp_path / "seq", "tiny_esm2", "sequence", LABELS, seed=4)
    loaded = load_esm_head(str(sequence))
    [got] = Classifier(loaded, precision="fp32").predict([(key, protein)])
    windows = [softmax(x) for x in reference(sequence, "sequence", [protein[s:e] for s, e in spans])]
    np.testing.assert_allclose(got.probabilities, np.mean(windows, axis=0), atol=ATOL, rtol=0)
    [cut] = Classifier(loaded, long_strategy="truncate", precision="fp32").predict([(key, protein)])
    assert cut.strategy == "truncate"
    np.testing.assert_allclose(cut.probabilities, windows[0], atol=ATOL, rtol=0)


def test_other_checkpoints_are_refused(tmp_path):
    masked_lm = write_random_hf_checkpoint(tmp_path / "mlm", "tiny_esm2")
    with pytest.raises(ModelNotFoundError, match="not a classification checkpoint") as info:
        load_esm_head(str(masked_lm))
    message = str(info.value)
    assert "\n" not in message and "EsmForMaskedLM" in message and "EsmForTokenClassification" in message
    fair = write_random_fair_esm_checkpoint(tmp_path / "esm2_tiny.pt", "tiny_esm2")
    with pytest.raises(ModelNotFoundError, match="fair-esm file"):
        load_esm_head(str(fair))
    with pytest.raises(ModelNotFoundError, match="no such local file"):
        load_esm_head(str(tmp_path / "absent" / "x.pt"))
    loaded = load_esm_head(str(write_random_head_checkpoint(tmp_path / "h", "tiny_esm2", "token")))
    with pytest.raises(ValueError, match="long_strategy"):
        Classifier(loaded, long_strategy="stride")
