"""Variant-effect scores from a masked language model (ESM-1v, ESM-2, ESM C), as in fair-esm's
``examples/variant-prediction/predict.py`` and ProteinGym.

Two scoring methods, both log-probability ratios at a residue i, score(mt) = log p_i(mt) - log p_i(wt):

- ``masked-marginals``: residue i is replaced by <mask> and p_i read at i; one pass per scored residue.
- ``wt-marginals``: p_i read from one unmasked pass over the wild type; one pass per sequence (window).

Saturation mutagenesis fills an (L, 20) table, columns in :data:`AMINO_ACIDS` order. A multi-mutant
(``A25G:C30T``) scores the sum of its sites' entries (fair-esm's additive rule).

Passes are batched: the masked copies of a sequence (and of other sequences) share forward passes under a
token budget (:mod:`esm_core.batching`), with the same OOM ladder as embeddings (split the batch, then one
copy on CPU). The LM head runs only at the residues read, not at every position.

Proteins longer than the model's window (``max_residues``, 1,022 for ESM-2/ESM-1v) are scored, as
ProteinGym does, in a window of the model's size centred on the residue, clipped at the sequence ends
(:func:`centred_window`); under wt-marginals residues that share a clipped window share its pass.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from esm_core import alphabet
from esm_core.batching import embed_token_budget, pack_batches, run_with_oom_fallback
from esm_core.checkpoints import LoadedMaskedLm, load_esm_mlm
from esm_core.precision import cast_model, cpu_has_fast_bf16, resolve_precision

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # the 20 standard residues: columns of every score table
METHODS = ("masked-marginals", "wt-marginals")
PAD_MULTIPLE = 8  # as esm_core.embedding: rows of mixed-length batches padded to a multiple of 8
_AA_IDS = alphabet.encode(AMINO_ACIDS)
_SITE = re.compile(r"^([A-Za-z])(-?\d+)([A-Za-z])$")


class MutantError(ValueError):
    """A mutant that cannot be scored against its sequence (bad syntax, position outside the sequence,
    wild-type letter that does not match, non-standard target); the message is one line."""


@dataclass(frozen=True)
class Substitution:
    """One site of a mutant: 0-based residue ``index``, wild-type and mutant letters."""

    index: int
    wt: str
    mt: str


@dataclass(frozen=True)
class Mutant:
    """A parsed mutant label (``"A25G"`` or ``"A25G:C30T"``) checked against its sequence."""

    label: str
    sites: tuple[Substitution, ...]


@dataclass
class VariantScores:
    """Saturation scores of one sequence: ``scores[i, j]`` = log p_i(AMINO_ACIDS[j]) - log p_i(wt_i),
    float32, NaN at residues not scored (see ``positions`` of :meth:`VariantScorer.score`). The wild-type
    column of a standard residue is 0."""

    key: str
    sequence: str
    method: str  # "masked-marginals" | "wt-marginals"
    scores: np.ndarray  # (L, 20)
    strategy: str  # "full" | "window" (longer than the model's window: windows centred per residue)
    precision: str = "fp32"
    fallbacks: list[str] = field(default_factory=list)
    alphabet: str = AMINO_ACIDS

    def score(self, mutant: Mutant) -> float:
        """The sum of ``mutant``'s site scores; MutantError when a site's residue was not scored."""
        return float(_site_sum(self.scores, mutant))

    def rows(self, offset: int = 1) -> Iterator[tuple[int, str, str, float]]:
        """(position numbered from ``offset``, wt, mt, score) for every scored residue x 20, in order."""
        for index, wt in enumerate(self.sequence):
            row = self.scores[index]
            if np.isnan(row).all():
                continue
            for column, mt in enumerate(self.alphabet):
                yield index + offset, wt, mt, float(row[column])


@dataclass
class EnsembleScores:
    """Scores of one sequence from several checkpoints (the ESM-1v ensemble): each member's table and,
    as ``scores``, their mean."""

    key: str
    sequence: str
    method: str
    members: tuple[str, ...]  # checkpoint names, in the order given
    member_shas: tuple[str, ...]  # their weights checksums
    member_scores: np.ndarray  # (members, L, 20)
    random_weights: bool  # any member holds random weights
    strategy: str
    alphabet: str = AMINO_ACIDS

    @property
    def scores(self) -> np.ndarray:
        """(L, 20): the members' mean."""
        return self.member_scores.mean(axis=0)


