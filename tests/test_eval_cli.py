"""The eval/ scripts end to end on real checkpoints of a tiny diffusion run and a tiny AR run."""

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from tdlm.config import load_config
from tdlm.tasks import text_engine

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def load_script(name):
    """eval/ holds scripts, not a package: load one by file."""
    spec = importlib.util.spec_from_file_location(f"eval_{name}", ROOT / "eval" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


perplexity, generate, gen_ppl, compare, review = map(load_script, ["perplexity", "generate", "gen_ppl", "compare",
                                                                   "review"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A diffusion run (with an offline wandb run beside metrics.jsonl) and an AR run, 24 steps each."""
    tmp = tmp_path_factory.mktemp("eval")
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the one_thread fixture is per test and starts after this one
    for name, extra in (("diff", {"wandb.enabled": True, "wandb.mode": "offline"}), ("ar", {"model.causal": True})):
        cfg = load_config(None, tiny_overrides(tmp, **{"trainer.run_name": name, "trainer.max_steps": 24,
                                                       "trainer.eval_every_n_steps": 8, "data.eval_batches": 0,
                                                       "trainer.save_every_n_steps": 24, **extra}))
        engine = text_engine(cfg)
        result = engine.fit()
        engine.close()
        out[name] = {"dir": cfg.run_dir, "result": result, "cfg": cfg}
    torch.set_num_threads(threads)
    return out


def run_json(script, argv, capsys):
    capsys.readouterr()
    assert script.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_perplexity_json_deterministic_estimators_agree_and_ar_is_exact(runs, capsys):
    ckpt = str(runs["diff"]["dir"])
    res = {e: run_json(perplexity, ["--checkpoint", ckpt, "--estimator", e, "--mc-passes", "6", "--json"], capsys)
           for e in ("stratified", "iid", "exact-k")}
    for e, r in res.items():
        assert {"nelbo_per_token", "perplexity_bound", "stderr", "mc_passes", "estimator", "num_tokens",
                "seed"} <= set(r)
        assert r["estimator"] == e and r["mc_passes"] == 6 and r["num_tokens"] == 31 * 32 and r["kind"] == "bound"
        assert r["perplexity_bound"] == pytest.approx(math.exp(r["nelbo_per_token"]), rel=1e-12)
        assert 0 < r["stderr"] < 0.1 * r["nelbo_per_token"]
    a, b = res["stratified"], res["exact-k"]  # two unbiased estimators of one number
    assert abs(a["nelbo_per_token"] - b["nelbo_per_token"]) < 4 * math.hypot(a["stderr"], b["stderr"])
    again = run_json(perplexity, ["--checkpoint", ckpt, "--estimator", "exact-k", "--mc-passes", "6", "--json"], capsys)
    assert again["per_pass"] == b["per_pass"]  # deterministic for a seed
    other = run_json(perplexity, ["--checkpoint", ckpt, "--estimator", "exact-k", "--mc-passes", "6", "--seed", "1",
                                  "--json"], capsys)
    assert other["per_pass"] != b["per_pass"]
    # the AR checkpoint's exact perplexity is the trainer's own validation loss on the whole split
    ar = run_json(perplexity, ["--checkpoint", str(runs["ar"]["dir"]), "--which", "latest", "--json"], capsys)
    assert ar["kind"] == "exact" and ar["stderr"] == 0.0 and ar["num_tokens"] == 31 * 31
    assert ar["nelbo_per_token"] == pytest.approx(runs["ar"]["result"]["val/loss"], rel=1e-9)


def test_perplexity_on_prepared_dir_and_raw_text(runs, capsys, tmp_path):
    ckpt = str(runs["diff"]["dir"])
    base = ["--checkpoint", ckpt, "--estimator", "exact-k", "--mc-passes", "2", "--json"]
    default = run_json(perplexity, base, capsys)
    from tdlm.data import _fingerprint

    # the cache is shared by every test of the session: take the diffusion run's own prepared dir
    prepared = Path(runs["diff"]["cfg"].data.cache_dir) / _fingerprint(runs["diff"]["cfg"].data)
    assert (prepared / "info.json").is_file()
    assert run_json(perplexity, base + ["--data", str(prepared)], capsys)["per_pass"] == default["per_pass"]
    text = tmp_path / "t.txt"
    text.write_text("a b c d e f " * 10 + "\n\n" + "f e d c b a " * 10)
    raw = run_json(perplexity, base + ["--text", str(text)], capsys)
    assert raw["split"] == "text" and raw["text_files"] == [str(text)] and default["split"] == "validation"
    assert raw["num_tokens"] == 2 * (60 + 2)  # [BOS] + 60 symbols + [EOS] per document, packed into 32-blocks
    assert raw["num_sequences"] == math.ceil(124 / 32)
    with pytest.raises(SystemExit) as e:  # raw text has no splits
        perplexity.main(base + ["--text", str(text), "--split", "train"])
    assert e.value.code == 2 and "--split: raw --text files have no splits" in capsys.readouterr().err
    assert perplexity.main(["--checkpoint", str(tmp_path)]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_perplexity_with_two_processes_matches_one(runs, capsys):
    args = ["--checkpoint", str(runs["diff"]["dir"]), "--estimator", "stratified", "--mc-passes", "3",
            "--batch-size", "4", "--json"]
    one = run_json(perplexity, args, capsys)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), str(ROOT / "eval" / "perplexity.py"), *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # printed by the main process only
    two = json.loads(lines[0])
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    # 31 rows over 2 ranks x batch 4: Accelerate pads the last batch; gather_for_metrics must drop the copies
    assert two["num_sequences"] == one["num_sequences"] == 31
    assert two["per_pass"] == one["per_pass"] and two["stderr"] == one["stderr"]


def test_generate_infills_templates_and_is_batch_independent(runs, capsys, tmp_path):
    ckpt = str(runs["diff"]["dir"])
    out_a, out_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = ["--checkpoint", ckpt, "--num-samples", "3", "--template", "a b [MASK] [MASK] c [MASK] [MASK] d",
              "--method", "low_confidence", "--steps", "4", "--json"]
    summary = run_json(generate, common + ["--batch-size", "2", "--out", str(out_a)], capsys)
    run_json(generate, common + ["--batch-size", "3", "--out", str(out_b)], capsys)
    a = [json.loads(x) for x in out_a.read_text().splitlines()]
    assert out_a.read_text() == out_b.read_text()  # per-sample generators: batching does not matter
    assert [s["index"] for s in a] == [0, 1, 2] and summary["network_calls"] == 2 * 4  # 2 batches x 4 steps
    tok_ids = {ch: i + 4 for i, ch in enumerate("abcdef")}
    for s in a:
        assert len(s["ids"]) == 8 and not set(s["ids"]) & {0, 1}  # no [PAD] / [MASK] left
        assert [s["ids"][i] for i in (0, 1, 4, 7)] == [tok_ids[c] for c in "abcd"]
    # AR checkpoint: a prompt is kept as the prefix
    run_json(generate, ["--checkpoint", str(runs["ar"]["dir"]), "--num-samples", "2", "--prompt", "c c",
                        "--out", str(out_a), "--json"], capsys)
    for s in map(json.loads, out_a.read_text().splitlines()):
        assert s["ids"][:2] == [tok_ids["c"]] * 2 and len(s["ids"]) == 32


def tiny_gpt2(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate("abcdef")}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=7, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return model.eval(), tok


def test_gen_ppl_refuses_without_scorer_and_matches_direct_scoring(runs, capsys, tmp_path):
    samples = tmp_path / "s.jsonl"
    texts = ["a b c d e f a b c d e f a b c d e f a b c", "a a a a a a a a", "f e d c b a"]
    samples.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert gen_ppl.main(["--samples", str(samples)]) == 2
    assert "needs a causal scorer" in capsys.readouterr().err
    assert gen_ppl.main(["--samples", str(samples), "--scorer", str(runs["diff"]["dir"])]) == 2
    assert "masked-diffusion checkpoint" in capsys.readouterr().err
    # a local HF GPT-2 (16 positions: the 21-token text is scored in two windows, each after <|endoftext|>)
    model, tok = tiny_gpt2(tmp_path / "gpt2")
    res = run_json(gen_ppl, ["--samples", str(samples), "--scorer", str(tmp_path / "gpt2"), "--json"], capsys)
    nll, count = 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"]
        for s in range(0, len(ids), 15):
            x = torch.tensor([[0] + ids[s:s + 15]])
            with torch.no_grad():
                lp = model(x).logits[0, :-1].double().log_softmax(-1).gather(1, x[0, 1:, None])
            nll, count = nll - float(lp.sum()), count + lp.numel()
    assert res["scored_tokens"] == count == 21 + 8 + 6
    assert res["gen_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-9)
    h_first = -3 * (4 / 21 * math.log(4 / 21)) - 3 * (3 / 21 * math.log(3 / 21))  # a, b, c x4; d, e, f x3
    assert res["unigram_entropy"] == pytest.approx((h_first + 0.0 + math.log(6)) / 3, rel=1e-9)
    assert res["repetition_rate_4gram"] == pytest.approx(((18 - 6) / 18 + 4 / 5 + 0.0) / 3, rel=1e-9)
    # our AR checkpoint as the scorer of validation rows reproduces its exact validation perplexity
    from tdlm.likelihood import eval_split
    from tdlm.runs import load_checkpoint

    ck = load_checkpoint(runs["ar"]["dir"], "latest")
    rows = eval_split("validation", ck.tokenizer, 32, ck.config)["input_ids"]
    samples.write_text("".join(json.dumps({"text": ck.tokenizer.decode(r)}) + "\n" for r in rows))
    res = run_json(gen_ppl, ["--samples", str(samples), "--scorer", str(ck.path), "--json"], capsys)
    assert res["scored_tokens"] == 31 * 31
    # fp32 logits from batches of different shapes: agreement to fp32 rounding, not bit-for-bit
    assert math.log(res["gen_ppl"]) == pytest.approx(runs["ar"]["result"]["val/loss"], rel=1e-6)


def test_compare_writes_markdown_json_and_plot(runs, capsys, tmp_path):
    out = tmp_path / "cmp"
    assert compare.main(["--diffusion", str(runs["diff"]["dir"]), "--ar", str(runs["ar"]["dir"]), "--out", str(out),
                         "--scorer", str(runs["ar"]["dir"]), "--num-samples", "4", "--steps", "16",
                         "--mc-passes", "2", "--which", "latest"]) == 0
    report = json.loads((out / "compare.json").read_text())
    diff, ar = report["runs"]
    assert diff["perplexity"]["kind"] == "bound" and ar["perplexity"]["kind"] == "exact"
    assert ar["perplexity"]["nelbo_per_token"] == pytest.approx(runs["ar"]["result"]["val/loss"], rel=1e-9)
    for r in (diff, ar):
        assert r["tokens_seen"] == 24 * 8 * 32 and r["global_batch"] == 8
        assert r["parameters"]["total"] > r["parameters"]["non_embedding"] > 0
        assert r["generation"]["gen_ppl"] > 1 and r["generation"]["num_samples"] == 4
        assert [p["step"] for p in r["val_vs_epochs"]] == [8, 16, 24]
        e = r["val_vs_epochs"][-1]
        assert e["epochs"] == pytest.approx(24 * 8 / r["train_rows"]) and r["wall_time_hours"] > 0
    md = (out / "compare.md").read_text()
    assert "| diff | diffusion (bound, stratified x2)" in md and "| ar | AR (exact)" in md and "vs epochs" in md
    assert (out / "val_vs_epochs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert compare.main(["--diffusion", str(runs["ar"]["dir"]), "--ar", str(runs["ar"]["dir"]),
                         "--out", str(out)]) == 2
    assert "is an AR checkpoint" in capsys.readouterr().err


def synthetic_run(path):
    """A metrics.jsonl with the tier metrics of docs/metrics.md and three health rules: one fires twice, one (a
    boolean) once, one never."""
    path.mkdir()
    recs = []
    for s in range(1, 51):
        r = {"step": s, "train/loss": 3.0 - s / 25, "metrics/mask_accuracy": 0.2 + 0.01 * s,
             "research/low_corruption_accuracy": 0.5 + 0.005 * s, "research/medium_corruption_accuracy": 0.3,
             "research/high_corruption_accuracy": 0.2 + 0.004 * s,  # ends above medium: flagged
             "research/gradient_norm_low_corruption": 0.1, "research/gradient_norm_high_corruption": 1.5,
             "research/gradient_norm_medium_corruption": 1.0, "research/gradient_norm_ratio_high_to_low": 15.0,
             "health/loss_spike": 1 if s in (10, 30) else 0, "health/grad_explosion": s == 40,
             "health/dead_tokens": 0}
        if s % 10 == 0:
            r.update({"val/loss": [1.5, 1.2, 1.1, 1.15, 1.3][s // 10 - 1]})
            r["val/perplexity"] = math.exp(r["val/loss"])
        recs.append(r)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_review_offline_run_dirs_wandb_files_and_synthetic_tier_metrics(runs, tmp_path, capsys):
    synthetic_run(tmp_path / "synth")
    wandb_dirs = sorted((runs["diff"]["dir"] / "wandb").glob("offline-run-*"))
    assert len(wandb_dirs) == 1
    out = tmp_path / "review"
    assert review.main(["--runs", str(runs["diff"]["dir"]), str(runs["ar"]["dir"]), str(wandb_dirs[0]),
                        str(tmp_path / "synth"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    by_name = {r["name"]: r for r in report["runs"]}
    diff, wb, synth = by_name["diff"], by_name["diff-2"], by_name["synth"]
    # the offline wandb file holds exactly what metrics.jsonl holds
    assert wb["source"].endswith(".wandb") and wb["val_perplexity"] == diff["val_perplexity"]
    assert wb["trends"]["train/loss"] == diff["trends"]["train/loss"]
    assert diff["val_perplexity"]["final"] == pytest.approx(runs["diff"]["result"]["val/perplexity"], rel=1e-12)
    # the rules the review lists are exactly those that fired in the run's own metrics.jsonl
    recs = [json.loads(line) for line in (runs["diff"]["dir"] / "metrics.jsonl").read_text().splitlines()]
    fired = {k.split("/", 1)[1]: [r["step"] for r in recs if r.get(k)] for r in recs for k in r
             if k.startswith("health/")}
    assert {h["rule"]: (h["times"], h["first_step"], h["last_step"], h["steps"]) for h in diff["health"]} == {
        k: (len(v), v[0], v[-1], v[:20]) for k, v in fired.items() if v}  # the report lists the first 20 steps
    assert wb["health"] == diff["health"]
    assert "research/low_corruption_accuracy" not in diff["trends"]  # tiers off in this run: absent, no crash
    # synthetic tier metrics
    assert synth["health"] == [{"rule": "grad_explosion", "times": 1, "first_step": 40, "last_step": 40,
                                "steps": [40]},
                               {"rule": "loss_spike", "times": 2, "first_step": 10, "last_step": 30, "steps": [10, 30]}]
    assert synth["val_perplexity"]["best"] == pytest.approx(math.exp(1.1)) and synth["val_perplexity"]["best_step"] == 30
    acc = synth["trends"]["metrics/mask_accuracy"]
    assert acc["direction"] == "up" and acc["last"] == pytest.approx(0.7)
    text = " ".join(synth["findings"])
    assert "good (>60%)" in text and "unnatural" in text and "extreme" in text and "overfitting" in text
    md = (out / "report.md").read_text()
    assert "| loss_spike | 2 | 10 | 30 |" in md and "## synth" in md and "research/medium_corruption_accuracy" in md
    for name in ("synth.png", "diff.png", "across_runs.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


class FakeRun:
    def __init__(self, name, rows):
        self.name, self.id, self.config, self.rows = name, name + "-id", {"model": {"causal": False}}, rows

    def scan_history(self):
        return iter(self.rows)


def test_review_online_path_with_the_wandb_api_mocked(monkeypatch, tmp_path):
    import wandb

    asked = []

    class FakeApi:
        def runs(self, path):
            asked.append(path)
            rows = [{"_step": i, "trainer/global_step": 10 * i, "train/loss": 2.0 - 0.1 * i,
                     "val/perplexity": 5.0 - 0.5 * i, "health/nan_loss": int(i == 3), "_runtime": 1.0}
                    for i in range(1, 6)]
            return [FakeRun("alpha", rows), FakeRun("beta", rows[:2])]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    assert review.main(["--project", "ent/proj", "--out", str(tmp_path / "r")]) == 0
    assert asked == ["ent/proj"]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    alpha, beta = report["runs"]
    assert alpha["health"][0]["rule"] == "nan_loss" and alpha["health"][0]["steps"] == [30]
    assert alpha["val_perplexity"]["best"] == 2.5 and alpha["val_perplexity"]["best_step"] == 50
    assert beta["last_step"] == 20 and alpha["source"] == "wandb:ent/proj/alpha-id"


def test_a_checkpoint_scored_outside_its_run_dir_uses_its_own_schedule(tmp_path, capsys):
    """The schedule and t_min are saved with the model: a checkpoint copied away from its run directory (no
    config.yaml beside it) is scored under the cosine schedule it was trained with, not a default."""
    from tdlm.accel import eval_accelerator, release
    from tdlm.likelihood import checkpoint_likelihood
    from tdlm.runs import load_checkpoint

    cfg = load_config(None, tiny_overrides(tmp_path, **{"trainer.max_steps": 2, "trainer.eval_every_n_steps": 2,
                                                        "diffusion.schedule": "cosine", "diffusion.t_min": 0.05}))
    engine = text_engine(cfg)
    engine.fit()
    engine.close()
    ckpt = cfg.run_dir / "checkpoints" / "step_0000002"
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(ckpt, moved)
    text = tmp_path / "symbols.txt"
    text.write_text("\n\n".join(" ".join("abcdef"[(i * j) % 6] for j in range(40)) for i in range(1, 9)))
    argv = ["--text", str(text), "--estimator", "exact-k", "--mc-passes", "2", "--json"]
    inside = run_json(perplexity, ["--checkpoint", str(ckpt), *argv], capsys)
    outside = run_json(perplexity, ["--checkpoint", str(moved), *argv], capsys)
    assert load_checkpoint(moved).config is None  # nothing but the checkpoint itself to go on
    assert (outside["schedule"], outside["t_min"]) == (inside["schedule"], inside["t_min"]) == ("cosine", 0.05)
    assert outside["nelbo_per_token"] == inside["nelbo_per_token"]
    # and the schedule matters: the same checkpoint scored as if it were linear gives another number
    ck = load_checkpoint(moved)
    ck.model.config.schedule = "linear"
    acc = eval_accelerator()
    try:
        linear = checkpoint_likelihood(ck, acc, text_files=[str(text)], estimator="exact-k", passes=2)
    finally:
        release(acc)
    assert linear["schedule"] == "linear" and abs(linear["nelbo_per_token"] - outside["nelbo_per_token"]) > 1e-3


def test_gen_ppl_frontier_two_temperatures_entropy_falls_with_temperature(runs, capsys, tmp_path):
    out = tmp_path / "frontier"
    capsys.readouterr()
    assert gen_ppl.main(["--frontier", "--checkpoints", str(runs["diff"]["dir"]), str(runs["ar"]["dir"]),
                         "--scorer", str(runs["ar"]["dir"]), "--temperatures", "1.0", "0.3", "--steps", "16",
                         "--num-samples", "6", "--out", str(out), "--json"]) == 0
    report = json.loads((out / "frontier.json").read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert [r["label"] for r in report["runs"]] == ["diff", "ar"] and report["scorer"].endswith("step_0000024")
    for r in report["runs"]:
        hot, cold = r["points"]
        assert (hot["temperature"], cold["temperature"]) == (1.0, 0.3) and hot["num_samples"] == 6
        assert cold["unigram_entropy"] < hot["unigram_entropy"], r["label"]
        assert hot["sampling_precision"].startswith("float64") and hot["gen_ppl"] > 1
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert gen_ppl.main(["--frontier", "--checkpoints", str(runs["diff"]["dir"]), "--out", str(out)]) == 2
    assert "needs a causal scorer" in capsys.readouterr().err


def test_report_runs_every_part_and_matches_the_standalone_scripts(runs, capsys, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    report_script = load_script("report")
    monkeypatch.chdir(ROOT)  # the test task YAMLs name their data relative to the repository root
    ptb = tmp_path / "ptb.jsonl"
    ptb.write_text("".join(json.dumps({"sentence": s}) + "\n" for s in ["a b c d e f", "f e d c b a a b"]))
    out = tmp_path / "report"
    ckpts = [str(runs["diff"]["dir"]), str(runs["ar"]["dir"])]
    assert report_script.main(["--checkpoints", *ckpts, "--out", str(out), "--data", f"ptb={ptb}", "--tasks",
                               "tdlm_toy_mc", "--include-path", str(ROOT / "tests" / "harness_tasks"), "--scorer",
                               ckpts[1], "--temperatures", "1.0", "--steps", "8", "--num-samples", "2",
                               "--mc-passes", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    diff, ar = report["checkpoints"]
    alone = run_json(perplexity, ["--checkpoint", ckpts[0], "--estimator", "exact-k", "--mc-passes", "3", "--json"],
                     capsys)
    assert diff["in_domain"]["per_pass"] == alone["per_pass"]  # the same bound, the same noise
    assert ar["in_domain"]["nelbo_per_token"] == pytest.approx(runs["ar"]["result"]["val/loss"], rel=1e-9)
    # 2 documents of 6 and 8 words + [BOS]/[EOS] each, wrapped into one block of 32
    assert diff["zero_shot"][0]["num_tokens"] == 18 and ar["zero_shot"][0]["num_tokens"] == 17
    assert diff["harness"]["distinct_requests"] == 7 and "acc,none" in ar["harness"]["results"]["tdlm_toy_mc"]
    assert [len(c["frontier"]) for c in (diff, ar)] == [1, 1]
    md = (out / "report.md").read_text()
    for part in ("## In-domain", "| diff | 24 | <=", "| ar | 24 |", "## Zero-shot", "95.26", "## lm-eval tasks",
                 "tdlm_toy_mc", "## Gen-PPL frontier", "float64", "![frontier](frontier.png)"):
        assert part in md, part
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_gradient_noise_is_the_sample_variance_of_the_minibatch_gradients(runs, capsys):
    gradient_noise = load_script("gradient_noise")
    from tdlm.likelihood import eval_split
    from tdlm.model import noise_schedule
    from tdlm.noise import TrainingNoise
    from tdlm.runs import load_checkpoint

    ck = load_checkpoint(runs["diff"]["dir"], "latest")
    mc, mask_id = ck.model.config, ck.tokenizer.mask_token_id
    rows = eval_split("validation", ck.tokenizer, ck.config.data.seq_len, ck.config)[:]["input_ids"]
    schedule = noise_schedule(mc)
    arms = {e: (TrainingNoise(e, schedule, mc.t_min), 0.0) for e in ("bernoulli", "exact-k", "importance")}
    arms["mlm"] = (TrainingNoise("bernoulli", schedule, mc.t_min), 1.0)
    res = gradient_noise.gradient_noise(ck.model, rows, arms, batches=3, batch_size=4, mask_id=mask_id, seed=5)
    # the same draws, gradients kept: the unbiased sample variance of g and the pooled mean, computed directly
    pick, grads = torch.Generator().manual_seed(5), {name: [] for name in arms}
    for i in range(3):
        ids = rows[torch.randperm(len(rows), generator=pick)[:4]]
        for name, (noise, clip) in arms.items():
            grads[name].append(gradient_noise.minibatch_gradient(
                ck.model, ids, noise, torch.Generator().manual_seed(5 * 100_003 + i), mask_id, clip))
    stacked = {name: torch.stack(g) for name, g in grads.items()}
    for name, g in stacked.items():
        assert res[name]["noise"] == pytest.approx(float(g.var(0).sum()), rel=1e-9)
    pooled = torch.cat([stacked[e] for e in ("bernoulli", "exact-k", "importance")]).mean(0)
    pooled_var = sum(float(stacked[e].var(0).sum()) for e in ("bernoulli", "exact-k", "importance")) / (3 * 9)
    assert res["exact-k"]["mean_gradient_sq"] == pytest.approx(float(pooled @ pooled) - pooled_var, rel=1e-9)
    assert res["bernoulli"]["batch_equivalent"] == 1.0
    assert res["importance"]["batch_equivalent"] == pytest.approx(res["bernoulli"]["noise"] / res["importance"]["noise"])
    # the biased MLM weight (clip 1) is a different gradient: its own draws, its own mean
    assert res["mlm"]["noise"] != pytest.approx(res["bernoulli"]["noise"])
    # fixed rows: the first batch's rows every time, so only the masking varies
    fixed = gradient_noise.gradient_noise(ck.model, rows, {"exact-k": arms["exact-k"]}, batches=3, batch_size=4,
                                          mask_id=mask_id, seed=5, fixed_rows=True)
    ids = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(5))[:4]]
    g = torch.stack([gradient_noise.minibatch_gradient(ck.model, ids, arms["exact-k"][0],
                                                       torch.Generator().manual_seed(5 * 100_003 + i), mask_id)
                     for i in range(3)])
    assert fixed["exact-k"]["noise"] == pytest.approx(float(g.var(0).sum()), rel=1e-9)
    assert gradient_noise.main(["--checkpoint", str(runs["diff"]["dir"]), "--batches", "2", "--batch-size", "2",
                                "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arms"]["bernoulli"]["batch_equivalent"] == 1.0
    assert gradient_noise.main(["--checkpoint", str(runs["ar"]["dir"]), "--batches", "2"]) == 2
    assert "masked-diffusion" in capsys.readouterr().err
