"""Classification heads on ESM encoders: ``EsmForSequenceClassification`` / ``EsmForTokenClassification``
(and ESM C's ``EsmcFor...`` twins) from a hub id or a Hugging Face directory; per-sequence class
probabilities and per-residue labels named by the config's ``id2label``.

The outputs are transformers' own forward (``model(input_ids, attention_mask).logits``) on batches packed by
token budget, with the embedding engine's OOM ladder. Probabilities: softmax for single-label heads (and every
token head), sigmoid for ``problem_type="multi_label_classification"``; a regression head
(``problem_type="regression"`` or one label and no problem type) returns its raw values and no label.

Proteins longer than the model's window (``max_residues``): ``long_strategy="window"`` (default) runs the
embedding engine's overlapping windows (stride half a window, :func:`esm_core.windows.plan_windows`) and
averages the outputs where windows overlap: a token head's per-residue probabilities are exact per window
and averaged over the one or two windows covering each residue; a sequence head classifies each window from
its own <cls> token, so its probabilities are the windows' mean, an approximation (the head never saw the
whole protein). ``"truncate"`` classifies the first ``max_residues`` residues only.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import (
    EsmcForSequenceClassification,
    EsmcForTokenClassification,
    EsmForSequenceClassification,
    EsmForTokenClassification,
)

from esm_core import alphabet
from esm_core.batching import embed_token_budget, pack_batches, run_with_oom_fallback
from esm_core.checkpoints import load_hf_class, max_residues_of, read_model_config
from esm_core.device import pick_device
from esm_core.precision import cast_model, cpu_has_fast_bf16, resolve_precision
from esm_core.sources import ModelNotFoundError, loaded_fingerprint, resolve_source
from esm_core.weights import RANDOM_WEIGHTS_KEY, weights_checksum
from esm_core.windows import Piece, Stitcher, cut_pieces

# config "architectures" name -> (kind, class)
HEAD_CLASSES: dict[str, tuple[str, type[nn.Module]]] = {
    "EsmForSequenceClassification": ("sequence", EsmForSequenceClassification),
    "EsmForTokenClassification": ("token", EsmForTokenClassification),
    "EsmcForSequenceClassification": ("sequence", EsmcForSequenceClassification),
    "EsmcForTokenClassification": ("token", EsmcForTokenClassification),
}
LONG_STRATEGIES = ("window", "truncate")
PAD_MULTIPLE = 8
_MISSING_OK = re.compile(r"^(esm\.)?contact_head\.regression\.(weight|bias)$")
_UNEXPECTED_OK = re.compile(r"^(esm\.)?pooler\.")


@dataclass
class LoadedHead:
    """A classification model in eval mode (fp32) plus what the pipeline records about it. ``sha`` is the
    encoder's checksum (as :func:`esm_core.checkpoints.load_esm` takes it), ``head_sha`` the head's."""

    model: nn.Module
    name: str
    sha: str
    head_sha: str
    source: str  # "hub" | "hf_dir"
    kind: str  # "sequence" | "token"
    labels: tuple[str, ...]  # id2label, in id order
    problem_type: str  # "single_label_classification" | "multi_label_classification" | "regression"
    num_layers: int
    dim: int
    max_residues: int
    random_weights: bool
    device: torch.device
    fingerprint: str | None = None
    model_type: str = "esm"  # "esm" | "esmc"


@dataclass
class SequencePrediction:
    """One sequence's class probabilities (``probabilities[j]`` for ``labels[j]``; regression: the raw
    values) and the most probable label (None for regression)."""

    key: str
    length: int
    labels: tuple[str, ...]
    probabilities: np.ndarray  # (classes,) float32
    label: str | None
    strategy: str  # "full" | "window" | "truncate"
    precision: str = "fp32"
    fallbacks: list[str] = field(default_factory=list)


@dataclass
class ResiduePrediction:
    """Per-residue class probabilities ``(L, classes)`` and each residue's most probable label. Under
    "truncate" only the first ``max_residues`` residues are present."""

    key: str
    length: int
    labels: tuple[str, ...]
    probabilities: np.ndarray  # (L, classes) float32
    residue_labels: tuple[str, ...]
    strategy: str
    precision: str = "fp32"
    fallbacks: list[str] = field(default_factory=list)


class _Windows:
    """Outputs of one long sequence's windows: per-residue rows averaged where windows overlap (token
    heads, :class:`esm_core.windows.Stitcher`), or the windows' mean (sequence heads)."""

    def __init__(self, length: int, count: int, kind: str):
        self.kind = kind
        self.remaining = count
        self.stitcher = Stitcher(length, count)
        self.outputs: list[np.ndarray] = []
        self.fallbacks: list[str] = []

    def add(self, start: int, out: np.ndarray, fallbacks: list[str]) -> None:
        if self.kind == "token":
            self.stitcher.add(start, {0: out}, {})
        else:
            self.outputs.append(out)
        self.remaining -= 1
        self.fallbacks.extend(f for f in fallbacks if f not in self.fallbacks)

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def mean(self) -> np.ndarray:
        if self.kind == "token":
            return self.stitcher.per_residue()[0]
        return np.mean(self.outputs, axis=0)


