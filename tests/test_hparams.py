import json

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
    import prunelab.catalog as catalog

    real = ChainHparams()
    distilled = ChainHparams.from_dict({"pruning_data": {"kind": "distilled", "method": "dm", "ipc": 10}})
    before = (real.hash(), distilled.hash())
    monkeypatch.setattr(catalog, "SYNTHETIC_CODE_VERSION", catalog.SYNTHETIC_CODE_VERSION + 1)
    assert real.hash() == before[0] and distilled.hash() != before[1]


def test_dense_chain_is_evaluated_at_round_zero_only():
    from prunelab.evaluation import EvalHparams

    dense = ChainHparams.from_dict({"pruning": {"rounds": 0}})
    assert EvalHparams(sparsities=(0.6, 0.87)).resolve_rounds(dense) == [0]


def test_switches_added_later_keep_stored_hashes():
    """compile_mode and the stacked switches are left out of hashes while off: these are the hashes
    of the same configs from before those fields existed."""
    from prunelab.evaluation import EvalHparams, result_key

    assert ChainHparams().hash() == "2ab6df90f501b7d2"
    assert result_key(EvalHparams(lmc=False)) == "e42743785b5a3cb4"
    # LMC evaluations record both BN modes since the key below: older ones (keys 6df619d024f714cc and
    # 4eb88c8219c04278) hold one mode and are not reused for them
    assert result_key(EvalHparams()) == "b6a7646dedbc980d"
    assert result_key(EvalHparams(landscape=True, hessian=True)) == "9a1205339d11ef87"
    assert result_key(EvalHparams(controls=("shuffled",))) != result_key(EvalHparams())
    on = ChainHparams.from_dict({"training": {"compile": True, "compile_mode": "reduce-overhead"}})
    assert on.hash() != ChainHparams.from_dict({"training": {"compile": True}}).hash()
    assert "compile_mode" in ChainHparams().to_dict()["training"]  # still in the config itself


def test_start_chain_configs_hash_alike_with_or_without_default_switches():
    start = ChainHparams().to_dict()
    bare = json.loads(json.dumps(start))
    for phase in ("training", "pruning_training"):
        del bare[phase]["compile_mode"]
    a = ChainHparams.from_dict({"start_from": start, "start_round": 2, "pruning": {"rounds": 4}})
    b = ChainHparams.from_dict({"start_from": bare, "start_round": 2, "pruning": {"rounds": 4}})
    assert a.hash() == b.hash()
    fast = json.loads(json.dumps(start))
    fast["training"].update(compile=True, compile_mode="max-autotune")
    c = ChainHparams.from_dict({"start_from": fast, "start_round": 2, "pruning": {"rounds": 4}})
    assert c.hash() != a.hash()


def test_compile_mode_needs_compile():
    with pytest.raises(ConfigError) as e:
        ChainHparams.from_dict({"pruning_training": {"compile_mode": "reduce-overhead"}})
    assert e.value.field == "pruning_training.compile_mode" and "compile: true" in e.value.fix
    with pytest.raises(ConfigError) as e:
        ChainHparams.from_dict({"training": {"compile": True, "compile_mode": "fast"}})
    assert e.value.field == "training.compile_mode"


def test_compile_mode_reaches_torch_compile(monkeypatch):
    import torch

    from prunelab.train import prepare

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    model = torch.nn.Linear(2, 2)
    assert prepare(model, TrainingHparams(), torch.device("cpu")) is model and seen == []
    prepare(model, TrainingHparams(compile=True), torch.device("cpu"))
    prepare(model, TrainingHparams(compile=True, compile_mode="reduce-overhead"), torch.device("cpu"))
    assert seen == [None, "reduce-overhead"]
