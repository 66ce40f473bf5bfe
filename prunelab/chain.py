"""An IMP chain, one round at a time: train on the pruning data -> prune -> rewind -> next round.

With the real training set as pruning data this is IMP; with a distilled set it is distilled pruning
(the paper's Figure 1). The chain's state is plain data (tensors, ints, lists) serialized with a
checksum, so a sweep can checkpoint it after every round and resume to the same final mask.
Every random choice of round r is seeded from (seed, r, purpose) (`prunelab.seeds`), so resuming
needs no RNG state. The initialization, the rewind point and the pruning rounds draw from
`mask_seed(hp)`, the trainings after pruning from `hp.seed` (the two differ only with
`seed_scope: training`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from .data import DataSplit, ImageData, load_dataset
from .errors import ConfigError, CorruptFileError
from .files import frame, unframe
from .hparams import ChainHparams, TrainingHparams
from .allocation import select
from .masks import Mask, density_after, magnitude_prune, masked_state
from .models import build_model
from .seeds import derive_seed, mask_seed
from .sources import DATA_FREE, find_mask
from .stacked import train_copies
from .synthetic import load_pruning_data
from .train import evaluate, examples_drawn, is_delegated, resolve_device, steps_per_epoch, train, train_each

STATE_MAGIC = b"PRUNELAB-CHAIN-1\n"


class CorruptStateError(CorruptFileError):
    """A serialized chain state failed its checksum or could not be parsed."""


@dataclass
class ChainState:
    """Everything needed to continue a chain: weights to rewind to, the mask, the round."""

    round: int
    init: dict[str, torch.Tensor]
    mask: Mask
    rewind: Optional[dict[str, torch.Tensor]] = None
    history: list[dict] = field(default_factory=list)
    start_round: int = 0
    config_hash: str = ""

    @property
    def rewind_point(self) -> dict[str, torch.Tensor]:
        return self.rewind if self.rewind is not None else self.init

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"round": self.round, "init": self.init, "rewind": self.rewind,
                    "mask": dict(self.mask), "history": self.history, "start_round": self.start_round,
                    "config_hash": self.config_hash}, buf)
        return frame(STATE_MAGIC, buf.getvalue())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "chain state") -> "ChainState":
        try:
            payload = unframe(STATE_MAGIC, data, source)
        except CorruptFileError as e:
            raise CorruptStateError(str(e)) from None
        d = torch.load(io.BytesIO(payload), weights_only=True)
        return cls(round=d["round"], init=d["init"], rewind=d["rewind"], mask=Mask(d["mask"]),
                   history=list(d["history"]), start_round=d["start_round"], config_hash=d["config_hash"])


def load_subnetwork(model: nn.Module, weights: dict[str, torch.Tensor], mask: Mask) -> nn.Module:
    """`model` with `weights ⊙ mask` loaded (buffers such as BN statistics included)."""
    mask.check_fits(model)
    model.load_state_dict(masked_state(weights, mask))
    return model


def rewind_start_step(hp: ChainHparams, n_train: int, batch_size: int) -> int:
    """Where real-data training of a subnetwork starts its schedule: from a rewind point k > 0
    (`pruning.rewind_epoch`) it continues from epoch k; from the initialization it starts at 0."""
    k = hp.pruning.rewind_epoch
    return k * steps_per_epoch(n_train, batch_size) if k else 0


def _subnetwork_setup(hp: ChainHparams, data: DataSplit, weights: dict[str, torch.Tensor], mask: Mask,
                      training: Optional[TrainingHparams], start_step: Optional[int]):
    training = training or hp.training
    if start_step is None:
        start_step = rewind_start_step(hp, len(data.train), training.batch_size)
    model = build_model(hp.model, data.train.shape, data.train.num_classes, seed=0)
    return load_subnetwork(model, weights, mask), training, start_step


def _copy_seeds(seed: int) -> tuple[int, int]:
    """(order seed, augmentation seed) of a subnetwork trained with `seed`."""
    return derive_seed(seed, "order"), derive_seed(seed, "augment")


def _subnetwork_metrics(model: nn.Module, data: DataSplit, res, training: TrainingHparams, device) -> dict:
    test = evaluate(model, data.test, device=device, batch_size=training.eval_batch_size)
    return {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "train_loss": res.train_loss, "steps": res.steps, "curve": res.history}


def train_subnetwork(hp: ChainHparams, data: DataSplit, weights: dict[str, torch.Tensor], mask: Mask, *,
                     device="cpu", seed: int = 0, training: Optional[TrainingHparams] = None,
                     start_step: Optional[int] = None, eval_every: int = 0, callback=None
                     ) -> tuple[nn.Module, dict]:
    """Train `weights ⊙ mask` on the real training set; returns the model and its metrics.

    `seed` picks the data order and augmentation (two copies for LMC differ only here);
    `start_step` defaults to `rewind_start_step` (the chain's rewind convention).
    """
    model, training, start_step = _subnetwork_setup(hp, data, weights, mask, training, start_step)
    order_seed, aug_seed = _copy_seeds(seed)
    res = train(model, data.train, training, device=device, order_seed=order_seed, aug_seed=aug_seed,
                mask=mask, start_step=start_step, eval_data=data.test, eval_every=eval_every, callback=callback)
    return model, _subnetwork_metrics(model, data, res, training, device)


def train_subnetworks(hp: ChainHparams, data: DataSplit, weights: dict[str, torch.Tensor], mask: Mask,
                      seeds: Sequence[int], *, device="cpu", stacked: bool = False,
                      training: Optional[TrainingHparams] = None, start_step: Optional[int] = None
                      ) -> tuple[list[nn.Module], list[dict]]:
    """Train one copy of `weights ⊙ mask` per seed on the real training set; (models, metrics).

    Copy i is `train_subnetwork(..., seed=seeds[i])`. With `stacked`, the copies train together as
    one stacked network (`prunelab.stacked.train_copies`): the same batches, augmentation and
    schedule, equal to the one-by-one copies up to float rounding, and faster at small batch on a GPU.
    Otherwise they train through `train_each`: inside a data-parallel chain (`prunelab.parallel`) the
    group splits into parts that train the copies at once (the pair of an LMC on two workers, one each).
    """
    if not stacked or is_delegated():
        jobs, models = [], []
        for s in seeds:
            model, tr, start = _subnetwork_setup(hp, data, weights, mask, training, start_step)
            order_seed, aug_seed = _copy_seeds(s)
            jobs.append((model, data.train, tr, {"device": device, "order_seed": order_seed, "aug_seed": aug_seed,
                                                 "mask": mask, "start_step": start}))
            models.append(model)
        results = train_each(jobs)
        return models, [_subnetwork_metrics(m, data, r, job[2], device) for m, r, job in zip(models, results, jobs)]
    model, training, start_step = _subnetwork_setup(hp, data, weights, mask, training, start_step)
    models, results = train_copies(model, data.train, training, device=device,
                                   seeds=[_copy_seeds(s) for s in seeds], mask=mask, start_step=start_step)
    return models, [_subnetwork_metrics(m, data, r, training, device) for m, r in zip(models, results)]


class Chain:
    """One IMP chain. `step()` runs one round; `evaluate()` trains the current subnetwork on real data.

    Pruning data defaults to what `hp.pruning_data` names (the real set, or a synthetic set resolved
    through `prunelab.synthetic`); pass `pruning_data` to use a given tensor set instead.
    """

    def __init__(self, hp: ChainHparams, device="cpu", *, data: Optional[DataSplit] = None,
                 pruning_data: Optional[ImageData] = None, state: Optional[ChainState] = None,
                 start_mask: Optional[Mask] = None, start_round: int = 0,
                 allocation: Optional[dict[int, Mask]] = None):
        self.hp = hp
        self.allocation = allocation or {}  # round -> the allocation chain's mask (pruning.scope: chain)
        self.device = resolve_device(device)
        self.data = data if data is not None else load_dataset(hp.dataset)
        self.pruning_data = pruning_data if pruning_data is not None else load_pruning_data(hp, self.data, self.device)
        # a state written while the chain's identity held its data paths carries its legacy hash
        if state is not None and state.config_hash and state.config_hash not in (hp.hash(), hp.legacy_hash()):
            raise ConfigError("state", f"checkpoint belongs to chain {state.config_hash}, not {hp.hash()}",
                              "resume with the configuration that produced the checkpoint")
        self.state = state if state is not None else self._fresh_state(start_mask, start_round)

    def new_model(self) -> nn.Module:
        return build_model(self.hp.model, self.data.train.shape, self.data.train.num_classes,
                           seed=derive_seed(mask_seed(self.hp), "init"))

    def _fresh_state(self, start_mask: Optional[Mask], start_round: int) -> ChainState:
        model = self.new_model()
        init = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        mask = Mask.ones_like(model, self.hp.pruning.prune_classifier)
        if start_mask is not None:
            start_mask.check_fits(model)
            if list(start_mask) != list(mask):
                raise ConfigError("start_mask", "mask entries differ from this model's prunable weights",
                                  "start from a mask found for the same model and pruning settings")
            mask = Mask((k, v.clone()) for k, v in start_mask.items())
        rewind = None
        k = self.hp.pruning.rewind_epoch
        if k > 0:
            spe = steps_per_epoch(len(self.data.train), self.hp.training.batch_size)
            seed = mask_seed(self.hp)
            train(model, self.data.train, self.hp.training, device=self.device, mask=mask,
                  order_seed=derive_seed(seed, "rewind", "order"),
                  aug_seed=derive_seed(seed, "rewind", "augment"), stop_step=k * spe)
            rewind = {kk: v.detach().cpu().clone() for kk, v in model.state_dict().items()}
        return ChainState(round=start_round, init=init, rewind=rewind, mask=mask, start_round=start_round,
                          config_hash=self.hp.hash())

    # ---------------------------------------------------------------------------------------------
    @property
    def round(self) -> int:
        return self.state.round

    @property
    def mask(self) -> Mask:
        return self.state.mask

    @property
    def sparsity(self) -> float:
        return self.state.mask.sparsity

    @property
    def done(self) -> bool:
        return self.state.round >= self.hp.pruning.rounds

    def subnetwork(self) -> nn.Module:
        """A model holding the rewind point ⊙ the current mask."""
        return load_subnetwork(self.new_model(), self.state.rewind_point, self.state.mask)

    def _rewind_start_step(self, data: ImageData, training: TrainingHparams) -> int:
        # only real-data training continues from the rewind point; a synthetic set starts afresh
        return rewind_start_step(self.hp, len(data), training.batch_size) if data is self.data.train else 0

    def step(self, callback=None, resume: Optional[dict] = None, checkpoint=None, checkpoint_every_s: float = 0.0
             ) -> dict:
        """One round: train the subnetwork on the pruning data, prune, rewind. Returns the round's record.

        `checkpoint(payload)` receives the round's training state every `checkpoint_every_s` seconds (at
        epoch ends); `resume=payload` continues this round's training from it (see `train.train`)."""
        if self.done:
            raise RuntimeError(f"chain already finished its {self.hp.pruning.rounds} rounds")
        if self.hp.pruning.method != "magnitude":
            return self._step_at_init()
        r = self.state.round
        hp = self.hp.pruning_training
        seed = mask_seed(self.hp)
        model = self.subnetwork()
        res = train(model, self.pruning_data, hp, device=self.device, mask=self.state.mask,
                    order_seed=derive_seed(seed, "prune", r, "order"),
                    aug_seed=derive_seed(seed, "prune", r, "augment"),
                    start_step=self._rewind_start_step(self.pruning_data, hp), callback=callback,
                    resume=resume, checkpoint=checkpoint, checkpoint_every_s=checkpoint_every_s)
        fit = evaluate(model, self.pruning_data, device=self.device, batch_size=hp.eval_batch_size)
        target = int(round(self.state.mask.total * density_after(r + 1, self.hp.pruning.fraction)))
        weights = {k: v.detach() for k, v in model.state_dict().items()}
        target = min(target, self.state.mask.remaining)
        if self.hp.pruning.scope in ("erk", "chain"):
            new_mask = select({n: weights[n].abs() for n in self.state.mask}, self.state.mask, target,
                              self.hp.pruning.scope, layer_counts=self.layer_counts(r + 1))
        else:
            new_mask = magnitude_prune(self.state.mask, weights, target_remaining=target, scope=self.hp.pruning.scope)
        record = {
            "round": r,
            "trained_sparsity": self.state.mask.sparsity,
            "sparsity": new_mask.sparsity,
            "pruning_train_loss": res.train_loss,
            "pruning_accuracy": fit["accuracy"],
            "pruning_set_size": len(self.pruning_data),
            "pruning_images_seen": examples_drawn(len(self.pruning_data), hp.batch_size, res.steps),
        }
        self.state.mask = new_mask
        self.state.round = r + 1
        self.state.history.append(record)
        return record

    def layer_counts(self, round: int) -> Optional[dict[str, int]]:
        """With `pruning.scope: chain`, each layer's count of kept weights in the allocation chain's mask
        of `round`; else None."""
        if self.hp.pruning.scope != "chain":
            return None
        if round not in self.allocation:
            raise ConfigError("allocation_from", f"no mask of round {round} of the allocation chain was given",
                              "open the chain through prunelab.runner, which computes that chain's masks")
        other = self.allocation[round]
        if list(other) != list(self.state.mask):
            raise ConfigError("allocation_from", "the allocation chain's mask has other layers",
                              "take the allocation of a chain of the same model and pruning settings")
        return {n: int(m.sum()) for n, m in other.items()}

    def score_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real training images a mask at initialization is scored on: the first
        `pruning.score_examples` of the chain's seeded order, normalized, unaugmented."""
        data = self.data.train
        g = torch.Generator().manual_seed(derive_seed(mask_seed(self.hp), "score", "order"))
        idx = torch.randperm(len(data), generator=g)[:self.hp.pruning.score_examples]
        return data.normalize(data.pixels(data.x[idx].to(self.device))), data.y[idx].to(self.device)

    def _step_at_init(self) -> dict:
        """One round of a chain whose masks are found at initialization (`pruning.method`): the mask
        at the next round's sparsity, one-shot from the dense rewind point (synflow: iteratively)."""
        r = self.state.round
        p = self.hp.pruning
        model = self.new_model()
        dense = Mask.ones_like(model, p.prune_classifier)
        model = load_subnetwork(model, self.state.rewind_point, dense).to(self.device)
        target = int(round(dense.total * density_after(r + 1, p.fraction)))
        batch = self.score_batch()
        new_mask = find_mask(p.method, model, dense, target, scope=p.scope,
                             batch=None if p.method in DATA_FREE else batch,
                             # per method and allocation: two random sources of one seed draw independently
                             seed=derive_seed(mask_seed(self.hp), "source", p.method, p.scope),
                             iterations=p.synflow_iterations,
                             input_shape=self.data.train.shape, layer_counts=self.layer_counts(r + 1))
        # how the masked initialization does on the scored images: the round's record, like IMP's fit
        model = load_subnetwork(model, self.state.rewind_point, new_mask).to(self.device).eval()
        with torch.no_grad():
            logits = model(batch[0])
        scored = 0 if p.method in DATA_FREE else len(batch[1])
        record = {
            "round": r,
            "trained_sparsity": self.state.mask.sparsity,
            "sparsity": new_mask.sparsity,
            "pruning_train_loss": float(torch.nn.functional.cross_entropy(logits.float(), batch[1])),
            "pruning_accuracy": float((logits.argmax(1) == batch[1]).float().mean()),
            "pruning_set_size": scored,
            "pruning_images_seen": scored,
        }
        self.state.mask = new_mask
        self.state.round = r + 1
        self.state.history.append(record)
        return record

    def run(self, callback=None) -> list[dict]:
        """Advance until `hp.pruning.rounds` rounds are done."""
        out = []
        while not self.done:
            out.append(self.step(callback))
        return out

    def evaluate(self, seed: Optional[int] = None, eval_every: int = 0, callback=None) -> dict:
        """Train the current subnetwork (rewind point ⊙ mask) on the real training set; test metrics.

        `seed` (default `hp.seed`, whatever `seed_scope`) picks the data order and augmentation."""
        seed = self.hp.seed if seed is None else seed
        _, metrics = train_subnetwork(
            self.hp, self.data, self.state.rewind_point, self.state.mask, device=self.device,
            seed=derive_seed(seed, "evaluate"),
            eval_every=eval_every, callback=callback)
        metrics.update(round=self.state.round, sparsity=self.state.mask.sparsity)
        return metrics
