"""Identity of a model's weights: a checksum over its tensors, so results of two different checkpoints
that share a name are never mixed, and the loud marker that a checkpoint holds random weights."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a checksum is taken, so the marker costs no torch import
    import torch

RANDOM_WEIGHTS_KEY = "proteoflow_random_weights"
RANDOM_WEIGHTS_NOTICE = (
    "!!! RANDOM WEIGHTS: model {name!r} was initialised at random (no pretrained weights available); "
    "its outputs are meaningless and are marked random_weights=true !!!"
)


def weights_checksum(module: torch.nn.Module, length: int = 16) -> str:
    """SHA-1 over every parameter and buffer (name, dtype, shape, bytes) in name order; hex prefix.

    Computed on fp32 copies so the same checkpoint gives the same checksum whatever precision it runs at.
    """
    import torch

    digest = hashlib.sha1(usedforsecurity=False)
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        tensor = tensor.cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:length]