@dataclass
class MutantScore:
    """One mutant's score, or why it was rejected (``error``, one line; ``score`` None)."""

    key: str
    mutant: str  # the label as given
    score: float | None
    error: str | None = None
    member_scores: tuple[float, ...] | None = None  # ensembles: each member's sum


@dataclass
class _Job:
    """One copy of a window [start, end) of item ``item`` in a forward pass: residue ``masked`` replaced by
    <mask> (masked-marginals) or none (wt-marginals); log-probs read at residues ``positions``."""

    item: int
    start: int
    end: int
    masked: int | None
    positions: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.end - self.start


def parse_mutant(label: str, sequence: str, offset: int = 1) -> Mutant:
    """Parse ``label`` (sites ``<wt><position><mt>`` joined by ":") against ``sequence``; positions are
    numbered from ``offset`` (1: the first residue is 1, fair-esm's ``--offset-idx``). MutantError (one line)
    for a malformed site, a position outside the sequence or given twice, a wild-type letter that does not
    match the sequence, or a target outside the 20 standard amino acids."""
    text = label.strip()
    if not text:
        raise MutantError("empty mutant label")
    sites: list[Substitution] = []
    for part in text.split(":"):
        match = _SITE.match(part.strip())
        if not match:
            raise MutantError(f"mutant {label!r}: site {part!r} is not <wt><position><mt>, e.g. A25G")
        wt, number, mt = match.group(1).upper(), int(match.group(2)), match.group(3).upper()
        index = number - offset
        if not 0 <= index < len(sequence):
            raise MutantError(
                f"mutant {label!r}: position {number} outside the sequence "
                f"(positions {offset}..{offset + len(sequence) - 1})"
            )
        if sequence[index] != wt:
            raise MutantError(
                f"mutant {label!r}: wild type {wt} at position {number} does not match the sequence, "
                f"which has {sequence[index]}"
            )
        if mt not in AMINO_ACIDS:
            raise MutantError(f"mutant {label!r}: {mt} is not one of the 20 standard amino acids")
        if any(site.index == index for site in sites):
            raise MutantError(f"mutant {label!r}: position {number} mutated twice")
        sites.append(Substitution(index, wt, mt))
    return Mutant(label, tuple(sites))


