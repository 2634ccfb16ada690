"""The text tasks on the shared engine: masked diffusion (the NELBO) and the autoregressive baseline (exact NLL),
one backbone, one tokenizer and data pipeline, one objective module (``tdlm.objective``).

    accelerate launch tdlm/train.py configs/quickstart.yaml        # masked diffusion
    accelerate launch tdlm/train.py configs/quickstart_ar.yaml     # model.causal=true: autoregressive

Each task differs only in its noise and the objective function it calls; validation scores the same objective
under noise fixed for the whole run (``TextTask.evaluate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tdlm.config import ConfigError, load_config
from tdlm.data import Collator, ShardOrderSampler, resolve_data, tokenizer_fingerprint
from tdlm.diffusion import make_schedule
from tdlm.engine.launch import run_cli
from tdlm.engine.randomness import keyed_generator
from tdlm.engine.task import LossOutput, Task
from tdlm.flops import matmul_params, training_flops_per_token
from tdlm.model import TdlmForMaskedOrCausalLM, build_model
from tdlm.noise import BlockTrainingNoise, TrainingNoise
from tdlm.objective import (StepOutputs, autoregressive_outputs, block_diffusion_outputs, effective_block_size,
                            masked_diffusion_outputs, reported_sum, sequence_sums)
from tdlm.sequences import BatchPositions, RandomLength, batch_positions, resolve_never_mask

VALIDATION_SALT = 424242  # keeps the fixed validation noise apart from every training step's stream
ANNEAL_SALT = 515151  # the attention-annealing patterns' stream, apart from the masking noise


@dataclass
class ValidationSums:
    """The metric source ``val`` of a text run: the objective and its tokens over the scored validation rows,
    float64, gathered, so every process holds the same total."""

    loss_sum: torch.Tensor
    count: torch.Tensor


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync: to CUDA by an asynchronous copy from pinned memory (the
    caching host allocator keeps the pinned block until the copy is done)."""
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def load_exported(path: Path) -> TdlmForMaskedOrCausalLM:
    """A checkpoint's ``model/``, built directly: under ZeRO-3, ``from_pretrained`` would enter DeepSpeed's
    ``zero.Init`` and shard it again (a collective the other processes are not in)."""
    from safetensors.torch import load_file

    from tdlm.hf_backbone import is_hf_export, load_hf_export

    if is_hf_export(path):
        return load_hf_export(path)
    model = TdlmForMaskedOrCausalLM(TdlmForMaskedOrCausalLM.config_class.from_pretrained(str(path)))
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding and not saved
        raise RuntimeError(f"{path}: unexpected {unexpected}, missing {missing}")
    model.tie_weights()
    return model


