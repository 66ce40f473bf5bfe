"""Data-parallel training matches one process; streamed batches match device-resident ones."""

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from prunelab.data import load_dataset
from prunelab.data.stream import (StreamingBatches, open_folder, resident_fits,
                                  save_folder)
from prunelab.errors import ConfigError, DataNotFoundError
from prunelab.evaluation import EvalHparams, result_key
from prunelab.hparams import ChainHparams, ModelHparams, TrainingHparams
from prunelab.masks import Mask, magnitude_prune
from prunelab.models import build_model
from prunelab.parallel import _sync_batchnorm, check_world_size, lead_or_follow, run_workers, train_data_parallel
from prunelab.runner import run_chain
from prunelab.store import ChainStore
from prunelab.train import DataOrder, Loop, ResidentBatches, steps_per_epoch, train, train_each

ORDER_SEED, AUG_SEED = 7, 11
# the batch's float32 sums are split over two ranks and reduced in another order than one process's,
# so the weights differ by rounding that SGD carries along: at most 2e-7 after these 46 steps
# (|w| <= 1.2; 9e-7 after 230), a fifth of ATOL
RTOL, ATOL = 1e-5, 1e-6


def _model(data):
    return build_model(ModelHparams(name="convnet3", width=8), data.shape, data.num_classes, seed=0)


def _hp(**kw):
    return TrainingHparams(**{"batch_size": 64, "epochs": 2, "lr": 0.05, "augment": "standard", **kw})


def _train_worker(rank, world_size, runs, state, mask, hp):
    """Each (name, data, stream) of `runs` trained data-parallel from `state`: name -> (weights, result, epochs)."""
    torch.set_num_threads(1)
    out = {}
    for name, data, stream in runs:
        model = _model(data)
        model.load_state_dict(state)
        epochs = []
        res = train_data_parallel(model, data, hp, rank=rank, world_size=world_size, order_seed=ORDER_SEED,
                                  aug_seed=AUG_SEED, mask=mask, stream=stream,
                                  callback=lambda epoch, metrics: epochs.append((epoch, metrics["train_loss"])))
        out[name] = (model.state_dict(), res, epochs)
    return out


def test_two_workers_match_one_process(digits):
    data, hp = digits.train, _hp()
    # 65 examples at batch 64: each epoch ends with a batch of one, so rank 0's slice of it is empty
    small = data.subset(torch.arange(65))
    init = _model(data).state_dict()
    mask = magnitude_prune(Mask.ones_like(_model(data)), init, 0.5)
    runs = [("resident", data, False), ("streamed", data, True), ("small", small, False)]
    out = run_workers(_train_worker, 2, runs, init, mask, hp)

    for name, d, _ in runs:
        ref = _model(d)
        ref.load_state_dict(init)
        res = train(ref, d, hp, order_seed=ORDER_SEED, aug_seed=AUG_SEED, mask=mask)
        weights, par, epochs = out[name]
        assert par.steps == res.steps == 2 * steps_per_epoch(len(d), hp.batch_size)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(weights[k], v, rtol=RTOL, atol=ATOL, msg=f"{name}: {k}")
        assert all(not weights[k][~m].any() for k, m in mask.items())  # pruned weights stayed zero
        assert [e for e, _ in epochs] == [1, 2]
        assert [loss for _, loss in epochs] == pytest.approx([h["train_loss"] for h in res.history], rel=1e-5)
        assert [h["train_loss"] for h in par.history] == [loss for _, loss in epochs]
        # two weights within the deviation of each other at the 20 % threshold could swap; the
        # magnitudes next to it lie much further apart (1e-3 on the full set), so the masks are the same
        assert all(torch.equal(a, b) for a, b in zip(magnitude_prune(mask, weights, 0.2).values(),
                                                     magnitude_prune(mask, ref.state_dict(), 0.2).values()))
    # the streamed batches are the resident ones: the same run bit for bit
    assert all(torch.equal(out["streamed"][0][k], v) for k, v in out["resident"][0].items())


def test_batch_size_must_split_over_the_workers(digits):
    hp = _hp()
    check_world_size(hp, 4)
    with pytest.raises(ConfigError, match=r"training\.batch_size.*multiple of 3 \(e\.g\. 63 or 66\)"):
        check_world_size(hp, 3)
    # checked first: no process group exists, none is needed to learn it
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match=r"training\.batch_size"):
        train_data_parallel(_model(digits.train), digits.train, hp, rank=0, world_size=3)
    with pytest.raises(ConfigError, match="sync_bn"):
        train_data_parallel(_model(digits.train), digits.train, hp, rank=0, world_size=2, sync_bn=True)
    with pytest.raises(RuntimeError, match="process group"):
        train_data_parallel(_model(digits.train), digits.train, hp, rank=0, world_size=2)


