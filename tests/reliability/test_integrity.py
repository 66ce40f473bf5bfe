"""Damaged files are detected and reported by name, never loaded as if they were good.

Chain states, masks, stored evaluations and synthetic sets carry a checksum. A damaged latest state
falls back to the previous one; a damaged mask is rewritten from the state that holds it, or stops
with a message naming the file; a damaged evaluation is computed again.
"""

from __future__ import annotations

import json

import pytest
import torch

from prunelab.chain import Chain, CorruptStateError
from prunelab.errors import CorruptFileError
from prunelab.evaluation import EvalHparams, evaluate_round, result_key
from prunelab.hparams import ChainHparams
from prunelab.masks import Mask
from prunelab.store import ChainStore


@pytest.fixture
def stored_chain(tmp_path, digits):
    """A 3-round chain saved to a store after every round."""
    hp = ChainHparams.from_dict({"model": {"name": "convnet3", "width": 8}, "pruning": {"rounds": 3},
                                 "pruning_training": {"epochs": 1, "lr": 0.05}, "training": {"epochs": 1}})
    store = ChainStore(tmp_path / "store", hp)
    chain = Chain(hp, data=digits)
    store.save_state(chain.state)
    while not chain.done:
        chain.step()
        store.save_state(chain.state)
    return hp, store, chain


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def flip_byte(path, at: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_byte])
def test_damaged_state_falls_back_to_the_previous_one(stored_chain, damage):
    hp, store, chain = stored_chain
    damage(store.dir / "state.pt")
    reports = []
    state = store.load_state(on_corrupt=reports.append)
    assert state is not None and state.round == 2  # the state before the last round
    assert len(reports) == 1 and str(store.dir / "state.pt") in reports[0]
    # resuming from it ends with the same mask as the undamaged chain
    resumed = Chain(hp, data=chain.data, state=state)
    resumed.run()
    assert resumed.mask.equal(chain.mask)


def test_both_states_damaged_is_an_error_naming_the_file(stored_chain):
    _, store, _ = stored_chain
    flip_byte(store.dir / "state.pt")
    flip_byte(store.dir / "state.prev.pt")
    reports = []
    assert store.load_state(on_corrupt=reports.append) is None  # the chain would start over
    assert [str(store.dir / n) in r for n, r in zip(("state.pt", "state.prev.pt"), reports)] == [True, True]
    with pytest.raises(CorruptStateError, match="state.pt: checksum mismatch"):
        store.load_state()


@pytest.mark.parametrize("damage", [truncate, flip_byte])
def test_damaged_mask_is_named_and_restored_from_the_state(stored_chain, damage, capsys):
    _, store, chain = stored_chain
    last, earlier = store.mask_path(3), store.mask_path(1)
    damage(last)
    damage(earlier)
    # the current round's mask is also in the state: rewritten from it, with a message naming the file
    assert store.mask_at(3, fallback=chain.state).equal(chain.mask)
    assert str(last) in capsys.readouterr().err
    assert Mask.load(last).equal(chain.mask)
    # an earlier round's mask exists nowhere else: a clear error, never a wrong mask
    with pytest.raises(CorruptFileError, match=f"{earlier}.*delete {store.dir}"):
        store.mask_at(1, fallback=chain.state)


def test_mask_checksum_catches_a_flip_that_still_loads(tmp_path):
    """A flipped bit in the tensor data leaves a torch file that loads as another mask: the checksum
    is what catches it."""
    import io

    from prunelab.files import unframe
    from prunelab.masks import MASK_MAGIC

    m = Mask({"w": torch.rand(64, 64) > 0.5})
    m.save(tmp_path / "m.pt")
    data = bytearray((tmp_path / "m.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor bytes of the archive
    payload = bytes(data)[len(MASK_MAGIC) + 65:]  # header line: magic, then 64 hex digits and a newline
    silently = torch.load(io.BytesIO(payload), weights_only=True)["w"]
    assert not torch.equal(silently, m["w"]), "the flip did not change the stored mask"
    (tmp_path / "m.pt").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=f"{tmp_path / 'm.pt'}: checksum mismatch"):
        Mask.load(tmp_path / "m.pt")
    with pytest.raises(CorruptFileError):
        unframe(MASK_MAGIC, bytes(data), "m.pt")


def test_damaged_evaluation_is_computed_again(stored_chain, capsys):
    hp, store, chain = stored_chain
    ev = EvalHparams.from_dict({"rounds": [3], "lmc": False})
    key = result_key(ev)
    res = evaluate_round(hp, ev, chain.data, chain.state.rewind_point, chain.mask, 3)
    store.save_eval(key, 3, res)
    assert store.load_eval(key, 3)["metrics"] == res["metrics"]
    assert store.complete(key, [3])
    path = store.dir / "evals" / key / "round_03.json"
    doc = json.loads(path.read_text())
    doc["result"]["metrics"]["test_accuracy"] = 1.0  # a silent change in a still-valid JSON file
    path.write_text(json.dumps(doc))
    assert store.load_eval(key, 3) is None
    assert str(path) in capsys.readouterr().err
    assert not store.complete(key, [3])  # so the sweep evaluates that round again
    truncate(path)
    assert store.load_eval(key, 3) is None


def test_files_written_before_checksums_still_load(stored_chain, tmp_path):
    """Stores written before masks and evaluations carried checksums keep working."""
    import io

    _, store, chain = stored_chain
    buf = io.BytesIO()
    torch.save({k: v for k, v in chain.mask.items()}, buf)  # the former mask format: a plain torch file
    store.mask_path(3).write_bytes(buf.getvalue())
    assert store.mask_at(3).equal(chain.mask)
    path = store.dir / "evals" / "oldkey" / "round_03.json"
    path.parent.mkdir(parents=True)
    old = {"round": 3, "metrics": {"test_accuracy": 0.5}, "lmc": None}
    path.write_text(json.dumps(old))  # the former evaluation format: the result itself
    assert store.load_eval("oldkey", 3) == old


def test_evaluation_checksum_survives_the_json_round_trip(stored_chain):
    """Integer keys and tuples become strings and lists in JSON: a good file must still verify."""
    _, store, _ = stored_chain
    result = {"metrics": {"a": 1.0}, "by_round": {2: 0.5, 10: 0.25}, "alphas": (0.0, 0.5, 1.0), "nan": float("nan")}
    store.save_eval("k", 1, result)
    back = store.load_eval("k", 1)
    assert back is not None and back["by_round"] == {"2": 0.5, "10": 0.25} and back["alphas"] == [0.0, 0.5, 1.0]