def centred_window(index: int, length: int, window: int) -> tuple[int, int]:
    """Residues [start, end) of the ``window``-long window centred on ``index`` (start = index - window // 2)
    and shifted inside [0, length) at the ends, as ProteinGym; the whole sequence when it fits."""
    if length <= window:
        return 0, length
    start = min(max(index - window // 2, 0), length - window)
    return start, start + window


class VariantScorer:
    """Masked-marginal or wild-type-marginal scores from a :class:`~esm_core.checkpoints.LoadedMaskedLm`.

    ``window`` is the residues per pass: the model's ``max_residues`` by default, never more; longer
    proteins are scored in windows centred on each residue. ``max_tokens`` bounds a batch's padded tokens
    (default: the embedding engine's budget for the device). ``precision`` as in the embedding engine.
    """

    def __init__(
        self,
        loaded: LoadedMaskedLm,
        method: str = "masked-marginals",
        precision: str = "auto",
        max_tokens: int | None = None,
        window: int | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method {method!r}: choose from {', '.join(METHODS)}")
        if window is not None and not 1 <= window <= loaded.max_residues:
            raise ValueError(f"window {window}: choose 1..{loaded.max_residues} residues for this model")
        self.loaded = loaded
        self.method = method
        self.device = loaded.device
        self.precision = resolve_precision(precision, self.device)
        self.model = cast_model(loaded.model, self.precision)
        element_bytes = torch.finfo(next(self.model.parameters()).dtype).bits // 8
        self.max_tokens = max_tokens or embed_token_budget(self.model.base_model, self.device, element_bytes)
        self.window = window or loaded.max_residues
        self._cpu_model: tuple[torch.nn.Module, str] | None = None

    # ------------------------------------------------------------------------------------------ driver

    def score(
        self, items: Sequence[tuple[str, str]], positions: Mapping[str, Collection[int]] | None = None
    ) -> Iterator[VariantScores]:
        """Yield one :class:`VariantScores` per (key, sequence), in completion order (not input order).

        Every residue is scored unless ``positions`` names, for a key, the 0-based residues to score (the
        others stay NaN: a list of mutants needs only its sites). Sequences are normalised by ingest's rule
        first (:func:`esm_core.alphabet.normalise`).
        """
        items = [(key, alphabet.normalise(sequence, key)) for key, sequence in items]
        jobs: list[_Job] = []
        for index, (key, sequence) in enumerate(items):
            if not sequence:
                raise ValueError(f"empty sequence for key {key!r}")
            wanted = range(len(sequence)) if positions is None or key not in positions else positions[key]
            wanted = sorted(set(wanted))
            outside = [p for p in wanted if not 0 <= p < len(sequence)]
            if outside:
                raise ValueError(f"{key!r}: residue index {outside[0]} outside 0..{len(sequence) - 1}")
            jobs.extend(self._jobs(index, len(sequence), wanted))
        remaining = dict.fromkeys(range(len(items)), 0)
        for job in jobs:
            remaining[job.item] += 1
        # (L, vocab) log-probabilities of the items in progress: length-sorted batches finish items one
        # after another, so only a few tables are alive at a time
        tables: dict[int, np.ndarray] = {}
        notes: dict[int, list[str]] = {}
        for item in [i for i, count in remaining.items() if count == 0]:  # nothing asked of these
            yield self._result(items[item], self._table(items[item]), [], self.precision)
        for batch in pack_batches([job.length for job in jobs], self.max_tokens):
            chunk = [jobs[i] for i in batch]
            for sub, outs, fallbacks in self._run(chunk, items):
                for job, logp in zip((chunk[i] for i in sub), outs, strict=True):
                    if job.item not in tables:
                        tables[job.item] = self._table(items[job.item])
                    tables[job.item][list(job.positions)] = logp[:, : alphabet.VOCAB_SIZE]
                    seen = notes.setdefault(job.item, [])
                    seen.extend(f for f in fallbacks if f not in seen)
                    remaining[job.item] -= 1
                    if remaining[job.item] == 0:
                        notes.pop(job.item)
                        yield self._result(items[job.item], tables.pop(job.item), seen, self._precision(seen))

    @staticmethod
    def _table(item: tuple[str, str]) -> np.ndarray:
        return np.full((len(item[1]), alphabet.VOCAB_SIZE), np.nan, np.float32)

    def _jobs(self, item: int, length: int, wanted: list[int]) -> list[_Job]:
        """Masked-marginals: one masked copy per wanted residue, in its centred window. Wt-marginals: one
        unmasked copy per distinct centred window, reading every wanted residue it centres."""
        if self.method == "masked-marginals":
            return [_Job(item, *centred_window(p, length, self.window), p, (p,)) for p in wanted]
        groups: dict[tuple[int, int], list[int]] = {}
        for p in wanted:
            groups.setdefault(centred_window(p, length, self.window), []).append(p)
        return [_Job(item, start, end, None, tuple(ps)) for (start, end), ps in groups.items()]

    def _result(
        self, item: tuple[str, str], logp: np.ndarray, fallbacks: list[str], precision: str
    ) -> VariantScores:
        key, sequence = item
        wt = alphabet.encode(sequence)
        scores = logp[:, _AA_IDS] - logp[np.arange(len(sequence)), wt][:, None]
        return VariantScores(
            key=key,
            sequence=sequence,
            method=self.method,
            scores=np.ascontiguousarray(scores, dtype=np.float32),
            strategy="full" if len(sequence) <= self.window else "window",
            precision=precision,
            fallbacks=list(fallbacks),
        )

    def _run(
        self, chunk: list[_Job], items: Sequence[tuple[str, str]]
    ) -> list[tuple[list[int], list[np.ndarray], list[str]]]:
        def on_device(sub: list[int]) -> list[np.ndarray]:
            return self._forward([chunk[i] for i in sub], items, self.model)

        def on_cpu(sub: list[int]) -> list[np.ndarray]:
            return self._forward([chunk[i] for i in sub], items, self._fallback_model()[0])

        return run_with_oom_fallback(list(range(len(chunk))), on_device, on_cpu, self.device)

    def _fallback_model(self) -> tuple[torch.nn.Module, str]:
        """The model for single copies that ran out of memory: a CPU copy (bf16 where the CPU has it)."""
        if self.device.type == "cpu":
            return self.model, self.precision
        if self._cpu_model is None:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
            model = copy.deepcopy(self.loaded.model).to("cpu")
            self._cpu_model = (cast_model(model, precision), precision)
        return self._cpu_model

    def _precision(self, fallbacks: list[str]) -> str:
        """The precision a result was computed at: the CPU copy's when some of its passes ran there."""
        on_cpu = self._cpu_model is not None and any(f.endswith("on cpu") for f in fallbacks)
        return self._cpu_model[1] if on_cpu else self.precision

    # ----------------------------------------------------------------------------------------- forward

    @torch.inference_mode()
    def _forward(
        self, jobs: list[_Job], items: Sequence[tuple[str, str]], model: torch.nn.Module
    ) -> list[np.ndarray]:
        """One padded batch of copies through the encoder; the LM head and log-softmax only at the residues
        each copy reads. Returns, per job, (len(positions), vocab) float32 log-probabilities."""
        device = next(model.parameters()).device
        tokens_np, _ = alphabet.batch_tokens([items[j.item][1][j.start : j.end] for j in jobs], PAD_MULTIPLE)
        for row, job in enumerate(jobs):
            if job.masked is not None:
                tokens_np[row, 1 + job.masked - job.start] = alphabet.MASK
        tokens = torch.from_numpy(tokens_np).to(device)
        attention = tokens.ne(alphabet.PAD).long()
        hidden = model.base_model(input_ids=tokens, attention_mask=attention).last_hidden_state
        rows = [row for row, job in enumerate(jobs) for _ in job.positions]
        cols = [1 + p - job.start for job in jobs for p in job.positions]
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logp = torch.log_softmax(model.lm_head(picked).float(), dim=-1).cpu().numpy()
        bounds = np.cumsum([0, *(len(job.positions) for job in jobs)])
        return [logp[bounds[i] : bounds[i + 1]] for i in range(len(jobs))]


# ------------------------------------------------------------------------------------------ mutants


def mutant_scores(
    table: VariantScores | EnsembleScores, labels: Sequence[str], offset: int = 1
) -> list[MutantScore]:
    """Score each mutant label against a saturation table (the sum of its sites); a label that does not
    parse against the sequence, or needs a residue the table did not score, is returned with ``error``."""
    out: list[MutantScore] = []
    members = table.member_scores if isinstance(table, EnsembleScores) else None
    for label in labels:
        try:
            mutant = parse_mutant(label, table.sequence, offset)
            score = float(_site_sum(table.scores, mutant))
            per_member = None if members is None else tuple(float(v) for v in _site_sum(members, mutant))
        except MutantError as exc:
            out.append(MutantScore(table.key, label, None, str(exc)))
            continue
        out.append(MutantScore(table.key, label, score, None, per_member))
    return out


def mutant_positions(sequence: str, labels: Sequence[str], offset: int = 1) -> set[int]:
    """0-based residues that the valid labels among ``labels`` mutate (the ones worth a masked pass)."""
    found: set[int] = set()
    for label in labels:
        try:
            found.update(site.index for site in parse_mutant(label, sequence, offset).sites)
        except MutantError:
            continue
    return found


def score_mutants(
    scorer: VariantScorer, key: str, sequence: str, labels: Sequence[str], offset: int = 1
) -> list[MutantScore]:
    """Score mutant labels of one sequence, running passes only at the residues they mutate."""
    return score_mutant_sets(scorer, [(key, sequence, labels)], offset)[key]


def score_mutant_sets(
    scorer: VariantScorer, entries: Sequence[tuple[str, str, Sequence[str]]], offset: int = 1
) -> dict[str, list[MutantScore]]:
    """Score (key, sequence, mutant labels) entries together: the masked copies of all sequences share
    batches, and only mutated residues are scored. Returns each key's MutantScores in label order."""
    if len({key for key, _, _ in entries}) != len(entries):
        raise ValueError("mutant sets need distinct keys")
    items = [(key, alphabet.normalise(sequence, key)) for key, sequence, _ in entries]
    labels = {key: list(found) for key, _, found in entries}
    wanted = {key: mutant_positions(sequence, labels[key], offset) for key, sequence in items}
    return {
        table.key: mutant_scores(table, labels[table.key], offset) for table in scorer.score(items, wanted)
    }


def _site_sum(scores: np.ndarray, mutant: Mutant) -> np.ndarray:
    """Sum over ``mutant``'s sites of ``scores[..., index, column]`` (a (L, 20) table or a stack of them)."""
    total = np.zeros(scores.shape[:-2], dtype=np.float64)
    for site in mutant.sites:
        value = scores[..., site.index, AMINO_ACIDS.index(site.mt)]
        if np.isnan(value).any():
            raise MutantError(
                f"mutant {mutant.label!r}: residue {site.wt} at index {site.index} was not scored"
            )
        total = total + value
    return total


# ----------------------------------------------------------------------------------------- ensemble


def score_ensemble(
    members: Sequence[str | LoadedMaskedLm],
    items: Sequence[tuple[str, str]],
    method: str = "masked-marginals",
    positions: Mapping[str, Collection[int]] | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    max_tokens: int | None = None,
) -> list[EnsembleScores]:
    """Score ``items`` with each member (a spec loaded with :func:`load_esm_mlm`, one at a time, or an
    already loaded model) and return, in ``items`` order, every member's table and their mean. The ESM-1v
    ensemble is ``esm_core.registry.ESM1V_ENSEMBLE``."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    keys = [key for key, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError("ensemble items need distinct keys")
    names: list[str] = []
    shas: list[str] = []
    random = False
    tables: dict[str, list[VariantScores]] = {}
    for member in members:
        loaded = load_esm_mlm(member, device) if isinstance(member, str) else member
        names.append(loaded.name)
        shas.append(loaded.sha)
        random = random or loaded.random_weights
        scorer = VariantScorer(loaded, method=method, precision=precision, max_tokens=max_tokens)
        for result in scorer.score(items, positions):
            tables.setdefault(result.key, []).append(result)
        del scorer, loaded
    out = []
    for key, _ in items:
        results = tables[key]
        out.append(
            EnsembleScores(
                key=key,
                sequence=results[0].sequence,
                method=method,
                members=tuple(names),
                member_shas=tuple(shas),
                member_scores=np.stack([r.scores for r in results]),
                random_weights=random,
                strategy=results[0].strategy,
            )
        )
    return out
