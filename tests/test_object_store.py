"""The result store on an object store, against a real S3 API: moto's server (installed with the test
extras) on 127.0.0.1, reached through s3fs exactly as a bucket on AWS would be (endpoint and
credentials from the standard AWS environment). Nothing leaves the loopback interface.

The same checks run on a local folder, so the two backends are held to one behaviour: atomic writes,
conditional create, the lease (exclusive, renewed, released, expiring, raced for), a chain stored and
reused, a round killed part-way and resumed, one chain asked for twice and computed once, and a
two-node Ray sweep with `--storage-path s3://...` and no shared directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prunelab.blobs import open_root
from prunelab.chain import Chain
from prunelab.evaluation import EvalHparams, result_key
from prunelab.hparams import ChainHparams
from prunelab.lease import Lease
from prunelab.runner import run_chain
from prunelab.store import ChainStore
from sweeptools import (BASE, FIGURE, ROOT, free_port, mlflow_server, no_ray, rest, sweep_doc,  # noqa: F401
                        two_nodes, write_config)

BUCKET = "prunelab-test"
CHAIN = {**BASE, "pruning": {"rounds": 2}, "pruning_training": {"epochs": 2, "lr": 0.1}}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the AWS environment that points every process at it
    (this one, the driver and Ray's workers started from it); yields the bucket's URI."""
    pytest.importorskip("s3fs")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        mp.setenv(k, v)
    import fsspec

    fs = fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True)
    deadline = time.time() + 60
    while True:
        try:
            fs.mkdir(BUCKET)
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            assert server.poll() is None and time.time() < deadline, "moto's server did not start"
            time.sleep(0.3)
    yield f"s3://{BUCKET}"
    server.terminate()
    server.wait(timeout=10)
    mp.undo()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3')}/{request.node.name.replace('[', '-').replace(']', '')}-{time.time_ns()}"


def test_files_behave_alike_on_both_backends(root):
    b = open_root(root)
    assert b.read("a/x") is None and not b.exists("a/x") and b.list("a") == []
    b.write("a/x", b"one")
    b.write("a/x", b"two")  # replaced whole
    assert b.read("a/x") == b"two" and b.exists("a/x")
    assert b.create("a/y", b"first") and not b.create("a/y", b"second")
    assert b.read("a/y") == b"first"  # a refused create leaves the file as it was
    b.write("a/sub/z", b"")
    assert b.list("a") == ["sub", "x", "y"] and b.read("a/sub/z") == b""
    b.copy("a/x", "a/w")
    assert b.read("a/w") == b"two"
    b.delete("a/y")
    b.delete("a/never")
    assert not b.exists("a/y") and b.sub("a").read("sub/z") == b""


def test_a_lease_is_exclusive_renewed_released_and_expires(root):
    b = open_root(root)
    first, second = Lease(b, "L", ttl_s=60), Lease(b, "L", ttl_s=60)
    assert first.try_acquire() and not second.try_acquire()
    assert second.held_elsewhere() and not first.held_elsewhere()
    assert first.renew()
    first.release()
    assert not second.held_elsewhere() and second.try_acquire()
    # a holder that stops renewing loses the lease after ttl_s, and learns so at its next renewal
    short = Lease(b, "M", ttl_s=0.3)
    assert short.try_acquire()
    late = Lease(b, "M", ttl_s=0.3)
    assert not late.try_acquire()
    time.sleep(0.4)
    assert late.try_acquire() and not short.renew() and short.lost
    assert len(b.list("M")) <= 2  # old generations are cleared


