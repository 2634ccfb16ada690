"""End to end on the tiny Markov corpus: run layout, exact resume, the AR mode, and bad input."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdlm.config import ConfigError, load_config
from tdlm.model import TdlmForMaskedOrCausalLM
from tdlm.tasks import cli as main
from tdlm.tasks import text_engine

ROOT = Path(__file__).resolve().parent.parent


def run(overrides, stop_at=None):
    engine = text_engine(load_config(None, overrides))
    try:
        return engine.fit(stop_at), engine
    finally:
        engine.close()


def losses(run_dir):
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}


def test_run_layout_and_learning(tiny, tmp_path):
    result, trainer = run(tiny(**{"trainer.max_steps": 30, "trainer.eval_every_n_steps": 10,
                                  "trainer.save_every_n_steps": 10, "trainer.keep_last": 1}))
    rd = tmp_path / "runs" / "t"
    assert (rd / "config.yaml").is_file() and (rd / "tokenizer" / "tokenizer.json").is_file()
    ckpts = sorted(p.name for p in (rd / "checkpoints").iterdir())
    assert ckpts[-1] == "step_0000030" and len(ckpts) <= 2  # keep_last=1 plus the best
    ls = losses(rd)
    assert set(ls) == set(range(1, 31))
    assert ls[30] < ls[1] - 0.2  # it learns
    assert math.isclose(result["val/perplexity"], math.exp(result["val/loss"]))
    recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    summary = recs[-1]
    assert summary["summary/total_steps"] == 30 and summary["summary/training_time_hours"] > 0
    assert 0.3 < recs[0]["diffusion/t_mean"] < 0.7
    model = TdlmForMaskedOrCausalLM.from_pretrained(str(rd / "checkpoints" / "step_0000030" / "model"))
    assert model.config.mask_token_id == trainer.task.mask_id and not model.config.causal


def test_ar_mode_reports_exact_nll(tiny, tmp_path):
    result, trainer = run(tiny(**{"model.causal": True, "trainer.max_steps": 4}))
    assert result["val/loss"] > 0 and math.isfinite(result["val/loss"])


def test_bad_input_one_line_errors(tiny, tmp_path, capsys):
    # existing run is never overwritten
    run(tiny(**{"trainer.max_steps": 4}))
    before = sorted(p.name for p in (tmp_path / "runs" / "t" / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="already holds a run"):
        text_engine(load_config(None, tiny(**{"trainer.max_steps": 4})))
    assert sorted(p.name for p in (tmp_path / "runs" / "t" / "checkpoints").iterdir()) == before
    # tokenizer / vocabulary mismatch on resume
    with pytest.raises(ConfigError, match="tokenizer"):
        text_engine(load_config(None, tiny(**{"trainer.resume": "auto", "data.markov_symbols": 7})))
    # architecture mismatch on resume
    with pytest.raises(ConfigError, match="model.hidden_size"):
        text_engine(load_config(None, tiny(**{"trainer.resume": "auto", "model.hidden_size": 64})))
    # missing data file, empty corpus
    with pytest.raises(ConfigError, match="nope.txt"):
        text_engine(load_config(None, tiny(**{"data.source": "files", "data.paths": "[nope.txt]",
                                          "trainer.run_name": "x"})))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="no text found"):
        text_engine(load_config(None, tiny(**{"data.source": "files", "data.paths": f"[{empty}]",
                                          "trainer.run_name": "y"})))
    # the CLI turns them into one line and exit code 2
    capsys.readouterr()
    assert main([str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing.yaml" in err[0]


def test_more_bad_input_one_line_errors(tiny, tmp_path, capsys, monkeypatch):
    run(tiny(**{"trainer.max_steps": 2, "trainer.save_every_n_steps": 2, "trainer.eval_every_n_steps": 2}))
    rd = tmp_path / "runs" / "t"
    before = sorted(str(p.relative_to(rd)) for p in rd.rglob("*"))
    # a checkpoint whose data layout differs cannot resume exactly
    with pytest.raises(ConfigError, match="trainer.micro_batch_size: 4 differs from the checkpoint's 8"):
        text_engine(load_config(None, tiny(**{"trainer.resume": "auto", "trainer.micro_batch_size": 4})))
    with pytest.raises(ConfigError, match="trainer.resume: .*not a complete checkpoint"):
        text_engine(load_config(None, tiny(**{"trainer.resume": str(rd)})))
    # not enough disk: refused before anything is written or deleted
    with pytest.raises(ConfigError, match="trainer.min_free_disk_mb: only .* MiB free"):
        text_engine(load_config(None, tiny(**{"trainer.overwrite": True, "trainer.min_free_disk_mb": 2**40})))
    assert sorted(str(p.relative_to(rd)) for p in rd.rglob("*")) == before
    # unreadable tokenizers: a pretrained one given by path, and the one of a prepared dataset
    bad_tok = tmp_path / "bad_tok"
    bad_tok.mkdir()
    (bad_tok / "tokenizer.json").write_text("{not json")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"doc {i} words here" for i in range(50)))
    with pytest.raises(ConfigError, match="data.tokenizer: cannot load tokenizer .*bad_tok"):
        text_engine(load_config(None, tiny(**{"data.source": "files", "data.paths": f"[{corpus}]",
                                          "data.tokenizer": str(bad_tok), "trainer.run_name": "tok"})))
    prepared = tmp_path / "prepared"
    shutil.copytree(next(p for p in (tmp_path.parent / "data_cache").iterdir() if (p / "info.json").is_file()),
                    prepared)
    (prepared / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="data.tokenizer: cannot load .*prepared/tokenizer"):
        text_engine(load_config(None, tiny(**{"data.source": "prepared", "data.paths": f"[{prepared}]",
                                          "trainer.run_name": "prep"})))
    # the CLI: malformed YAML names the line, one line on stderr, exit code 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  seed: [1, 2\n")
    capsys.readouterr()
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml line 3, column 9: flow sequence not closed" in err[0]
    # overwrite=true replaces the old run
    run(tiny(**{"trainer.max_steps": 1, "trainer.overwrite": True}))
    assert [p.name for p in (rd / "checkpoints").iterdir()] == ["step_0000001"]


def test_wandb_online_without_credentials_falls_back_to_offline(tiny, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    result, _ = run(tiny(**{"trainer.max_steps": 2, "wandb.enabled": True, "wandb.mode": "online"}))
    assert math.isfinite(result["train/loss"])
    assert "wandb.mode=online but no wandb API key" in capfd.readouterr().err
    assert list((tmp_path / "runs" / "t" / "wandb").glob("offline-run-*"))


def test_local_text_files_with_padding(tiny, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"document number {i} says hello to the world {i % 7}" for i in range(300)))
    result, trainer = run(tiny(**{"data.source": "files", "data.paths": f"[{corpus}]", "data.packing": False,
                                  "data.vocab_size": 300, "trainer.max_steps": 3}))
    row = trainer.task.data.train[0]["input_ids"]
    assert (row == trainer.task.pad_id).any()  # short documents are right-padded, and the run still trains
    assert math.isfinite(result["val/loss"])


def test_script_entry_point_runs(tiny, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tdlm" / "train.py"), str(ROOT / "configs" / "markov.yaml"),
                           *tiny(**{"trainer.max_steps": 2, "sample.at_end": 1, "sample.steps": 4})],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "perplexity bound" in proc.stdout and "--- sample 0 ---" in proc.stdout


def test_compiled_training_matches_eager(tiny, tmp_path, one_thread):
    """trainer.compile=true: the same losses as eager (to float tolerance) with every metric tier on (the research
    tier's extra backward passes go through the compiled graph); checkpoints keep the plain parameter names."""
    tiers = {f"metrics.tiers.{t}.enabled": True for t in ("research", "advanced")}
    common = {"trainer.max_steps": 4, "model.num_layers": 1, **tiers}
    run(tiny(**common, **{"trainer.run_name": "eager"}))
    result, _ = run(tiny(**common, **{"trainer.run_name": "compiled", "trainer.compile": True}))
    eager, compiled = losses(tmp_path / "runs" / "eager"), losses(tmp_path / "runs" / "compiled")
    assert set(compiled) == {1, 2, 3, 4}
    for step in eager:
        assert math.isclose(compiled[step], eager[step], rel_tol=1e-4), (step, compiled[step], eager[step])
    model = TdlmForMaskedOrCausalLM.from_pretrained(str(tmp_path / "runs" / "compiled" / "checkpoints" /
                                                       "step_0000004" / "model"))
    assert model.config.num_layers == 1


def test_an_fsdp_launch_without_cuda_is_refused(tiny, monkeypatch):
    """Without CUDA, Accelerate 1.15 turns an FSDP launch into plain DDP (measured): refuse it in one line."""
    if torch.cuda.is_available():
        pytest.skip("FSDP runs on GPUs")
    from tdlm.engine.launch import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="launch: FSDP needs CUDA GPUs here"):
        make_accelerator(load_config(None, tiny()))
