"""Device and precision choices shared by the embedding and folding engines."""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given ("cpu", "cuda", "cuda:1"), else the first GPU when there is one, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved precision name (fp32, bf16, fp16)."""
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}") from None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM errors and for CPU allocation failures surfaced by torch."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text
    )


def free_cached_memory(device: torch.device) -> None:
    """Return cached blocks to the driver after an OOM so the retry starts from a clean allocator."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
