"""Data-parallel training matches one process; streamed batches match device-resident ones."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from prunelab.data.stream import (StreamingBatches, open_folder, resident_batches, resident_fits,
                                  save_folder)
from prunelab.errors import ConfigError, DataNotFoundError
from prunelab.hparams import ModelHparams, TrainingHparams
from prunelab.masks import Mask, magnitude_prune
from prunelab.models import build_model
from prunelab.parallel import _sync_batchnorm, check_world_size, run_workers, train_data_parallel
from prunelab.train import DataOrder, Loop, steps_per_epoch, train

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
        resident = resident_batches(Loop.make(data, hp, "cpu", stop), ORDER_SEED, AUG_SEED, start)
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
    resident = list(resident_batches(Loop.make(uint8_set, hp, "cpu", stop), ORDER_SEED, AUG_SEED, start))
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
