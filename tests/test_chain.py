import pytest
import torch

from prunelab.chain import Chain, ChainState, CorruptStateError
from prunelab.errors import ConfigError
from prunelab.hparams import ChainHparams
from prunelab.masks import masked_state


def test_rounds_reach_paper_sparsities(digits, tiny_chain_hp):
    c = Chain(tiny_chain_hp, data=digits)
    for r in range(1, 4):
        rec = c.step()
        assert abs(c.mask.remaining - c.mask.total * 0.8 ** r) <= 1
        assert rec["round"] == r - 1 and rec["pruning_set_size"] == len(digits.train)
    assert c.done
    with pytest.raises(RuntimeError):
        c.step()


def test_rewound_subnetwork_is_init_times_mask(digits, tiny_chain_hp):
    c = Chain(tiny_chain_hp, data=digits)
    c.step()
    sub = c.subnetwork().state_dict()
    expect = masked_state(c.state.init, c.mask)
    assert all(torch.equal(sub[k], expect[k]) for k in expect)
    # the init itself does not change across rounds
    c2 = Chain(tiny_chain_hp, data=digits)
    assert all(torch.equal(c.state.init[k], c2.state.init[k]) for k in c.state.init)


def test_same_config_gives_bit_identical_mask(digits, tiny_chain_hp):
    a, b = Chain(tiny_chain_hp, data=digits), Chain(tiny_chain_hp, data=digits)
    a.run(), b.run()
    assert a.mask.equal(b.mask) and a.mask.hash() == b.mask.hash()
    c = Chain(tiny_chain_hp.replace(seed=1), data=digits)
    c.run()
    assert not c.mask.equal(a.mask)


def test_checkpoint_restore_continues_to_same_mask(digits, tiny_chain_hp):
    ref = Chain(tiny_chain_hp, data=digits)
    ref.run()
    first = Chain(tiny_chain_hp, data=digits)
    first.step()
    blob = first.state.to_bytes()
    del first
    resumed = Chain(tiny_chain_hp, data=digits, state=ChainState.from_bytes(blob))
    assert resumed.round == 1
    resumed.run()
    assert resumed.mask.equal(ref.mask)
    assert [h["sparsity"] for h in resumed.state.history] == [h["sparsity"] for h in ref.state.history]


def test_corrupted_state_is_detected(digits, tiny_chain_hp):
    blob = Chain(tiny_chain_hp, data=digits).state.to_bytes()
    with pytest.raises(CorruptStateError, match="checksum"):
        ChainState.from_bytes(blob[:-10])
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF
    with pytest.raises(CorruptStateError):
        ChainState.from_bytes(bytes(flipped))
    other = tiny_chain_hp.replace(seed=9)
    with pytest.raises(ConfigError, match="checkpoint belongs"):
        Chain(other, data=digits, state=ChainState.from_bytes(blob))


def test_rewind_to_epoch_k(digits, tiny_chain_hp):
    hp = ChainHparams.from_dict({**tiny_chain_hp.to_dict(), "pruning": {"rounds": 1, "rewind_epoch": 1}})
    c = Chain(hp, data=digits)
    assert c.state.rewind is not None
    assert not torch.equal(c.state.rewind["classifier.weight"], c.state.init["classifier.weight"])
    c.step()
    sub = c.subnetwork().state_dict()
    assert torch.equal(sub["classifier.weight"], c.state.rewind["classifier.weight"] * c.mask["classifier.weight"])


def test_combined_chain_starts_from_a_given_mask(digits, tiny_chain_hp):
    first = Chain(tiny_chain_hp, data=digits)
    first.step(), first.step()
    hp = tiny_chain_hp.replace(pruning=tiny_chain_hp.pruning.replace(rounds=3))
    combined = Chain(hp, data=digits, start_mask=first.mask, start_round=2)
    rec = combined.step()
    assert rec["trained_sparsity"] == pytest.approx(first.mask.sparsity)
    assert not (combined.mask["classifier.weight"] & ~first.mask["classifier.weight"]).any()
    assert abs(combined.mask.remaining - combined.mask.total * 0.8 ** 3) <= 1


def test_digits_subnetwork_at_60_percent_beats_chance_clearly(digits):
    hp = ChainHparams.from_dict({
        "model": {"name": "convnet3", "width": 16},
        "pruning": {"rounds": 4},
        "pruning_training": {"epochs": 6, "lr": 0.05},
        "training": {"epochs": 8, "lr": 0.05},
    })
    c = Chain(hp, data=digits)
    c.run()
    assert c.sparsity == pytest.approx(0.59, abs=0.01)
    m = c.evaluate()
    assert m["test_accuracy"] > 0.8  # chance is 0.1


def test_pruning_data_can_be_any_tensor_set(digits, tiny_chain_hp):
    small = digits.train.subset(torch.arange(100))
    c = Chain(tiny_chain_hp, data=digits, pruning_data=small)
    rec = c.step()
    assert rec["pruning_set_size"] == 100