def load_esm_head(spec: str, device: str | torch.device | None = None) -> LoadedHead:
    """Load a sequence- or token-classification checkpoint (hub id or Hugging Face directory) named by its
    config's ``architectures``. ModelNotFoundError (one line) for any other head class, a fair-esm file or
    a missing model; CheckpointMismatchError when the weights do not fit."""
    target = pick_device(str(device) if device is not None else None)
    source = resolve_source(spec)
    if source.kind == "fair_esm":
        raise ModelNotFoundError(
            f"model {spec!r} is a fair-esm file; classification heads load from a Hugging Face directory or hub id"
        )
    raw = read_model_config(source)
    architectures = raw.get("architectures") or []
    found = [HEAD_CLASSES[a] for a in architectures if a in HEAD_CLASSES]
    if not found:
        named = ", ".join(architectures) or "no architecture"
        raise ModelNotFoundError(
            f"model {spec!r} is not a classification checkpoint (config names {named}); "
            f"heads load: {', '.join(HEAD_CLASSES)}"
        )
    kind, model_class = found[0]
    model, missing = load_hf_class(source, model_class, raw, _MISSING_OK, _UNEXPECTED_OK)
    contact_head = getattr(model.base_model, "contact_head", None)
    if contact_head is not None and missing:
        with torch.no_grad():  # never used; zeroed so the checksum is the same at every load
            for parameter in contact_head.parameters():
                parameter.zero_()
    model = model.to(device=target, dtype=torch.float32).eval()
    config = model.config
    head = nn.ModuleDict({n: m for n, m in model.named_children() if m is not model.base_model})
    labels = tuple(str(config.id2label[i]) for i in range(config.num_labels))
    return LoadedHead(
        model=model,
        name=source.name,
        sha=weights_checksum(model.base_model),
        head_sha=weights_checksum(head),
        source=source.kind,
        kind=kind,
        labels=labels,
        problem_type=_problem_type(config, kind),
        num_layers=config.num_hidden_layers,
        dim=config.hidden_size,
        max_residues=max_residues_of(config),
        random_weights=bool(getattr(config, RANDOM_WEIGHTS_KEY, False)),
        device=target,
        fingerprint=loaded_fingerprint(source),
        model_type=config.model_type,
    )


def _problem_type(config, kind: str) -> str:
    """The config's problem type; unset: regression for one label, else single-label (token heads are
    always single-label: transformers trains them with cross-entropy)."""
    if kind == "token":
        return "single_label_classification"
    if config.problem_type:
        return config.problem_type
    return "regression" if config.num_labels == 1 else "single_label_classification"


