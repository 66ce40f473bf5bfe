"""Seeds: every random choice is drawn from a stream named by (seed, labels), so resuming a chain
needs no RNG state and two purposes never share a stream."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *labels) -> int:
    """A 63-bit seed determined by `seed` and labels (e.g. ("order", 3)): independent streams."""
    h = hashlib.sha256(repr((int(seed),) + tuple(labels)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def mask_seed(hp) -> int:
    """The seed of everything that finds the mask of chain `hp` (ChainHparams): the initialization,
    the rewind training, the pruning rounds' data order and augmentation (and the controls of
    `prunelab.evaluation`).

    `hp.seed` with `seed_scope: all`; 0 with `seed_scope: training` (the paper authors fixed
    torch.manual_seed(0) for pruning), so chains that differ only in `seed` then find the same mask
    from the same initialization and differ only in the trainings after pruning (LMC and landscape
    copies, evaluation runs), which keep drawing from `hp.seed`. Such chains still have different
    content hashes (`seed` is hashed) and each stores its own copy of that mask.
    """
    return 0 if hp.seed_scope == "training" else hp.seed