def test_sync_batchnorm_swaps_in_and_back():
    model = build_model(ModelHparams(name="resnet10_bn", width=4), (3, 32, 32), 10, seed=0)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bns
    with _sync_batchnorm(model, True):
        for n, m in bns.items():
            sync = model.get_submodule(n)
            # the learned parameters and statistics land in the original layers' tensors
            assert isinstance(sync, nn.SyncBatchNorm)
            assert sync.weight is m.weight and sync.running_mean is m.running_mean
    assert all(model.get_submodule(n) is m for n, m in bns.items())


@pytest.fixture(scope="module")
def uint8_set(digits):
    """The digits training set stored as uint8 pixels, as the image sets are."""
    return digits.train.with_images((digits.train.x * 255).round().to(torch.uint8))


def test_streamed_order_is_the_resident_order(uint8_set):
    # labels = example indices, so the targets of a batch are the indices the path gathered
    n = len(uint8_set)
    data = uint8_set.with_images(uint8_set.x, y=torch.arange(n))
    hp = _hp(batch_size=100, epochs=4)
    spe = steps_per_epoch(n, hp.batch_size)
    for start in (0, spe + 5):
        stop = start + 2 * spe
        order = DataOrder(ORDER_SEED, n, hp.batch_size, start)
        expected = [order.indices(step) for step in range(start, stop)]
        streamed = StreamingBatches(data, hp, ORDER_SEED, AUG_SEED, start, stop_step=stop)
        resident = ResidentBatches(Loop.make(data, hp, "cpu", stop), ORDER_SEED, AUG_SEED, start)
        assert len(streamed) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(streamed.sampler, expected))
        assert all(torch.equal(y, i) for (_, y), i in zip(streamed, expected, strict=True))
        assert all(torch.equal(y, i) for (_, y), i in zip(resident, expected, strict=True))
    # a fresh permutation every epoch: each epoch holds every example once
    assert torch.equal(torch.cat(expected[spe - 5:2 * spe - 5]).sort().values, torch.arange(n))


@pytest.mark.parametrize("augment", ["standard", "standard_cutmix"])
def test_streamed_batches_are_the_resident_batches(uint8_set, tmp_path, augment):
    hp = _hp(augment=augment)
    start = steps_per_epoch(len(uint8_set), hp.batch_size) - 3  # across an epoch boundary
    stop = start + 8
    resident = list(ResidentBatches(Loop.make(uint8_set, hp, "cpu", stop), ORDER_SEED, AUG_SEED, start))
    folder = save_folder(uint8_set, tmp_path / "set")
    for source, workers in ((uint8_set, 0), (uint8_set, 1), (folder, 0)):
        streamed = list(StreamingBatches(source, hp, ORDER_SEED, AUG_SEED, start, stop_step=stop,
                                         num_workers=workers))
        assert len(streamed) == len(resident) == 8
        for (xs, ys), (xr, yr) in zip(streamed, resident):
            assert torch.equal(xs, xr) and torch.equal(ys, yr)
    if augment == "standard_cutmix":
        assert any(yr.ndim == 2 for _, yr in resident)  # soft labels were drawn and matched


def test_streaming_folder(uint8_set, tmp_path):
    back = open_folder(save_folder(uint8_set, tmp_path / "set"))
    assert torch.equal(back.x, uint8_set.x) and torch.equal(back.y, uint8_set.y)
    assert (back.num_classes, back.mean, back.std, back.crop_pad, back.flip) == \
        (uint8_set.num_classes, uint8_set.mean, uint8_set.std, uint8_set.crop_pad, uint8_set.flip)
    with pytest.raises(DataNotFoundError, match="save_folder"):
        open_folder(tmp_path / "nothing")


def test_resident_fits_respects_a_byte_budget(uint8_set):
    size = uint8_set.nbytes
    assert resident_fits(uint8_set, "cpu")  # the CPU holds the set unless a budget says otherwise
    assert resident_fits(uint8_set, "cpu", budget_bytes=2 * size)  # half the budget, the default fraction
    assert not resident_fits(uint8_set, "cpu", budget_bytes=2 * size - 1)
    assert resident_fits(uint8_set, "cpu", fraction=1.0, budget_bytes=size)
    assert not resident_fits(uint8_set, "cpu", fraction=0.25, budget_bytes=2 * size)


