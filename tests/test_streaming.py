"""data.streaming: training rows read shard by shard (process r of W: shards r, r+W, ...), each process's position
(shard, offset) in the checkpoint, and a resumed run that reads the same rows as an uninterrupted one."""

import hashlib
import json

import numpy as np
import pytest

from tdlm.config import ConfigError, DataSection, load_config
from tdlm.data import ShardOrderSampler, load_prepared, prepare_dataset
from tdlm.tasks import text_engine


def test_each_process_reads_its_own_shards_one_at_a_time():
    rows, files = [5, 7, 3, 9, 4], [f"shard-{i}" for i in range(5)]
    sampler, B, W = ShardOrderSampler(rows, files, batch_size=2, num_processes=2, seed=0), 2, 2
    starts = np.cumsum([0] + rows)
    shard_of = {int(i): s for s in range(5) for i in range(starts[s], starts[s + 1])}
    assert sampler.batches == min(5 + 3 + 4, 7 + 9) // B and len(sampler) == sampler.batches * B * W
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == len(set(order))  # no row twice in an epoch
        batches = [order[i:i + B] for i in range(0, len(order), B)]
        per_process = [sum(batches[r::W], []) for r in range(W)]  # Accelerate's sharding: batch i -> process i % W
        for r, mine in enumerate(per_process):
            shards = [shard_of[i] for i in mine]
            assert {s % W for s in shards} == {r}  # shards r, r + W, ...
            runs = [s for k, s in enumerate(shards) if k == 0 or s != shards[k - 1]]
            assert len(runs) == len(set(runs))  # one shard at a time, each once
            for k in range(sampler.batches + 1):  # the position after k batches names the shard of the next row
                pos = sampler.position(epoch, k)[r]
                if k * B < len(mine):
                    nxt = shard_of[mine[k * B]]
                    assert pos["shard"] == files[nxt] and pos["offset"] == shards[:k * B].count(nxt)
        epochs.append(order)
    assert epochs[0] != epochs[1] and sorted(epochs[0]) != epochs[0]
    with pytest.raises(ConfigError, match="data.streaming: the training split has 1 shard"):
        ShardOrderSampler([10], ["a"], batch_size=2, num_processes=2, seed=0)


def small_shards(tmp_path, monkeypatch, rows_per_shard=40):
    """Markov data (as tests/conftest.py's tiny runs) prepared in shards of ``rows_per_shard`` rows of 32 tokens."""
    import tdlm.data

    monkeypatch.setattr(tdlm.data, "SHARD_BYTES", rows_per_shard * 8 * 32)
    cfg = DataSection(source="markov", seq_len=32, markov_tokens=20000, markov_symbols=6,
                      cache_dir=str(tmp_path / "cache"))
    return prepare_dataset(cfg, tmp_path / "prepared", log=lambda *a: None)


def record_batches(monkeypatch) -> list:
    """(step, row ids) of every training micro-batch the engine takes."""
    from tdlm.engine.loop import Engine

    seen, next_batches = [], Engine._next_batches

    def recording(self, n):
        batches = next_batches(self, n)
        seen.extend((self.state.step + 1, b["idx"].tolist()) for b in batches)
        return batches

    monkeypatch.setattr(Engine, "_next_batches", recording)
    return seen


def run(overrides, stop_at=None):
    engine = text_engine(load_config(None, overrides))
    try:
        return engine.fit(stop_at)
    finally:
        engine.close()