class TextTask(Task):
    """What both text objectives share: data, tokenizer, backbone, validation, metrics, export and report."""

    positions_per_token = 1
    """Backbone positions run per training token (at that many times the context): FLOPs per token (tdlm/flops.py)."""

    no_decay = ("embed",)  # the (tied) embedding, like norms and biases, gets no weight decay

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        with accelerator.main_process_first():
            self.data = resolve_data(cfg.data, log=accelerator.print)
        tok = self.tokenizer = self.data.tokenizer
        self.mask_id, self.pad_id = tok.mask_token_id, tok.pad_token_id
        if cfg.model.pretrained:
            from tdlm.hf_backbone import build_pretrained

            self.model = build_pretrained(cfg.model, cfg.diffusion, tok, cfg.data.seq_len, log=accelerator.print)
        else:
            if cfg.model.vocab_size and cfg.model.vocab_size < len(tok):
                raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                                  f"{len(tok)}")
            self.model = build_model(cfg.model, len(tok), self.mask_id, self.pad_id, cfg.diffusion)
        self.train_set, self.collate_fn = self.data.train, Collator(self.pad_id)
        self.unique_tokens = self._limit_unique_tokens(cfg.data.unique_tokens)
        if cfg.data.streaming:
            self.train_sampler = self._shard_order_sampler()
        self.units_per_row = cfg.data.seq_len
        c = self.model.config  # tdlm's own, or an HF backbone's BackboneConfig with the same field names
        n = self.positions_per_token
        self.flops_per_unit = n * training_flops_per_token(matmul_params(self.model), c.num_layers,
                                                           n * cfg.data.seq_len, c.hidden_size)
        self.val_noise: tuple[torch.Tensor, ...] = ()
        self.never_mask = resolve_never_mask(cfg.diffusion.never_mask, tok)
        if cfg.data.random_length_prob > 0:  # training rows only: validation scores whole rows
            self.train_set = RandomLength(self.train_set, cfg.data.random_length_prob, self.pad_id, cfg.trainer.seed)
        interface = getattr(getattr(self.model, "adaptation", None), "interface", None)
        if cfg.data.document_mask and interface in ("timesteps", "logits"):
            raise ConfigError(f"data.document_mask: needs position_ids and pair masks, which the remote-code "
                              f"{interface} interface of model.pretrained={cfg.model.pretrained} does not take")

    def positions(self, batch) -> BatchPositions:
        """Which positions are attended, noised and scored (``tdlm/sequences.py``)."""
        return batch_positions(batch, self.pad_id, self.never_mask, self.cfg.model.causal)

    def _limit_unique_tokens(self, budget: int) -> int:
        """Keep the first training rows that hold ``budget`` valid tokens (0: all); the valid tokens kept. Rows are
        read only up to the budget, and the whole split's count comes from info.json when it has it, so a large
        corpus is not read through at start (its memory-mapped pages would stay resident)."""
        if not budget and "num_train_tokens" in self.data.info:
            return int(self.data.info["num_train_tokens"])
        total, rows_seen = 0, 0
        for b in self.train_set.with_format("numpy", columns=["input_ids"]).iter(batch_size=8192):
            valid = total + np.cumsum((b["input_ids"] != self.pad_id).sum(1))
            if budget and valid[-1] >= budget:
                rows = rows_seen + int(np.searchsorted(valid, budget)) + 1
                self.train_set = self.train_set.select(range(rows))
                return int(valid[rows - rows_seen - 1])
            total, rows_seen = int(valid[-1]), rows_seen + len(valid)
        if budget:
            raise ConfigError(f"data.unique_tokens: {budget:,} exceeds the training split's {total:,} tokens")
        return total

    def _shard_order_sampler(self) -> ShardOrderSampler:
        """data.streaming: the training shards (those ``data.unique_tokens`` keeps, the last one cut) in shard order."""
        shards = self.data.info.get("shards", {}).get("train")
        if not shards:
            raise ConfigError("data.streaming: the prepared data have no shards (written before them); prepare again")
        rows, files, left = [], [], len(self.train_set)
        for shard in shards:
            if left > 0:
                rows.append(min(shard["rows"], left))
                files.append(shard["file"])
                left -= rows[-1]
        t = self.cfg.trainer
        return ShardOrderSampler(rows, files, t.micro_batch_size, self.accelerator.num_processes, t.seed)

    def prepare(self, accelerator):
        val_dl = torch.utils.data.DataLoader(self.data.validation, batch_size=self.cfg.trainer.micro_batch_size,
                                             shuffle=False, collate_fn=self.collate_fn,
                                             pin_memory=accelerator.device.type == "cuda")
        self.val_dl = accelerator.prepare(val_dl)

    def layout(self) -> dict:
        return {"data.seq_len": self.cfg.data.seq_len, "data.streaming": self.cfg.data.streaming}

    def check_resume(self, ckpt: Path, saved_state: dict):
        import json

        saved = json.loads((ckpt / "model" / "config.json").read_text())
        fp = saved_state.get("tokenizer_fingerprint")
        if fp and fp != tokenizer_fingerprint(self.tokenizer):
            raise ConfigError(f"trainer.resume: tokenizer of {ckpt} differs from the data's tokenizer "
                              f"(vocab {saved['vocab_size']} vs {len(self.tokenizer)}); same data.* settings needed")
        if self.cfg.model.pretrained:  # the shape is the pretrained model's; the objective must match
            flag = saved.get("tdlm", saved)
            if bool(flag.get("causal")) != self.cfg.model.causal:
                raise ConfigError(f"model.causal: {self.cfg.model.causal} differs from the checkpoint's "
                                  f"{flag.get('causal')} in {ckpt}")
            return
        for key in ("hidden_size", "num_layers", "num_heads", "causal"):
            if saved[key] != getattr(self.cfg.model, key):
                raise ConfigError(f"model.{key}: {getattr(self.cfg.model, key)} differs from the checkpoint's "
                                  f"{saved[key]} in {ckpt}")

    def state(self) -> dict:
        return {"tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer)}

    def export(self, directory: Path):
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        if self.cfg.model.pretrained and (directory / "model").is_dir():  # the Auto classes load model/ alone
            self.tokenizer.save_pretrained(str(directory / "model"))

    def begin_step(self, step: int):
        """Attention annealing of an adapted causal LM (DiffuLLaMA): step s attends causally plus each future key
        with probability s / model.attention_anneal_steps, one pattern per step drawn from a generator keyed by
        the step (every process, and a resumed run, draws the same); full attention from then on."""
        n = self.cfg.model.attention_anneal_steps
        if n and hasattr(self.model, "set_attention_anneal"):
            ratio = (step - 1) / n if step <= n else None
            self.model.set_attention_anneal(ratio, self.cfg.data.seq_len,
                                            keyed_generator(self.cfg.trainer.seed, step, salt=ANNEAL_SALT))

    def load_export(self, model_dir: Path):
        return load_exported(model_dir)

    # ---------------------------------------------------------------------------------------- one step
    def outputs(self, model, batch, noise: tuple, clip_weight: float = 0.0, validation: bool = False) -> StepOutputs:
        raise NotImplementedError

    def loss(self, model, batch, noise):
        clip = self.cfg.diffusion.clip_weight
        out = self.outputs(model, batch, noise, clip)
        return LossOutput(out.loss_sum, out.num_tokens, reported_sum(out, clip), out)

    probe_off: str | None = None
    """Why the advanced tier's model probe (attention entropy, hidden-state norms, sequence diversity) cannot
    reproduce this task's forward, which turns it off (None: it can)."""

    def build_metrics(self, sinks, is_main):
        from tdlm.metrics.text_health import build_text_metrics

        why = self.probe_off
        if not getattr(self.model, "supports_attention_probs", True):
            why = f"the {self.model.adaptation.interface} remote-code interface returns no attention probabilities"
        backbone = {"num_layers": self.model.config.num_layers, "attention_probs": why is None}
        if why and self.cfg.metrics.tiers.advanced.enabled and is_main:
            print(f"metrics: advanced/attention_entropy, hidden-state norms and sequence_diversity are off: {why}")
        return build_text_metrics(self.cfg, mask_id=self.mask_id, device=self.accelerator.device, sinks=sinks,
                                  is_main=is_main, baselines=self.data.baselines(), backbone=backbone)

    def metric_specs(self):
        from tdlm.metrics.text import TEXT

        return TEXT.specs()

    # ---------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model, ema, step=None):
        """The objective per valid token on the validation split, float64, under the same noise every time.

        ``data.eval_batches`` counts *global* batches (the rows of one optimizer step: micro-batch x accumulation x
        processes), so any split of the same global batch scores the same rows: each process runs its share
        (rounded up) and rows past the limit are dropped after the gather."""
        acc, B = self.accelerator, self.cfg.trainer.micro_batch_size
        model = ema if ema is not None else model
        max_batches = self.cfg.data.eval_batches or None
        limit = max_batches * B * self.cfg.trainer.grad_accum_steps * acc.num_processes if max_batches else None
        per_process = math.ceil(limit / (B * acc.num_processes)) if max_batches else None
        total = torch.zeros(2, dtype=torch.float64, device=acc.device)
        # validation scores the denoiser evaluation loads: full attention, also while training anneals it
        pattern = getattr(self.model, "anneal_pattern", None)
        if pattern is not None:
            self.model.anneal_pattern = None
        for i, batch in enumerate(self.val_dl):
            if per_process and i >= per_process:
                break
            idx = batch["idx"].cpu()
            out = self.outputs(model, batch, tuple(x[idx] for x in self.val_noise), validation=True)
            rows = torch.cat([sequence_sums(out), batch["idx"][:, None].to(torch.float64)], 1)
            rows = acc.gather_for_metrics(rows)  # drops the rows Accelerate duplicated to even out shards
            if limit:
                rows = rows[rows[:, 2] < limit]
            total += rows[:, :2].sum(0)
        if pattern is not None:
            self.model.anneal_pattern = pattern
        return ValidationSums(total[0], total[1])

    def summary(self, best_val):
        return {"summary/best_val_perplexity": math.exp(best_val) if math.isfinite(best_val) else None,
                "summary/unique_tokens": self.unique_tokens}

    def report(self, result, inference_model):
        c = self.cfg
        if "val/perplexity" in result:
            kind = "exact perplexity (AR)" if c.model.causal else "perplexity bound (NELBO)"
            if c.data.source == "sft":
                kind = "conditional " + kind + " of the responses"
            print(f"validation {kind}: {result['val/perplexity']:.3f}   val/loss {result['val/loss']:.4f} "
                  f"nats/token   steps {result['summary/total_steps']}   run dir {c.run_dir}")
        if c.sample.at_end:
            for i, text in enumerate(self.sample(inference_model(), c.sample.at_end, c.sample.steps)):
                print(f"--- sample {i} ---\n{text[:400]}")

    def sample(self, model, n: int, steps: int, seed: int = 0) -> list[str]:
        raise NotImplementedError

    def close(self):
        self.__dict__.pop("val_dl", None)


class MaskedDiffusionTask(TextTask):
    """Masked (absorbing-state) diffusion: t per sequence, stratified over the global batch; every valid token
    masked independently with probability 1 - alpha(t); loss sum_masked w(t) CE (``tdlm/diffusion.py``)."""

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        d = cfg.diffusion
        self.schedule = make_schedule(d.schedule, d.loglinear_eps)
        self.noise = self.wrap_noise(TrainingNoise(d.estimator, self.schedule, d.t_min, d.stratified,
                                                   d.proposal_power), training=True)
        # Validation keeps one fixed Bernoulli noise whatever the training estimator: the same corruptions at every
        # evaluation, and a bound that does not depend on how the training gradient is estimated.
        self.val_estimator = self.wrap_noise(TrainingNoise("bernoulli", self.schedule, d.t_min, d.stratified),
                                             training=False)
        self.val_noise = self.val_estimator.draw(keyed_generator(cfg.trainer.seed, 0, salt=VALIDATION_SALT),
                                                 len(self.data.validation), cfg.data.seq_len)

    def wrap_noise(self, noise: TrainingNoise, training: bool):
        """The noise the objective draws from: per sequence here; per block in ``BlockDiffusionTask``."""
        return noise

    def draw_noise(self, generator, rows):
        return self.noise.draw(generator, rows, self.cfg.data.seq_len)

    def num_targets(self, batch):
        return self.positions(batch).eligible.sum()

    def outputs(self, model, batch, noise, clip_weight=0.0, validation=False):
        """No host sync on a GPU: a packed batch (no padding, so no ``attention_mask``) is masked on the host,
        where the noise is, and the masked positions go to the device as an index of known length, by
        asynchronous copies from pinned memory. A padded batch needs the device's pad mask, so it is masked
        there and its masked count is read back (one sync); exact-k ranks the valid positions on the host. So is
        a batch with an SFT prompt, never-masked tokens or documents: only eligible positions are noised and
        scored (``tdlm/sequences.py``)."""
        estimator = self.val_estimator if validation else self.noise
        ids, pos = batch["input_ids"], batch_positions(batch, self.pad_id, self.never_mask)
        attn, valid = pos.attention_mask, pos.eligible  # eligible: not a pad, prompt or never-masked token
        if pos.all_eligible or estimator.estimator == "exact-k":  # on the host
            masked, t, weight, ratio = estimator.mask(*noise, None if pos.all_eligible else valid.cpu())
            positions = masked.flatten().nonzero().squeeze(1)
            masked, positions, t, weight, ratio = (to_device(x, ids.device)
                                                   for x in (masked, positions, t, weight, ratio))
        else:
            masked, t, weight, ratio = estimator.mask(*(to_device(x, ids.device) for x in noise), valid)
            positions = masked.flatten().nonzero().squeeze(1)
        block_size = getattr(estimator, "block_size", 0)  # block noise (BlockDiffusionTask): the block NELBO
        if block_size:
            return block_diffusion_outputs(model, ids, valid, masked, positions, weight, self.mask_id, block_size,
                                           attn, t, clip_weight, ratio)
        return masked_diffusion_outputs(model, ids, valid, masked, positions, weight, self.mask_id, attn, t,
                                        clip_weight, ratio, pos.position_ids)

    def sample(self, model, n, steps, seed=0):
        from tdlm.sampling import ancestral_sample

        g = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        special = tuple(i for i in (self.pad_id, self.tokenizer.bos_token_id) if i is not None)
        ids = ancestral_sample(model, self.schedule, n, self.cfg.data.seq_len, self.mask_id, steps=steps,
                               generator=g, forbidden_token_ids=special)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=False)