# ------------------------------------------------------------------------------------------------
# A whole chain data-parallel: rank 0 runs the chain runner, every training is shared by both ranks

DP_CHAIN = {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 4},
            "pruning": {"rounds": 2, "rewind_epoch": 1},
            "pruning_training": {"epochs": 3, "lr": 0.05, "batch_size": 128},
            "training": {"epochs": 2, "lr": 0.05, "batch_size": 128}}
DP_EVAL = {"rounds": [2], "lmc": True, "lmc_hparams": {"num_points": 3, "stacked": True}}


def _kill_once(marker: Path, seen: Path):
    """Round callbacks writing (round, epoch) to `seen`; the first run dies by SIGKILL at the end of
    round 1's epoch 2 (after that epoch's mid-round checkpoint), as a preempted machine would."""
    def for_round(r):
        def hook(epoch, metrics):
            with seen.open("a") as f:
                f.write(f"{r} {epoch}\n")
            if (r, epoch) == (1, 2) and not marker.exists():
                marker.write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
        return hook
    return for_round


def _chain_worker(rank, world_size, root, kill_dir=None):
    """DP_CHAIN through the chain runner and the store at `root`, as rank `rank` of `world_size`."""
    torch.set_num_threads(1)
    hp, ev = ChainHparams.from_dict(DP_CHAIN), EvalHparams.from_dict(DP_EVAL)
    data = load_dataset(hp.dataset)
    leader = lead_or_follow(rank, world_size, "cpu", {"train": data.train})
    if leader is None:
        return None
    hooks = {}
    if kill_dir is not None:
        hooks = {"round_callback": _kill_once(Path(kill_dir) / "killed", Path(kill_dir) / "seen"),
                 "checkpoint_every_s": 0}
    with leader:
        chain = run_chain(hp, ev, ev.rounds, ChainStore(root, hp), data=data, **hooks)
    return {"mask": chain.mask, "rewind": chain.state.rewind, "eval": ChainStore(root, hp).load_eval(result_key(ev), 2),
            "pairs_in_parts": leader.trained_in_parts}


@pytest.fixture(scope="module")
def one_process_chain(tmp_path_factory):
    """DP_CHAIN run by one process (the reference of the data-parallel runs)."""
    root = tmp_path_factory.mktemp("one")
    hp, ev = ChainHparams.from_dict(DP_CHAIN), EvalHparams.from_dict(DP_EVAL)
    chain = run_chain(hp, ev, ev.rounds, ChainStore(root, hp))
    return {"mask": chain.mask, "rewind": chain.state.rewind, "eval": ChainStore(root, hp).load_eval(result_key(ev), 2)}


def test_a_chain_trained_by_two_workers_matches_one_process(tmp_path, one_process_chain):
    # Rewinding (1 epoch), 2 rounds of 3 epochs on the pruning data, then the LMC pair at round 2: every
    # training of the chain ran on both ranks. ConvNet-3 has no batch norm, so two workers at batch 128
    # compute the gradient of the same global batch as one process, summed in another order: the weights
    # differ by float rounding only (measured: at most ~1e-6 here), and a mask could differ only where two
    # magnitudes at the pruning threshold lie within that of each other (none did in this run).
    out = run_workers(_chain_worker, 2, str(tmp_path))
    assert out["pairs_in_parts"] == 1  # the LMC pair: one copy on each worker, at once
    ref = one_process_chain
    for k, v in ref["rewind"].items():
        torch.testing.assert_close(out["rewind"][k], v, rtol=RTOL, atol=ATOL, msg=k)
    assert list(out["mask"]) == list(ref["mask"])
    assert all(torch.equal(a, b) for a, b in zip(out["mask"].values(), ref["mask"].values()))
    m, r = out["eval"]["metrics"], ref["eval"]["metrics"]
    assert m["test_accuracy"] == pytest.approx(r["test_accuracy"], abs=2 / 360)  # at most 2 test images
    assert m["barrier_mid_train_loss"] == pytest.approx(r["barrier_mid_train_loss"], rel=1e-3, abs=1e-4)