def test_of_processes_racing_for_a_free_lease_exactly_one_wins(root):
    b = open_root(root)
    leases = [Lease(b, "race") for _ in range(8)]
    go = threading.Barrier(len(leases))
    won = []

    def take(lease):
        go.wait()
        won.append(lease.try_acquire())

    threads = [threading.Thread(target=take, args=(le,)) for le in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 7 + [True]


def store_key() -> str:
    return result_key(EvalHparams(rounds=(2,), lmc=False))


def run_tiny(root: str, digits, **kw):
    hp = ChainHparams.from_dict(CHAIN)
    return run_chain(hp, EvalHparams(rounds=(2,), lmc=False), [2], ChainStore(root, hp), data=digits, **kw)


def test_a_chain_in_a_bucket_is_the_chain_on_disk_and_is_reused(s3, tmp_path, digits, monkeypatch):
    uri = f"{s3}/reuse"
    on_disk = run_tiny(str(tmp_path / "store"), digits)
    in_bucket = run_tiny(uri, digits)
    assert in_bucket.mask.equal(on_disk.mask)
    store = ChainStore(uri, in_bucket.hp)
    assert store.mask_at(2).equal(on_disk.mask) and store.load_eval(store_key(), 2) is not None
    assert set(store.files.list("")) >= {"config.json", "evals", "history.jsonl", "rounds", "state.pt", "lease"}
    monkeypatch.setattr(Chain, "step", lambda *a, **k: pytest.fail("a stored chain was trained again"))
    again = run_tiny(uri, digits)
    assert again.mask.equal(on_disk.mask)


class Killed(BaseException):
    """Stands for SIGKILL inside one process: nothing after it runs."""


def test_a_round_killed_part_way_resumes_from_the_bucket_to_the_same_mask(s3, digits):
    reference = Chain(ChainHparams.from_dict(CHAIN), "cpu", data=digits)
    reference.run()
    uri = f"{s3}/killed"

    def die_in_round_1(r):
        if r != 1:
            return None

        def hit(epoch, metrics):
            raise Killed(f"killed in round {r} after epoch {epoch}")

        return hit

    with pytest.raises(Killed):
        run_tiny(uri, digits, round_callback=die_in_round_1, checkpoint_every_s=0.0)
    store = ChainStore(uri, ChainHparams.from_dict(CHAIN))
    assert store.load_partial(1) is not None  # the epoch before the kill is in the bucket
    resumed = run_tiny(uri, digits, checkpoint_every_s=0.0)
    assert resumed.mask.equal(reference.mask) and store.load_partial(1) is None


def test_two_processes_asking_for_one_chain_compute_it_once(s3, tmp_path):
    uri = f"{s3}/dedup"
    sets = ["model.width=8", "pruning.rounds=3", "pruning_training.epochs=3", "training.epochs=1"]
    cmd = [sys.executable, "-m", "prunelab", "run", "--store", uri, "--eval-rounds", "3", "--set", *sets]
    env = dict(os.environ, PRUNELAB_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rounds = [sum("trained on pruning data" in line for line in out.splitlines()) for out in outs]
    assert sorted(rounds) == [0, 3], outs  # one trained the chain; the other waited and reused it
    assert any("being computed by another process; waiting" in out for out in outs), outs
    finals = {line.rsplit(" ", 1)[-1] for out in outs for line in out.splitlines() if "final mask" in line}
    assert len(finals) == 1


@pytest.mark.slow
def test_a_two_node_sweep_on_a_bucket_alone(s3, two_nodes, tmp_path):
    """`--storage-path s3://...` and no shared directory (each node has its own cache folder, nothing
    declared shared); each chain's worker is SIGKILLed in round 2 once, and resumes from the bucket."""
    storage = f"{s3}/sweep"
    config = write_config(tmp_path, sweep_doc(base={**BASE, "pruning": {"rounds": 3}}, grid={"seed": [0, 1]},
                                              variants={"imp": {}}, evaluation={"rounds": [3], "lmc": False},
                                              resources={"cpus_per_trial": 1, "max_failures": 2,
                                                         "checkpoint_minutes": 0}))
    code = f"import sys; from sweeps.driver import main; sys.exit(main({FIGURE!r}, sys.argv[1:]))"
    env = dict(two_nodes.env, PRUNELAB_CACHE=str(tmp_path / "cache"), PRUNELAB_LOCAL=str(tmp_path / "local"),
               RAY_ADDRESS=two_nodes.address)
    with mlflow_server(tmp_path) as uri:
        argv = ["--config", config, "--storage-path", storage, "--address", "auto", "--no-analysis",
                "--tracking-uri", uri]
        r = subprocess.run([sys.executable, "-c", code, *argv, "--inject-fault", "2:1:imp:kill"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        exp = rest(uri, "experiments/get-by-name", {"experiment_name": f"prunelab-{FIGURE}"})["experiment"]
        found = rest(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100},
                     post=True)["runs"]
        again = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=ROOT, capture_output=True,
                               text=True, timeout=300)
    assert again.returncode == 0 and "nothing to compute" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in found]
    chains = [t for t in tags if t.get("prunelab.role") == "chain"]
    assert len(chains) == 2 and all(t["prunelab.status"] == "finished" for t in chains)
    # the masks in the bucket are those of uninterrupted chains
    bucket = open_root(f"{storage}/store")
    assert len(bucket.list("chains")) == 2
    for seed in (0, 1):
        hp = ChainHparams.from_dict({**BASE, "pruning": {"rounds": 3}, "seed": seed})
        reference = Chain(hp, "cpu")
        reference.run()
        assert ChainStore(f"{storage}/store", hp).mask_at(3).equal(reference.mask)
    kills = open_root(f"{storage}/store").list("faults")
    assert kills, "no fault was injected"
    assert not (tmp_path / "local" / "store").exists()  # nothing of the store outside the bucket
    nodes = {t["prunelab.node_id"] for t in chains}
    print(f"two-node sweep on s3: chain nodes {sorted(nodes)} of {two_nodes.ids}")


def test_a_chain_under_two_data_roots_with_the_same_files_has_one_hash(tmp_path):
    def root(name: str, content: bytes) -> str:
        d = tmp_path / name / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for f in ("data_batch_1", "test_batch"):
            (d / f).write_bytes(content + f.encode())
        return str(tmp_path / name)

    def chain(r: str) -> ChainHparams:
        return ChainHparams.from_dict({"dataset": {"name": "cifar10", "root": r}})

    laptop, cluster, other = root("laptop", b"x" * 1000), root("mnt", b"x" * 1000), root("changed", b"y" * 1000)
    assert chain(laptop).hash() == chain(cluster).hash() != chain(other).hash()
    assert chain(laptop).legacy_hash() != chain(cluster).legacy_hash()  # the identity that held paths
    # without a root (the embedded data sets) the hash is what it always was
    plain = ChainHparams.from_dict({"dataset": {"name": "digits"}})
    assert plain.hash() == plain.legacy_hash()
    # an IDC file enters by its content too
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.pt").write_bytes(b"idc" * 100)
    idc = [ChainHparams.from_dict({"pruning_data": {"kind": "idc_file", "path": str(tmp_path / n)}}) for n in "ab"]
    assert idc[0].hash() == idc[1].hash()


def test_a_store_written_under_a_path_holding_hash_is_found(tmp_path, digits):
    """Stores written before identities dropped machine paths stay valid: a chain opened under its new
    hash adopts the folder of its legacy hash, and nothing is trained again."""
    d = tmp_path / "data" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "data_batch_1").write_bytes(b"z" * 100)
    hp = ChainHparams.from_dict({**CHAIN, "dataset": {"name": "digits"}})
    with_root = hp.replace(dataset=hp.dataset.replace(root=str(tmp_path / "data")))
    assert with_root.hash() != with_root.legacy_hash()
    chain = Chain(hp, "cpu", data=digits)
    chain.run()
    # the store as an older version wrote it: under the legacy hash
    old = tmp_path / "store" / "chains" / with_root.legacy_hash()
    new_store = ChainStore(tmp_path / "elsewhere", hp)
    new_store.save_state(dataclasses.replace(chain.state, config_hash=with_root.legacy_hash()))
    old.parent.mkdir(parents=True)
    os.rename(new_store.dir, old)
    store = ChainStore(tmp_path / "store", with_root)
    # opening the store (a plan, a dry run) moves nothing: only the chain's lease holder adopts
    assert store.load_state() is None and not (old / "moved.json").exists()
    done = run_chain(with_root, EvalHparams(rounds=(), lmc=False), [], store, data=digits)
    assert done.round == chain.round and store.mask_at(2).equal(chain.mask)
    assert done.state.history == chain.state.history  # adopted, not trained again
    assert json.loads((old / "moved.json").read_text())["hash"] == with_root.hash()
    assert Path(store.dir).name == with_root.hash()


