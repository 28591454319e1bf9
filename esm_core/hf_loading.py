"""Loading through transformers' ``from_pretrained`` for every model kind: quiet (no log reports, no
progress bars), failures as one-line ModelNotFoundError, and weights that do not fit the architecture
refused instead of silently left at random initialisation."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import logging as hub_logging
from transformers.utils import logging as hf_logging

from esm_core.sources import CheckpointMismatchError, ModelNotFoundError, Source, first_line

Model = TypeVar("Model")
SHOWN_KEYS = 3  # offending keys named in a mismatch message
# Buffers that older saves hold and current modules recompute: never a sign of a wrong checkpoint.
BUFFER_KEYS = re.compile(r"(^|\.)(position_ids|inv_freq)$")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers and huggingface_hub silent for the duration: errors only (no load reports, no
    download retry chatter), no progress bars ("Loading weights", "Writing model shards"); the previous
    settings are restored afterwards."""
    verbosity, hub_verbosity = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hub_logging.set_verbosity(hub_verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(source: Source, load: Callable[[str, bool], Model]) -> Model:
    """``load(location, local_files_only)`` for ``source``, quietly; OSError and ValueError (no such
    repo, unreachable hub, unreadable files) become a one-line ModelNotFoundError."""
    with quiet_loading():
        try:
            return load(source.location, source.is_local)
        except (OSError, ValueError) as exc:
            if source.is_local:
                message = (
                    f"model {source.spec!r} could not be loaded from {source.location}: {first_line(exc)}"
                )
            else:
                message = (
                    f"model {source.location!r} not found; tried: local path (absent), Hugging Face cache "
                    f"({hub_constants.HF_HUB_CACHE}), hub (unreachable or no such repo): {first_line(exc)}"
                )
            raise ModelNotFoundError(message) from exc


def refuse_mismatch(
    spec: str,
    info: dict[str, Any],
    allowed_missing: re.Pattern[str],
    allowed_unexpected: re.Pattern[str],
) -> set[str]:
    """Raise CheckpointMismatchError when ``from_pretrained``'s loading ``info`` shows weights that do not
    fit: missing or unexpected keys beyond the allowed patterns, or any key of the wrong shape (load with
    ``ignore_mismatched_sizes=True`` so those are reported here). Returns the allowed missing keys."""
    missing = set(info.get("missing_keys", ()))
    unexpected = set(info.get("unexpected_keys", ()))
    bad_missing = sorted(k for k in missing if not allowed_missing.search(k))
    bad_unexpected = sorted(
        k for k in unexpected if not (allowed_unexpected.search(k) or BUFFER_KEYS.search(k))
    )
    bad_shape = sorted(
        f"{key} {tuple(saved)} vs {tuple(built)}" for key, saved, built in info.get("mismatched_keys", ())
    )
    parts = [
        _some(label, keys)
        for label, keys in (
            ("missing", bad_missing),
            ("unexpected", bad_unexpected),
            ("wrong shape", bad_shape),
        )
        if keys
    ]
    if parts:
        raise CheckpointMismatchError(
            f"model {spec!r}: weights do not fit the architecture in its config ({'; '.join(parts)}); "
            "refusing to run with randomly initialised layers"
        )
    return missing - set(bad_missing)


def _some(label: str, keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:SHOWN_KEYS])
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} {label}: {shown}{more}"