def test_resumed_streaming_run_reads_the_same_rows(tiny, tmp_path, monkeypatch, one_thread):
    prepared = small_shards(tmp_path, monkeypatch)
    shards = json.loads((prepared / "info.json").read_text())["shards"]["train"]
    assert len(shards) > 10 and shards[0]["rows"] == 40
    seen = record_batches(monkeypatch)
    args = {"data.source": "prepared", "data.paths": f"[{prepared}]", "data.streaming": "true",
            "trainer.max_steps": 12, "trainer.save_every_n_steps": 4}
    run(tiny(**args, **{"trainer.run_name": "whole"}))
    whole = list(seen)
    seen.clear()
    run(tiny(**args, **{"trainer.run_name": "cut"}), stop_at=10)  # killed after step 10: the checkpoint is step 8
    before = dict(seen)
    seen.clear()
    run(tiny(**args, **{"trainer.run_name": "cut", "trainer.resume": "auto"}))
    assert [s for s, _ in seen] == list(range(9, 13))  # the resumed session starts after the checkpoint
    resumed = [(s, before[s]) for s in range(1, 9)] + seen
    digest = [hashlib.sha256(json.dumps(x).encode()).hexdigest() for x in (whole, resumed)]
    assert digest[0] == digest[1] and len(whole) == 12
    # the rows come shard by shard: the first 40 (5 batches of 8) are one shard's, in a permuted order
    first = sum((ids for _, ids in whole[:5]), [])
    assert max(first) - min(first) == 39 and min(first) % 40 == 0 and first != sorted(first)
    state = json.loads(next((tmp_path / "runs" / "cut" / "checkpoints").glob("step_0000008")).joinpath(
        "trainer_state.json").read_text())
    shard_of_row = {i: s["file"] for k, s in enumerate(shards) for i in range(40 * k, 40 * k + s["rows"])}
    second = sum((ids for _, ids in whole[5:8]), [])  # steps 6-8: 24 rows of the second shard read
    assert state["data_position"] == [{"process": 0, "epoch": 0, "shard": shard_of_row[second[0]], "offset": 24}]
    assert len(load_prepared(prepared).train) == sum(s["rows"] for s in shards)


@pytest.mark.slow
def test_two_processes_preempted_and_resumed_read_the_same_rows(tiny, tmp_path, monkeypatch):
    """2 processes: each reads only its own shards, and a run stopped by SIGTERM (rank 1 only) after step 6 and
    resumed reads, per process, the rows of an uninterrupted run."""
    from conftest import ROOT, launch_two_processes

    prepared = small_shards(tmp_path, monkeypatch)
    shards = json.loads((prepared / "info.json").read_text())["shards"]["train"]
    args = tiny(**{"data.source": "prepared", "data.paths": f"[{prepared}]", "data.streaming": "true",
                   "trainer.max_steps": 10, "trainer.save_every_n_steps": 4})

    def launch(name, log, fault=None, resume=False):
        env = {"TDLM_TEST_BATCH_LOG": str(tmp_path / log), **({"TDLM_TEST_FAULT": fault} if fault else {})}
        extra = [f"trainer.run_name={name}"] + (["trainer.resume=auto"] if resume else [])
        return launch_two_processes(ROOT / "tests" / "stream_entry.py",
                                    [str(ROOT / "configs" / "markov.yaml"), *args, *extra], extra_env=env)

    def logged(log, rank):
        return [tuple(json.loads(x)) for x in (tmp_path / f"{log}.{rank}").read_text().splitlines()]

    launch("whole", "whole")
    launch("cut", "cut", fault="sigterm:5:1")
    # the SIGTERM comes before step 6; both processes finish step 6 and checkpoint it (pruned later by keep_last)
    state = json.loads((tmp_path / "runs" / "cut" / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    launch("cut", "resumed", resume=True)
    start = 40 * np.arange(len(shards))

    def shard_of(i):
        return int(np.searchsorted(start, i, side="right") - 1)

    for rank in (0, 1):
        whole, cut, resumed = logged("whole", rank), logged("cut", rank), logged("resumed", rank)
        assert [s for s, _ in cut] == list(range(1, 7)) and [s for s, _ in resumed] == list(range(7, 11))
        assert json.dumps(cut + resumed) == json.dumps(whole)
        rows = sum((ids for _, ids in whole), [])
        assert {shard_of(i) % 2 for i in rows} == {rank}  # process r reads shards r, r + 2, ...
        read = sum((ids for _, ids in cut), [])
        nxt = shard_of(resumed[0][1][0])  # the position saved: the shard of the next row and the rows read from it
        assert state["data_position"][rank] == {"process": rank, "epoch": 0, "shard": shards[nxt]["file"],
                                                "offset": sum(shard_of(i) == nxt for i in read)}