def test_a_chain_whose_data_is_absent_adopts_nothing(tmp_path, digits):
    """Away from its data root (the fingerprint says "absent") a chain's hash stands for missing
    data: the legacy folder of some other root's files is not adopted under it."""
    hp = ChainHparams.from_dict({**CHAIN, "dataset": {"name": "digits", "root": str(tmp_path / "not-here")}})
    assert not hp.paths_fingerprinted()
    old = tmp_path / "store" / "chains" / hp.legacy_hash()
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"some other machine's chain")
    (old / "history.jsonl").write_text("")
    assert not ChainStore(tmp_path / "store", hp).adopt_legacy()
    assert not (old / "moved.json").exists() and not (tmp_path / "store" / "chains" / hp.hash()).exists()


def test_a_data_root_of_links_has_the_fingerprint_of_its_files(tmp_path):
    """A root whose files are links elsewhere (a cluster's data mount) is fingerprinted by the names
    under the root and the content: the same as a root holding the files themselves."""
    from prunelab.fingerprint import clear_memo

    real = tmp_path / "real" / "cifar-10-batches-py"
    real.mkdir(parents=True)
    (real / "data_batch_1").write_bytes(b"a" * 300)
    (real / "test_batch").write_bytes(b"b" * 200)
    elsewhere = tmp_path / "blobs"
    elsewhere.mkdir()
    linked = tmp_path / "linked" / "cifar-10-batches-py"
    linked.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch"):
        (elsewhere / f"{name}.bin").write_bytes((real / name).read_bytes())
        (linked / name).symlink_to(elsewhere / f"{name}.bin")
    clear_memo()

    def chain(root):
        return ChainHparams.from_dict({"dataset": {"name": "cifar10", "root": str(root)}})

    assert chain(tmp_path / "linked").hash() == chain(tmp_path / "real").hash()
    assert chain(tmp_path / "linked").paths_fingerprinted()