class BlockDiffusionTask(MaskedDiffusionTask):
    """Block diffusion (BD3-LM): masked diffusion inside blocks of ``diffusion.block_size`` tokens, autoregressive
    over blocks. Each block draws its own t (any ``diffusion.estimator``, per block), validation scores the block
    NELBO under fixed per-block Bernoulli noise, and one forward over [x_t ; x] scores every block
    (``tdlm.objective.block_diffusion_outputs``, which ``outputs`` calls for block noise)."""

    probe_off = "the probe runs the plain forward, not block diffusion's [x_t ; x] pass with its block mask"
    positions_per_token = 2  # one forward over [x_t ; x]: 2L positions with a 2L context per row of L tokens

    def __init__(self, cfg, accelerator):
        self.block_size = cfg.diffusion.block_size
        super().__init__(cfg, accelerator)

    def wrap_noise(self, noise, training):
        # per-block t; the clipped schedule changes the training gradient only, never validation
        return BlockTrainingNoise(noise, self.block_size, (self.cfg.diffusion.t_clip or None) if training else None)

    def sample(self, model, n, steps, seed=0):
        from tdlm.sampling import SamplerConfig, block_generate

        g = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        special = tuple(i for i in (self.pad_id, self.tokenizer.bos_token_id) if i is not None)
        blocks = self.cfg.data.seq_len // self.block_size
        cfg = SamplerConfig(steps=max(1, steps // blocks), step_schedule=self.schedule, forbidden_token_ids=special)
        out = block_generate(model, n, self.cfg.data.seq_len, self.block_size, self.mask_id, cfg, g)
        return self.tokenizer.batch_decode(out.ids, skip_special_tokens=False)


class AutoregressiveTask(TextTask):
    """The same backbone, causal: next-token NLL, exact perplexity; no noise."""

    def num_targets(self, batch):
        return self.positions(batch).eligible[:, 1:].sum()

    def outputs(self, model, batch, noise, clip_weight=0.0, validation=False):
        pos = batch_positions(batch, self.pad_id, self.never_mask, causal=True)
        return autoregressive_outputs(model, batch["input_ids"], pos.eligible, pos.attention_mask, pos.position_ids)

    def sample(self, model, n, steps, seed=0):
        from tdlm.sampling import SamplerConfig, ar_generate

        g = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        prompt = torch.full((n, 1), self.tokenizer.bos_token_id, device=self.accelerator.device)
        ids = ar_generate(model, prompt, self.cfg.data.seq_len, SamplerConfig(), g)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=False)


def text_task(cfg, accelerator) -> TextTask:
    """The task a text config asks for: autoregressive with ``model.causal``, block diffusion with a
    ``diffusion.block_size`` shorter than the row, masked diffusion otherwise."""
    if cfg.model.causal:
        return AutoregressiveTask(cfg, accelerator)
    if effective_block_size(cfg.diffusion.block_size, cfg.data.seq_len):
        return BlockDiffusionTask(cfg, accelerator)
    return MaskedDiffusionTask(cfg, accelerator)


def text_engine(cfg):
    """An ``Engine`` over the text task of ``cfg`` (what ``tdlm/train.py`` runs)."""
    from tdlm.engine.loop import Engine

    return Engine(cfg, text_task)


def cli(argv: list[str] | None = None, doc: str = __doc__) -> int:
    """``tdlm/train.py``'s main: config -> engine(text task) -> fit -> report."""
    return run_cli(argv, doc, load_config, text_task)