class Classifier:
    """Predictions of a :class:`LoadedHead` for (key, sequence) pairs (see the module docstring)."""

    def __init__(
        self,
        loaded: LoadedHead,
        long_strategy: str = "window",
        precision: str = "auto",
        max_tokens: int | None = None,
    ):
        if long_strategy not in LONG_STRATEGIES:
            raise ValueError(f"long_strategy {long_strategy!r}: choose from {', '.join(LONG_STRATEGIES)}")
        self.loaded = loaded
        self.long_strategy = long_strategy
        self.device = loaded.device
        self.precision = resolve_precision(precision, self.device)
        self.model = cast_model(loaded.model, self.precision)
        element_bytes = torch.finfo(next(self.model.parameters()).dtype).bits // 8
        self.max_tokens = max_tokens or embed_token_budget(self.model.base_model, self.device, element_bytes)
        self.window = loaded.max_residues
        self._cpu_model: tuple[nn.Module, str] | None = None

    def predict(self, items: Sequence[tuple[str, str]]) -> Iterator[SequencePrediction | ResiduePrediction]:
        """Yield one prediction per (key, sequence), in batch order (not input order); sequences are
        normalised by ingest's rule first."""
        items = [(key, alphabet.normalise(sequence, key)) for key, sequence in items]
        pieces: list[Piece] = []
        windowed: dict[int, _Windows] = {}
        for index, (key, sequence) in enumerate(items):
            if not sequence:
                raise ValueError(f"empty sequence for key {key!r}")
            cut = cut_pieces(index, len(sequence), self.window, self.long_strategy)
            if len(cut) > 1:
                windowed[index] = _Windows(len(sequence), len(cut), self.loaded.kind)
            pieces.extend(cut)
        for batch in pack_batches([p.length for p in pieces], self.max_tokens):
            chunk = [pieces[i] for i in batch]
            for sub, (outs, precision), fallbacks in self._run(chunk, items):
                for piece, out in zip((chunk[i] for i in sub), outs, strict=True):
                    key, sequence = items[piece.item]
                    if piece.item not in windowed:
                        strategy = "full" if len(sequence) <= self.window else "truncate"
                        yield self._result(key, len(sequence), out, strategy, precision, fallbacks)
                        continue
                    merge = windowed[piece.item]
                    merge.add(piece.start, out, fallbacks)
                    if merge.done:
                        del windowed[piece.item]
                        yield self._result(
                            key, len(sequence), merge.mean(), "window", precision, merge.fallbacks
                        )

    def _result(
        self, key: str, length: int, out: np.ndarray, strategy: str, precision: str, fallbacks: list[str]
    ) -> SequencePrediction | ResiduePrediction:
        labels = self.loaded.labels
        out = np.ascontiguousarray(out, dtype=np.float32)
        if self.loaded.kind == "token":
            names = tuple(labels[i] for i in out.argmax(axis=1))
            return ResiduePrediction(key, length, labels, out, names, strategy, precision, list(fallbacks))
        label = None if self.loaded.problem_type == "regression" else labels[int(out.argmax())]
        return SequencePrediction(key, length, labels, out, label, strategy, precision, list(fallbacks))

    def _run(self, chunk: list[Piece], items: Sequence[tuple[str, str]]):
        sequences = [items[p.item][1][p.start : p.end] for p in chunk]

        def on_device(sub: list[int]) -> tuple[list[np.ndarray], str]:
            return self._forward([sequences[i] for i in sub], self.model), self.precision

        def on_cpu(sub: list[int]) -> tuple[list[np.ndarray], str]:
            model, precision = self._fallback_model()
            return self._forward([sequences[i] for i in sub], model), precision

        return run_with_oom_fallback(list(range(len(chunk))), on_device, on_cpu, self.device)

    def _fallback_model(self) -> tuple[nn.Module, str]:
        """A CPU copy (bf16 where the CPU has it) for single sequences that ran out of device memory."""
        if self.device.type == "cpu":
            return self.model, self.precision
        if self._cpu_model is None:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
            self._cpu_model = (cast_model(copy.deepcopy(self.loaded.model).to("cpu"), precision), precision)
        return self._cpu_model

    @torch.inference_mode()
    def _forward(self, sequences: list[str], model: nn.Module) -> list[np.ndarray]:
        """transformers' forward on one padded batch; per sequence the (classes,) or (L, classes) outputs."""
        device = next(model.parameters()).device
        tokens_np, lengths = alphabet.batch_tokens(sequences, PAD_MULTIPLE)
        tokens = torch.from_numpy(tokens_np).to(device)
        logits = model(input_ids=tokens, attention_mask=tokens.ne(alphabet.PAD).long()).logits.float()
        if self.loaded.problem_type == "multi_label_classification":
            values = torch.sigmoid(logits)
        elif self.loaded.problem_type == "regression":
            values = logits
        else:
            values = torch.softmax(logits, dim=-1)
        values = values.cpu().numpy()
        if self.loaded.kind == "sequence":
            return [values[row] for row in range(len(sequences))]
        return [values[row, 1 : length + 1] for row, length in enumerate(lengths.tolist())]