def test_a_process_whose_lease_was_taken_over_writes_nothing_more(tmp_path, digits, monkeypatch):
    """A chain's process that stalled past its lease's expiry while another took the chain over
    stops before its next write, waits for that process, then finishes from the store, to the same
    mask as an uninterrupted run."""
    import prunelab.runner as runner

    monkeypatch.setattr(runner, "WAIT_POLL_S", 0.05)
    monkeypatch.setattr(ChainStore, "lease", lambda self, ttl_s=120.0, renew_s=30.0: Lease(
        self.files, "lease", ttl_s=ttl_s, renew_s=0.05))
    hp = ChainHparams.from_dict(CHAIN)
    store = ChainStore(tmp_path / "store", hp)
    rounds_seen, taken = [], threading.Event()

    def other_process() -> None:
        # the process that took over: holds the lease a while, writes nothing, lets go
        gen = max(int(n) for n in store.files.list("lease")) + 1
        doc = {"host": "another-host", "pid": 1, "token": "theirs", "renewed": time.time(), "released": False}
        assert store.files.create(f"lease/{gen:08d}", json.dumps(doc).encode())
        taken.set()
        time.sleep(1.0)
        rounds_seen.append(store.load_state().round)  # what the first process wrote meanwhile
        store.files.write(f"lease/{gen:08d}", json.dumps({**doc, "released": True}).encode())

    thread = threading.Thread(target=other_process)

    def callback(r):
        def hook(epoch, metrics):
            if r == 1 and not thread.is_alive() and not taken.is_set():
                thread.start()
                taken.wait()
                time.sleep(0.3)  # the renewal notices the newer generation
        return hook

    done = run_chain(hp, EvalHparams(rounds=(), lmc=False), [], store, data=digits, round_callback=callback)
    thread.join()
    assert rounds_seen == [1]  # round 1's end was not written while the other process held the chain
    plain = Chain(hp, "cpu", data=digits)
    plain.run()
    assert done.round == 2 and done.mask.equal(plain.mask)
    assert store.load_state().round == 2


class Switch:
    """A TCP forwarder in front of the S3 server that can go away (its port refuses connections and
    the open ones are cut, as in an outage or a restart of the service), then serve again on the same
    port."""

    def __init__(self, target: int):
        self.target = target
        self.port = free_port()
        self.open: list[socket.socket] = []
        self.listener = None
        self.up()

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.open += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        self.listener.close()
        for s in self.open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.open.clear()


