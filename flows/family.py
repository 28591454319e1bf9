"""Pre-flight facts of ``score-variants`` and ``predict``: which checkpoints a ``--model`` names (one, a comma
list, or the ESM-1v ensemble) and which head a checkpoint carries.

Heads are read from the checkpoint's ``config.json`` (its ``architectures``) in milliseconds, without torch,
so a checkpoint that cannot serve the command is refused in one line before anything starts. The loaders
(esm_core.heads, esm_core.checkpoints.load_esm_mlm) check again when the workers load the weights.
"""

from __future__ import annotations

from esm_core.registry import ESM1V_ENSEMBLE
from flows.errors import CliError

# --model names that stand for several checkpoints, run one after another as separate runs.
ENSEMBLES: dict[str, tuple[str, ...]] = {"esm1v": ESM1V_ENSEMBLE}
# transformers' class-name suffix of each head kind (EsmFor..., EsmcFor...).
HEAD_SUFFIXES = {"ForSequenceClassification": "sequence", "ForTokenClassification": "token"}
MASKED_LM_SUFFIX = "ForMaskedLM"


def ensemble_members(spec: str) -> tuple[str, ...]:
    """The checkpoints ``spec`` names: an ensemble's members, a comma list's items, or ``spec`` itself."""
    if spec in ENSEMBLES:
        return ENSEMBLES[spec]
    members = tuple(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))
    if not members:
        raise CliError("--model names no checkpoint")
    return members


def ensemble_name(spec: str, names: list[str]) -> str:
    """What ``mutant_scores.model`` says for the checkpoints ``spec`` named (loaded under ``names``): the
    ensemble's name (``esm1v``), the one checkpoint's name, or the names joined with '+'."""
    if spec in ENSEMBLES:
        return spec
    return names[0] if len(names) == 1 else "+".join(names)


def _architectures(spec: str) -> tuple[str, list[str]]:
    """(source kind, the config's ``architectures``) of a checkpoint, as the loaders would resolve it."""
    from esm_core.preflight import inspect_checkpoint
    from esm_core.sources import ModelNotFoundError, read_hf_config

    try:
        info = inspect_checkpoint(spec, kind="esm")
        if info.source == "fair_esm":
            return info.source, []
        return info.source, list(read_hf_config(info.location, spec).get("architectures") or [])
    except ModelNotFoundError as exc:
        raise CliError(str(exc)) from None


def head_kind(spec: str) -> str:
    """ "sequence" or "token": the classification head ``spec`` carries; a one-line CliError for any other
    checkpoint (a language model, a bare encoder, a fair-esm file)."""
    source, architectures = _architectures(spec)
    if source == "fair_esm":
        raise CliError(
            f"model {spec!r} is a fair-esm file; predict loads classification heads from a Hugging Face "
            "directory or hub id"
        )
    for name in architectures:
        for suffix, kind in HEAD_SUFFIXES.items():
            if name.endswith(suffix):
                return kind
    named = ", ".join(architectures) or "no architecture"
    raise CliError(
        f"model {spec!r} is not a sequence- or token-classification checkpoint (its config names {named}); "
        "predict needs EsmForSequenceClassification or EsmForTokenClassification (or ESM C's)"
    )


def require_masked_lm(spec: str) -> None:
    """A one-line CliError unless ``spec`` may carry a masked-LM head: its config names a ``...ForMaskedLM``
    class, or says nothing (a fair-esm file, a config without ``architectures``: the loader decides)."""
    _, architectures = _architectures(spec)
    if architectures and not any(name.endswith(MASKED_LM_SUFFIX) for name in architectures):
        raise CliError(
            f"model {spec!r} has no masked-LM head (its config names {', '.join(architectures)}); "
            "score-variants needs an EsmForMaskedLM / EsmcForMaskedLM checkpoint or a fair-esm file"
        )
