"""The embedding engine: batches sequences by token budget, runs the ESM encoder only as deep as needed,
and pools per sequence. Model code is transformers' own modules, called in the order ``EsmModel.forward``
calls them; only the loop stops early and the LM head is never touched.

Attention runs through PyTorch SDPA. When a batch has no padding the mask is ``None`` (transformers'
``create_bidirectional_mask`` drops all-ones masks), which lets CUDA pick the flash kernel; a padded batch
carries a boolean mask, which SDPA serves with the memory-efficient kernel on GPU and the flash-style
CPU kernel on CPU. Length-sorted batches keep that padding small, and a batch whose sequences all have the
same length (e.g. the 1,022-residue windows of long proteins) is not rounded up, so it carries no mask.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import EsmModel
from transformers.masking_utils import create_bidirectional_mask

from esm_core import alphabet
from esm_core.batching import embed_token_budget, pack_batches, run_with_oom_fallback
from esm_core.checkpoints import LoadedEsm
from esm_core.precision import cast_model, cosine_similarity, cpu_has_fast_bf16, resolve_precision
from esm_core.windows import Piece, Stitcher, cut_pieces

POOLINGS = ("mean", "bos")
LONG_STRATEGIES = ("window", "truncate")
# Token rows are padded to a multiple of this: tensor-core friendly shapes on GPU and fewer distinct shapes
# for kernel caches, at the cost of < 8 masked positions per row (padding never changes the result).
PAD_MULTIPLE = 8


@dataclass
class EmbedResult:
    """Embeddings of one input sequence.

    ``length`` is the input's residue count; under "truncate" the per-residue arrays hold only the first
    ``max_residues`` rows. ``pooled`` is keyed by (absolute layer 0..num_layers, pooling name).
    """

    key: str
    length: int
    strategy: str  # "full" | "window" | "truncate"
    pooled: dict[tuple[int, str], np.ndarray]
    per_residue: dict[int, np.ndarray] | None
    contacts: np.ndarray | None
    fallbacks: list[str] = field(default_factory=list)
    precision: str = "fp32"


@dataclass
class _PieceOut:
    """What one forward pass yields for one piece (numpy, float32)."""

    mean: dict[int, np.ndarray]
    bos: dict[int, np.ndarray]
    residues: dict[int, np.ndarray] | None
    contacts: np.ndarray | None
    precision: str


class Embedder:
    """ESM embeddings for (key, sequence) pairs: pooled vectors, optional per-residue arrays and contacts.

    ``layers`` are fair-esm style indices: 0 = embedding output, k = after block k, -1 = last (with the final
    layer norm, as ``last_hidden_state``). Long sequences (> ``loaded.max_residues``) are windowed (window =
    max_residues, stride = half of it, outputs averaged where windows overlap) or truncated.
    """

    def __init__(
        self,
        loaded: LoadedEsm,
        layers: Sequence[int] = (-1,),
        poolings: Sequence[str] = ("mean",),
        per_residue: bool = False,
        contacts: bool = False,
        long_strategy: str = "window",
        precision: str = "auto",
        max_tokens: int | None = None,
    ):
        n = loaded.num_layers
        bad = [layer for layer in layers if not -(n + 1) <= layer <= n]
        if bad or not layers:
            raise ValueError(
                f"layers {list(layers)} out of range for a {n}-layer model (use 0..{n} or -1..-{n + 1})"
            )
        if not poolings or set(poolings) - set(POOLINGS):
            raise ValueError(f"poolings {list(poolings)}: choose from {', '.join(POOLINGS)}")
        if long_strategy not in LONG_STRATEGIES:
            raise ValueError(f"long_strategy {long_strategy!r}: choose from {', '.join(LONG_STRATEGIES)}")
        if contacts and not loaded.has_contact_head:
            raise ValueError(f"model {loaded.name!r} has no contact regression weights; contacts unavailable")
        self.loaded = loaded
        self.layers = tuple(sorted({layer % (n + 1) for layer in layers}))
        self.poolings = tuple(dict.fromkeys(poolings))
        self.per_residue = per_residue
        self.contacts = contacts
        self.long_strategy = long_strategy
        self.depth = n if contacts else max(self.layers)
        self.device = loaded.device
        self.precision = resolve_precision(precision, self.device)
        self.model = cast_model(loaded.model, self.precision)
        element_bytes = torch.finfo(next(self.model.parameters()).dtype).bits // 8
        self.max_tokens = max_tokens or embed_token_budget(self.model, self.device, element_bytes, contacts)
        self.window = loaded.max_residues
        self.stride = self.window // 2
        self._cpu_model: tuple[EsmModel, str] | None = None

    # ------------------------------------------------------------------------------------------ driver

    def embed(self, items: Sequence[tuple[str, str]]) -> Iterator[EmbedResult]:
        """Yield one ``EmbedResult`` per (key, sequence), in batch order (not input order); sequences are
        normalised by ingest's rule first (:func:`esm_core.alphabet.normalise`)."""
        items = [(key, alphabet.normalise(sequence, key)) for key, sequence in items]
        pieces: list[Piece] = []
        stitchers: dict[int, Stitcher] = {}
        for index, (key, sequence) in enumerate(items):
            if not sequence:
                raise ValueError(f"empty sequence for key {key!r}")
            cut = cut_pieces(index, len(sequence), self.window, self.long_strategy, self.stride)
            if len(cut) > 1:
                stitchers[index] = Stitcher(len(sequence), len(cut))
            pieces.extend(cut)
        notes: dict[int, list[str]] = {}
        for batch in pack_batches([p.length for p in pieces], self.max_tokens):
            chunk = [pieces[i] for i in batch]
            for sub, outs, fallbacks in self._run(chunk, items, stitchers):
                for piece, out in zip((chunk[i] for i in sub), outs, strict=True):
                    key, sequence = items[piece.item]
                    if piece.item not in stitchers:
                        yield self._result(key, len(sequence), out, fallbacks)
                        continue
                    stitch = stitchers[piece.item]
                    stitch.add(piece.start, out.residues, out.bos, out.contacts)
                    seen = notes.setdefault(piece.item, [])
                    seen.extend(f for f in fallbacks if f not in seen)
                    if stitch.done:
                        yield self._stitched(
                            key, stitchers.pop(piece.item), notes.pop(piece.item), out.precision
                        )

    def _run(
        self, chunk: list[Piece], items: Sequence[tuple[str, str]], stitchers: dict[int, Stitcher]
    ) -> list[tuple[list[int], list[_PieceOut], list[str]]]:
        sequences = [items[p.item][1][p.start : p.end] for p in chunk]
        residues = [self.per_residue or p.item in stitchers for p in chunk]

        def on_device(sub: list[int]) -> list[_PieceOut]:
            return self._forward(
                [sequences[i] for i in sub], [residues[i] for i in sub], self.model, self.precision
            )

        def on_cpu(sub: list[int]) -> list[_PieceOut]:
            model, precision = self._fallback_model()
            return self._forward([sequences[i] for i in sub], [residues[i] for i in sub], model, precision)

        return run_with_oom_fallback(list(range(len(chunk))), on_device, on_cpu, self.device)

    def _fallback_model(self) -> tuple[EsmModel, str]:
        """The model for single sequences that ran out of memory: a CPU copy (bf16 where the CPU has it)."""
        if self.device.type == "cpu":
            return self.model, self.precision
        if self._cpu_model is None:
            source = self.loaded.model
            model = copy.deepcopy(source).to("cpu")  # any encoder (ESM-2, ESM C's view), its weights included
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
            self._cpu_model = (cast_model(model.eval(), precision), precision)
        return self._cpu_model

    # ----------------------------------------------------------------------------------------- results

    def _result(self, key: str, length: int, out: _PieceOut, fallbacks: list[str]) -> EmbedResult:
        pooled: dict[tuple[int, str], np.ndarray] = {}
        for layer in self.layers:
            if "mean" in self.poolings:
                pooled[(layer, "mean")] = out.mean[layer]
            if "bos" in self.poolings:
                pooled[(layer, "bos")] = out.bos[layer]
        return EmbedResult(
            key=key,
            length=length,
            strategy="full" if length <= self.window else "truncate",
            pooled=pooled,
            per_residue=out.residues if self.per_residue else None,
            contacts=out.contacts,
            fallbacks=list(fallbacks),
            precision=out.precision,
        )

    def _stitched(self, key: str, stitch: Stitcher, fallbacks: list[str], precision: str) -> EmbedResult:
        residues = stitch.per_residue()
        bos = stitch.bos_mean()
        mean = {
            layer: values.mean(axis=0, dtype=np.float64).astype(np.float32)
            for layer, values in residues.items()
        }
        out = _PieceOut(
            mean=mean, bos=bos, residues=residues, contacts=stitch.contacts(), precision=precision
        )
        result = self._result(key, stitch.length, out, fallbacks)
        result.strategy = "window"
        return result

    # ----------------------------------------------------------------------------------------- forward

    @torch.inference_mode()
    def _forward(
        self, sequences: list[str], want_residues: list[bool], model: EsmModel, precision: str
    ) -> list[_PieceOut]:
        """One padded batch through embeddings + the first ``depth`` blocks (+ final norm if all run)."""
        device = next(model.parameters()).device
        tokens_np, lengths_np = alphabet.batch_tokens(sequences, PAD_MULTIPLE)
        tokens = torch.from_numpy(tokens_np).to(device)
        attention = tokens.ne(alphabet.PAD).long()
        captured: list[torch.Tensor] = []
        with _attention_capture(model, captured) if self.contacts else contextlib.nullcontext():
            states = self._encode(model, tokens, attention)
        lengths = torch.from_numpy(lengths_np).to(device)
        positions = torch.arange(tokens.shape[1], device=device)
        residue_mask = ((positions[None, :] >= 1) & (positions[None, :] <= lengths[:, None])).float()
        mean_t = {
            layer: (h.float() * residue_mask[..., None]).sum(1) / lengths[:, None].float()
            for layer, h in states.items()
        }
        mean = {layer: v.cpu().numpy() for layer, v in mean_t.items()}
        bos = {layer: h[:, 0].float().cpu().numpy() for layer, h in states.items()}
        residues = None
        if any(want_residues):
            residues = {layer: h.float().cpu().numpy() for layer, h in states.items()}
        contacts = None
        if self.contacts:
            # (B, layers, heads, T, T), zeroed on padding as fair-esm does (EsmModel.predict_contacts too)
            attns = torch.stack(captured, dim=1)
            mask = attention.to(attns.dtype)
            attns = attns * mask[:, None, None, None, :] * mask[:, None, None, :, None]
            contacts = model.contact_head(tokens, attns).float().cpu().numpy()
        outs = []
        for row, length in enumerate(lengths_np.tolist()):
            out_residues = None
            if want_residues[row]:
                out_residues = {
                    layer: np.ascontiguousarray(v[row, 1 : length + 1]) for layer, v in residues.items()
                }
            out_contacts = None if contacts is None else np.ascontiguousarray(contacts[row, :length, :length])
            outs.append(
                _PieceOut(
                    mean={layer: v[row] for layer, v in mean.items()},
                    bos={layer: v[row] for layer, v in bos.items()},
                    residues=out_residues,
                    contacts=out_contacts,
                    precision=precision,
                )
            )
        return outs

    def _encode(
        self, model: EsmModel, tokens: torch.Tensor, attention: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """Hidden states of the requested layers, following ``EsmModel.forward`` step by step."""
        wanted = set(self.layers)
        hidden = model.embeddings(input_ids=tokens, attention_mask=attention)
        mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention)
        rotary = None
        if model.rotary_embeddings is not None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
            rotary = model.rotary_embeddings(hidden, position_ids)
        states = {0: hidden} if 0 in wanted else {}
        last = model.config.num_hidden_layers
        for index in range(self.depth):
            hidden = model.encoder.layer[index](hidden, attention_mask=mask, position_embeddings=rotary)
            if index + 1 == last:
                hidden = model.encoder.emb_layer_norm_after(hidden)
            if index + 1 in wanted:
                states[index + 1] = hidden
        return states


@contextlib.contextmanager
def _attention_capture(model: EsmModel, sink: list[torch.Tensor]) -> Iterator[None]:
    """Eager attention for the duration (SDPA returns no weights) and a hook collecting each layer's
    attention probabilities into ``sink``; restores the previous implementation afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    hooks = [
        layer.attention.self.register_forward_hook(lambda _m, _i, output: sink.append(output[1]))
        for layer in model.encoder.layer
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        model.set_attn_implementation(previous)


def compare_to_fp32(
    loaded: LoadedEsm, items: Sequence[tuple[str, str]], precision: str = "auto", layer: int = -1
) -> np.ndarray:
    """Per-sequence cosine similarity of ``precision`` vs fp32 mean embeddings (``items`` order)."""

    def pooled(prec: str) -> np.ndarray:
        embedder = Embedder(loaded, layers=(layer,), precision=prec)
        got = {r.key: r.pooled[(embedder.layers[0], "mean")] for r in embedder.embed(items)}
        return np.stack([got[key] for key, _ in items])

    return cosine_similarity(pooled(precision), pooled("fp32"))
