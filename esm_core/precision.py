"""Which precision to run at, a model copy cast to it, and the cosine similarity that measures how close
its outputs stay to fp32 (:func:`esm_core.embedding.compare_to_fp32`).

Measured on this project's 2-core Sapphire Rapids CPU (AMX): a 2048^2 bf16 GEMM runs at ~2.4 TFLOP/s vs
~0.38 TFLOP/s fp32, and an esm2_t12 forward is ~2-2.5x faster with the model cast to bf16, a little faster
than bf16 autocast (autocast re-casts weights every call). So bf16 means "cast the weights", on CPU and GPU.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from esm_core.device import PRECISIONS, torch_dtype


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 on this CPU (AVX512-BF16 or AMX); else bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> fastest safe precision for ``device``; explicit names are checked against the device.

    auto: CUDA with bf16 support -> bf16, older CUDA -> fp16, CPU with native bf16 -> bf16, else fp32.
    fp16 on CPU is refused: CPU half-precision kernels are slow and overflow-prone, bf16 is the CPU choice.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a GPU; device is {device.type} (use bf16 or fp32 there)")
    return precision


def cast_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``model`` itself when already at ``precision``, else a cast copy (the caller's fp32 model is kept)."""
    dtype = torch_dtype(precision)
    if next(model.parameters()).dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays, in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-300)