def test_a_store_unreachable_mid_chain_loses_only_the_round_in_progress(s3, digits, monkeypatch):
    """The bucket becomes unreachable after round 1 is stored: the chain stops with an error naming
    the store (a trial would be retried by Tune); once the store answers again, the same chain resumes
    from round 1 and ends with the mask of an uninterrupted run."""
    hp = ChainHparams.from_dict({**CHAIN, "pruning": {"rounds": 3}})
    reference = Chain(hp, "cpu", data=digits)
    reference.run()
    switch = Switch(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{switch.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's retries: fail within seconds, not minutes
    uri = f"{s3}/outage"
    ev = EvalHparams(rounds=(), lmc=False)

    def stepped(chain, record):
        if chain.round == 1:
            switch.down()

    try:
        with pytest.raises(Exception) as failure:
            run_chain(hp, ev, [], ChainStore(uri, hp), data=digits, on_round=stepped)
        print(f"the store away: {failure.type.__name__}: {failure.value}")
        switch.up()
        trained = []
        real_step = Chain.step
        monkeypatch.setattr(Chain, "step", lambda self, **kw: trained.append(self.round) or real_step(self, **kw))
        store = ChainStore(uri, hp)
        assert store.load_state().round == 1  # what reached the store before it went away
        resumed = run_chain(hp, ev, [], store, data=digits)
    finally:
        switch.down()
    assert resumed.mask.equal(reference.mask) and trained == [1, 2]


def test_an_upload_cut_short_leaves_the_previous_file(s3, tmp_path):
    """A process killed in the middle of a (multipart) upload: the object keeps its previous content,
    so a reader never sees part of a state."""
    uri = f"{s3}/torn"
    open_root(uri).write("state.pt", b"previous")
    code = ("import os, fsspec; fs = fsspec.filesystem('s3'); f = fs.open(%r, 'wb', block_size=5 * 2**20); "
            "f.write(b'x' * (6 * 2**20)); f.flush(); os._exit(9)") % f"{BUCKET}/torn/state.pt"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr[-2000:]
    assert open_root(uri).read("state.pt") == b"previous"


def test_the_doctor_checks_a_bucket_and_its_conditional_writes(s3):
    from sweeps.doctor import check_writable

    check = check_writable("storage path", f"{s3}/doctor")
    assert check.status == "ok" and "conditional writes" in check.detail
    assert open_root(f"{s3}/doctor").list(".doctor") == []  # its probe is removed
    bad = check_writable("storage path", "hdfs://namenode/x")
    assert bad.status == "fail" and "hdfs" in bad.detail


def test_an_adopted_store_resumes(tmp_path, digits):
    """A chain adopted from its legacy hash continues to more rounds from the adopted state."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "f.bin").write_bytes(b"z" * 100)
    hp = ChainHparams.from_dict({**CHAIN, "dataset": {"name": "digits", "root": str(d)}})
    chain = Chain(hp, "cpu", data=digits)
    chain.run()
    legacy = ChainStore(tmp_path / "old", hp)
    # as an older version wrote it: the state names the legacy hash, in the legacy folder
    legacy.save_state(dataclasses.replace(chain.state, config_hash=hp.legacy_hash()))
    (tmp_path / "store" / "chains").mkdir(parents=True)
    os.rename(legacy.dir, tmp_path / "store" / "chains" / hp.legacy_hash())
    longer = hp.replace(pruning=hp.pruning.replace(rounds=3))
    done = run_chain(longer, EvalHparams(rounds=(), lmc=False), [], ChainStore(tmp_path / "store", longer), data=digits)
    assert done.round == 3


def test_a_local_copy_keeps_its_source(tmp_path):
    """The previous state is a second name for the file, made atomically: `state.pt` never goes
    missing in between, a later rewrite of it leaves the copy alone, and a missing source is no error."""
    files = open_root(tmp_path)
    files.write("state.pt", b"round 1")
    files.copy("state.pt", "state.prev.pt")
    assert files.read("state.pt") == b"round 1" and files.read("state.prev.pt") == b"round 1"
    files.write("state.pt", b"round 2")
    assert files.read("state.prev.pt") == b"round 1"
    files.copy("absent.pt", "state.prev.pt")
    assert files.read("state.prev.pt") == b"round 1" and sorted(files.list("")) == ["state.prev.pt", "state.pt"]
