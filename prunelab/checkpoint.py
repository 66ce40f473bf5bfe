"""State part-way through a long computation (a round's training, a distillation): how often it is
stored, and how it is written so that a damaged copy is never read as a good one."""

from __future__ import annotations

import io
from typing import Callable, Optional

import torch

from .blobs import Blobs
from .errors import CorruptFileError
from .files import frame, unframe

# how often a round's training or a distillation stores its state part-way (what a kill can lose)
CHECKPOINT_EVERY_S = 600.0
MAGIC = b"PRUNELAB-PARTIAL-1\n"


def to_cpu(obj):
    """`obj` (a state dict, nested) with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save(blobs: Blobs, key: str, payload: dict) -> None:
    """Write `payload` (tensors and plain data) to `key` of `blobs` atomically, with a checksum."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    blobs.write(key, frame(MAGIC, buf.getvalue()))


def load(blobs: Blobs, key: str, on_corrupt: Optional[Callable[[str], None]] = None,
         what: str = "") -> Optional[dict]:
    """The payload at `key` of `blobs`, or None: none there, or a damaged one, reported through
    `on_corrupt(message)` (`what` says what happens instead)."""
    data = blobs.read(key)
    if data is None:
        return None
    try:
        return torch.load(io.BytesIO(unframe(MAGIC, data, blobs.describe(key))), map_location="cpu",
                          weights_only=True)
    except CorruptFileError as e:
        if on_corrupt is not None:
            on_corrupt(f"{e}; {what}" if what else str(e))
        return None
