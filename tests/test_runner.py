"""`prunelab.runner.run_chain`, the one chain loop of the CLI and the sweep trainable: it steps,
saves and evaluates through the store, reuses what the store holds, and its masks are the chain's."""

from __future__ import annotations

import json

from prunelab import cli
from prunelab.chain import Chain
from prunelab.data import load_dataset
from prunelab.evaluation import EvalHparams, result_key
from prunelab.hparams import ChainHparams
from prunelab.runner import run_chain
from prunelab.store import ChainStore

TINY = {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 4}, "pruning": {"rounds": 2},
        "pruning_training": {"epochs": 1, "lr": 0.05}, "training": {"epochs": 1, "lr": 0.05}}
EV = EvalHparams(lmc=False)


def test_run_chain_steps_saves_and_evaluates_then_reuses_the_store(tmp_path):
    hp = ChainHparams.from_dict(TINY)
    data = load_dataset(hp.dataset)
    seen = {"open": 0, "rounds": [], "evals": []}

    def opened(chain):
        seen["open"] += 1

    chain = run_chain(hp, EV, [0, 2], ChainStore(tmp_path, hp), data=data, on_open=opened,
                      on_round=lambda c, rec: seen["rounds"].append(rec["round"]),
                      on_eval=lambda c, r, res: seen["evals"].append(r))
    assert seen == {"open": 1, "rounds": [0, 1], "evals": [0, 2]}
    reference = Chain(hp, data=data)
    reference.run()
    assert chain.mask.equal(reference.mask)
    store = ChainStore(tmp_path, hp)
    assert store.load_state().round == 2 and store.complete(result_key(EV), [0, 2])

    # a second run finds everything in the store: no round is trained, no evaluation repeated
    again = {"rounds": [], "evals": []}
    chain = run_chain(hp, EV, [0, 2], ChainStore(tmp_path, hp), data=data,
                      on_round=lambda c, rec: again["rounds"].append(rec["round"]),
                      on_eval=lambda c, r, res: again["evals"].append(r))
    assert again == {"rounds": [], "evals": []} and chain.mask.equal(reference.mask)

    # a longer chain of the same config continues the stored one (rounds are not hashed)
    longer = ChainHparams.from_dict({**TINY, "pruning": {"rounds": 3}})
    more = []
    run_chain(longer, EV, [3], ChainStore(tmp_path, longer), data=data,
              on_round=lambda c, rec: more.append(rec["round"]))
    assert more == [2]


def test_the_cli_runs_through_the_store_and_resumes_from_it(tmp_path, capsys):
    args = ["run", "--set", "model.width=4", "pruning.rounds=2", "pruning_training.epochs=1", "training.epochs=1",
            "--eval-rounds", "0,2", "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.count("trained on pruning data") == 2 and first.count("test accuracy") == 2
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [e["round"] for e in results["evaluations"]] == [0, 2]
    assert results["evaluations"][1]["sparsity"] > 0.3

    assert cli.main(args) == 0  # the same --out: the store has it all
    second = capsys.readouterr().out
    assert "trained on pruning data" not in second and "test accuracy" not in second
    assert json.loads((tmp_path / "out" / "results.json").read_text())["evaluations"] == results["evaluations"]


def test_the_cli_rejects_rounds_past_the_chain(tmp_path, capsys):
    assert cli.main(["run", "--set", "pruning.rounds=2", "--eval-rounds", "0,5", "--out", str(tmp_path)]) == 2
    assert "--eval-rounds" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing computed, nothing written