def test_a_data_parallel_chain_killed_mid_round_resumes_from_the_store(tmp_path, one_process_chain):
    # rank 0 dies (SIGKILL) after round 1's first epoch (epoch 2: rounds start from the rewind point,
    # epoch 1); the group is run again (run_workers does so once after a death by signal, as Ray Train /
    # Tune retry a failed trial) and goes on from the store: the rounds done and round 1's mid-round
    # checkpoint, to the mask of an uninterrupted run
    kill_dir = tmp_path / "faults"
    kill_dir.mkdir()
    out = run_workers(_chain_worker, 2, str(tmp_path / "store"), str(kill_dir))
    assert (kill_dir / "killed").exists()
    seen = [tuple(map(int, line.split())) for line in (kill_dir / "seen").read_text().splitlines()]
    # the first run: round 0's two epochs and round 1's first; the rerun: only round 1's last
    assert seen == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert all(torch.equal(a, b) for a, b in zip(out["mask"].values(), one_process_chain["mask"].values()))
    assert out["eval"] is not None


def test_the_chain_cli_runs_data_parallel(tmp_path, capsys):
    from prunelab import cli

    small = ["--set", "pruning.rounds=2", "pruning_training.epochs=2", "training.epochs=2", "--eval-rounds", "2"]
    assert cli.main(["run", "--workers", "3", *small]) == 2  # batch 64 over 3 workers: refused, nothing run
    assert "training.batch_size: 64 does not split evenly over 3 workers" in capsys.readouterr().err
    assert cli.main(["run", "--workers", "2", "--out", str(tmp_path / "two"), *small]) == 0
    assert cli.main(["run", "--out", str(tmp_path / "one"), *small]) == 0
    # ConvNet-3 (no batch norm): one process's mask (float rounding apart, as above)
    assert Mask.load(tmp_path / "two" / "mask.pt").equal(Mask.load(tmp_path / "one" / "mask.pt"))


class _Fault(RuntimeError):
    pass


def _digits_leader(rank, world_size):
    """On rank 0: the digits set and a Leader of the group; on the others: they follow, then None."""
    torch.set_num_threads(1)
    data = load_dataset(ChainHparams.from_dict(DP_CHAIN).dataset)
    leader = lead_or_follow(rank, world_size, "cpu", {"train": data.train})
    return None if leader is None else (data, leader)


def _leader_fails_worker(rank, world_size, state, hp):
    """Rank 0's epoch callback raises in a first training; then a second training runs whole."""
    if (given := _digits_leader(rank, world_size)) is None:
        return None
    data, leader = given
    with leader:
        model = _model(data.train)
        model.load_state_dict(state)

        def fail(epoch, metrics):
            raise _Fault(f"rank 0's callback failed at epoch {epoch}")

        try:
            train(model, data.train, hp, order_seed=ORDER_SEED, callback=fail)
        except _Fault as e:
            caught = str(e)
        model.load_state_dict(state)
        train(model, data.train, hp, order_seed=ORDER_SEED)
    return caught, model.state_dict()


def test_a_failure_in_rank_0s_part_of_a_training_ends_it_on_every_rank(digits):
    # e.g. its mid-round checkpoint finding the chain's lease taken over: the runner goes on, so the
    # followers must have left that training too, and listen for the next one
    hp = _hp(augment="none")
    init = _model(digits.train).state_dict()
    caught, weights = run_workers(_leader_fails_worker, 2, init, hp)
    assert caught == "rank 0's callback failed at epoch 1"
    ref = _model(digits.train)
    ref.load_state_dict(init)
    train(ref, digits.train, hp, order_seed=ORDER_SEED)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=RTOL, atol=ATOL, msg=k)


def _pair_worker(rank, world_size, state, hp):
    """Two copies of one network, two data orders, through `train_each` inside a Leader of 2 ranks."""
    if (given := _digits_leader(rank, world_size)) is None:
        return None
    data, leader = given
    with leader:
        models = [_model(data.train) for _ in range(2)]
        for m in models:
            m.load_state_dict(state)
        results = train_each([(m, data.train, hp, {"order_seed": s, "aug_seed": s + 1})
                              for s, m in zip((3, 5), models)])
    return [m.state_dict() for m in models], results, leader.trained_in_parts


def test_two_copies_train_at_once_on_two_workers(digits):
    # each copy on one worker at the full global batch: one process's copies up to float rounding
    hp = _hp()
    init = _model(digits.train).state_dict()
    weights, results, in_parts = run_workers(_pair_worker, 2, init, hp)
    assert in_parts == 1
    for s, w, res in zip((3, 5), weights, results):
        ref = _model(digits.train)
        ref.load_state_dict(init)
        want = train(ref, digits.train, hp, order_seed=s, aug_seed=s + 1)
        assert res.steps == want.steps and res.train_loss == pytest.approx(want.train_loss, rel=1e-5)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(w[k], v, rtol=RTOL, atol=ATOL, msg=f"seed {s}: {k}")
    assert not all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))  # two orders
