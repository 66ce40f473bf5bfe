import pytest

from prunelab.errors import ConfigError
from prunelab.hparams import ChainHparams, TrainingHparams, set_path


def test_defaults_follow_the_paper():
    hp = ChainHparams()
    assert hp.pruning.fraction == 0.2 and hp.pruning.rewind_epoch == 0
    t = hp.training
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs) == ("sgd", 0.01, 0.9, 5e-4, 64, 300)
    assert t.milestones == pytest.approx((2 / 3, 5 / 6)) and t.gamma == 0.2
    assert hp.pruning_training.epochs == 1000


def test_round_trip_and_hash_is_canonical():
    hp = ChainHparams.from_dict({"model": {"name": "resnet10_bn"}, "seed": 3})
    again = ChainHparams.from_dict(hp.to_dict())
    assert again == hp and again.hash() == hp.hash()
    assert ChainHparams.from_dict({"seed": 4}).hash() != ChainHparams.from_dict({"seed": 3}).hash()


@pytest.mark.parametrize("data, field", [
    ({"modell": {}}, "modell"),
    ({"model": {"name": "vgg"}}, "model.name"),
    ({"dataset": {"name": "mnist"}}, "dataset.name"),
    ({"training": {"lr": "fast"}}, "training.lr"),
    ({"training": {"epochs": 1.5}}, "training.epochs"),
    ({"pruning": {"fraction": 1.2}}, "pruning.fraction"),
    ({"pruning": {"fraction": -0.1}}, "pruning.fraction"),
    ({"training": {"augment": "mixup"}}, "training.augment"),
    ({"training": {"milestones": [0.5, 2]}}, "training.milestones"),
    ({"pruning_data": {"kind": "idc_file"}}, "pruning_data.path"),
])
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        ChainHparams.from_dict(data)
    assert e.value.field == field
    assert field in str(e.value) and "fix" in str(e.value)


def test_yaml_style_strings_for_floats_are_accepted():
    assert TrainingHparams.from_dict({"weight_decay": "5e-4"}).weight_decay == 5e-4


def test_set_path_builds_nested_overrides():
    d = set_path({}, "training.lr", 0.1)
    assert ChainHparams.from_dict(d).training.lr == 0.1


def test_describe_lists_help():
    text = ChainHparams.describe()
    assert "fraction" in text and "remaining weights" in text


def test_chain_hash_follows_the_synthetic_code_version(monkeypatch):
    import prunelab.synthetic.store as store

    real = ChainHparams()
    distilled = ChainHparams.from_dict({"pruning_data": {"kind": "distilled", "method": "dm", "ipc": 10}})
    before = (real.hash(), distilled.hash())
    monkeypatch.setattr(store, "CODE_VERSION", store.CODE_VERSION + 1)
    assert real.hash() == before[0] and distilled.hash() != before[1]


def test_dense_chain_is_evaluated_at_round_zero_only():
    from prunelab.evaluation import EvalHparams

    dense = ChainHparams.from_dict({"pruning": {"rounds": 0}})
    assert EvalHparams(sparsities=(0.6, 0.87)).resolve_rounds(dense) == [0]
