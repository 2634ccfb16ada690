"""Train a masked-diffusion (or, with ``model.causal=true``, autoregressive) language model.

    accelerate launch tdlm/train.py configs/quickstart.yaml trainer.max_steps=50
    python tdlm/train.py configs/quickstart.yaml                      # same, one process
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tdlm/train.py CONFIG   # 2 CPU procs

The loss of a step is sum over masked tokens of w(t) * CE divided by the *global* number of valid tokens of
that optimizer step (all processes and micro-steps), so it does not depend on how the batch is split.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `python tdlm/train.py` / `accelerate launch tdlm/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from tdlm.checkpoint import (check_run_dir, list_checkpoints, prepare_run_dir, prune_checkpoints, read_state,
                             resolve_resume, save_checkpoint)
from tdlm.config import ConfigError, RunConfig, load_config
from tdlm.data import Collator, resolve_data, tokenizer_fingerprint
from tdlm.diffusion import ar_token_losses, diffusion_token_losses, make_schedule, noise_mask, sample_t
from tdlm.faults import NonFiniteWatch, StopSignal
from tdlm.metrics.core import StepInfo
from tdlm.metrics.sinks import run_sinks
from tdlm.metrics.text import TEXT
from tdlm.metrics.text_health import build_text_metrics
from tdlm.model import TdlmForMaskedDiffusion, build_model


def _quiet_libraries():
    """Drop per-save progress bars and the tied-weights notice (lm_head shares the embedding on purpose)."""
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message says why and where."""


@dataclass
class StepOutputs:
    """Everything one micro-batch's loss was computed from; metric collectors read these tensors."""

    loss_sum: torch.Tensor       # sum of w(t)*CE over masked tokens (AR: sum of NLL), float32, with grad
    num_tokens: torch.Tensor     # valid tokens in the NELBO denominator (AR: valid targets)
    input_ids: torch.Tensor
    valid: torch.Tensor          # (B, L) bool
    masked: torch.Tensor | None = None   # (B, L) bool
    t: torch.Tensor | None = None        # (B,)
    weight: torch.Tensor | None = None   # (B,) w(t)
    token_ce: torch.Tensor | None = None     # (M,) CE of masked tokens (AR: (B, L-1) NLL)
    logits: torch.Tensor | None = None       # (M, V) logits of masked tokens (AR: (B, L, V))
    positions: torch.Tensor | None = None    # (M,) flat index b * L + i of each masked token, row-major


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync: to CUDA by an asynchronous copy from pinned memory (the
    caching host allocator keeps the pinned block until the copy is done)."""
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """Same stream on every process: noise is drawn for the global batch, then each process takes its rows."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + salt) % (2**63))


def make_accelerator(cfg: RunConfig):
    """The Accelerator for this launch; refuses launches that would silently not be distributed as asked."""
    from accelerate import Accelerator
    from accelerate.utils import (DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin,
                                  InitProcessGroupKwargs)

    kwargs = {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true"):
        raise ConfigError("launch: ACCELERATE_USE_CPU is set, so Accelerate would silently run plain DDP instead of "
                          "DeepSpeed; unset it (DeepSpeed on a CPU needs no flag)")
    if world > 1 and not torch.cuda.is_available():
        if deepspeed:
            # Accelerate picks no backend for DeepSpeed without CUDA and then miscounts processes; gloo fixes it.
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            # A --multi_gpu launch without CUDA otherwise trains N unsynchronised copies over the same data.
            kwargs["cpu"] = True
    mp = cfg.trainer.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if os.environ.get("ACCELERATE_MIXED_PRECISION") not in (None, "", "no"):
        mp = os.environ["ACCELERATE_MIXED_PRECISION"]
    acc = Accelerator(
        mixed_precision=mp,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.trainer.grad_accum_steps, sync_with_dataloader=False),
        # on a GPU, batches go over by asynchronous copies from pinned memory (the DataLoaders pin): no host sync
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=torch.cuda.is_available()),
        step_scheduler_with_optimizer=False, **kwargs)
    if acc.num_processes != world:
        raise ConfigError(f"launch: {world} processes were started but they formed a group of {acc.num_processes}; "
                          f"use a config from configs/accelerate/ (see README, Distributed)")
    if acc.distributed_type == DistributedType.DEEPSPEED:
        if cfg.trainer.compile:
            raise ConfigError("trainer.compile: not supported with DeepSpeed (its engine wraps the model); set it "
                              "to false")
        _match_deepspeed_config(acc.state.deepspeed_plugin, cfg)
    return acc


def _match_deepspeed_config(plugin, cfg: RunConfig) -> None:
    """Fill DeepSpeed's 'auto' accumulation/clipping from the trainer's config; refuse numbers that disagree."""
    ds = plugin.deepspeed_config
    for key, name, want in (("gradient_accumulation_steps", "trainer.grad_accum_steps", cfg.trainer.grad_accum_steps),
                            ("gradient_clipping", "optim.grad_clip", cfg.optim.grad_clip)):
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = want
            setattr(plugin, key, want)
        elif float(have) != float(want):
            raise ConfigError(f"{name}: {want} but the DeepSpeed config sets {key}={have}; set it to auto there")
    if ds["zero_optimization"].get("stage") == 3:
        if cfg.trainer.ema_decay > 0:
            raise ConfigError("trainer.ema_decay: EMA is not supported under ZeRO-3 (parameters are sharded); "
                              "set it to 0 or use ZeRO-2")
        # Every checkpoint exports a consolidated save_pretrained model, which needs the gathered weights.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        plugin.zero3_save_16bit_model = True


def lr_lambda(optim_cfg, max_steps: int):
    def f(step: int) -> float:
        if step < optim_cfg.warmup_steps:
            return (step + 1) / optim_cfg.warmup_steps
        progress = min(1.0, (step - optim_cfg.warmup_steps) / max(1, max_steps - optim_cfg.warmup_steps))
        return optim_cfg.min_lr_ratio + (1 - optim_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_optimizer(model, optim_cfg):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or "embed" in n)]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                             fused=optim_cfg.fused)


def load_exported(path: Path) -> TdlmForMaskedDiffusion:
    """A checkpoint's ``model/``, built directly: under ZeRO-3, ``from_pretrained`` would enter DeepSpeed's
    ``zero.Init`` and shard it again (a collective the other processes are not in)."""
    from safetensors.torch import load_file

    model = TdlmForMaskedDiffusion(TdlmForMaskedDiffusion.config_class.from_pretrained(str(path)))
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding and not saved
        raise RuntimeError(f"{path}: unexpected {unexpected}, missing {missing}")
    model.tie_weights()
    return model


class Trainer:
    def __init__(self, cfg: RunConfig):
        _quiet_libraries()
        self.cfg = cfg
        self.accelerator = acc = make_accelerator(cfg)
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self._replace_old_run = check_run_dir(self.run_dir, self.ckpt_root, cfg.trainer)
        torch.manual_seed(cfg.trainer.seed)

        with acc.main_process_first():
            self.data = resolve_data(cfg.data, log=acc.print)
        tok = self.tokenizer = self.data.tokenizer
        self.mask_id, self.pad_id = tok.mask_token_id, tok.pad_token_id
        if cfg.model.vocab_size and cfg.model.vocab_size < len(tok):
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {len(tok)}")
        self.resume_from = resolve_resume(cfg.trainer.resume, self.ckpt_root)
        if self.resume_from is not None:
            self._check_resume_compatible(self.resume_from)
        elif cfg.trainer.resume:
            acc.print(f"trainer.resume={cfg.trainer.resume}: no checkpoint in {self.ckpt_root}; starting from step 0")

        self.model = build_model(cfg.model, len(tok), self.mask_id, self.pad_id)
        self.schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.loglinear_eps)
        self.causal = cfg.model.causal
        optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.trainer.max_steps))

        collate = Collator(self.pad_id)
        train_dl = torch.utils.data.DataLoader(
            self.data.train, batch_size=cfg.trainer.micro_batch_size, shuffle=True, drop_last=True,
            collate_fn=collate, num_workers=cfg.trainer.num_workers, pin_memory=acc.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.trainer.seed))
        val_dl = torch.utils.data.DataLoader(self.data.validation, batch_size=cfg.trainer.micro_batch_size,
                                             shuffle=False, collate_fn=collate, pin_memory=acc.device.type == "cuda")
        self.model, self.optimizer, self.train_dl, self.val_dl = acc.prepare(self.model, optimizer, train_dl, val_dl)
        acc.register_for_checkpointing(self.scheduler)
        # The compiled module shares the parameters; evaluation, metrics' extra passes and sampling use the plain
        # one (other shapes and flags would each cost a recompile), checkpoints save the plain one (same keys).
        self.train_model = self.model
        if cfg.trainer.compile:
            if cfg.metrics.tiers.research.enabled:
                # its per-bucket gradients are extra backward passes through the retained graph, which a compiled
                # backward that donates (reuses) its saved buffers refuses
                torch._functorch.config.donated_buffer = False
            self.train_model = torch.compile(self.model)
        self.ema = None
        if cfg.trainer.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(acc.unwrap_model(self.model),
                                     multi_avg_fn=get_ema_multi_avg_fn(cfg.trainer.ema_decay), use_buffers=False)
            acc.register_for_checkpointing(self.ema)
        if len(self.train_dl) < cfg.trainer.grad_accum_steps:
            raise ConfigError(f"trainer.micro_batch_size: the training split has only {len(self.train_dl)} batches "
                              f"per process, fewer than grad_accum_steps={cfg.trainer.grad_accum_steps}")

        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.best_val = math.inf
        self.best_ckpt: str | None = None
        self.wandb_id: str | None = None
        self.history: dict = {}
        if self.resume_from is not None:
            self._load(self.resume_from)
        self._val_noise = self._make_val_noise()
        prepare_run_dir(acc, cfg, self._replace_old_run)
        self.sinks = []
        if acc.is_main_process:
            tok.save_pretrained(str(self.run_dir / "tokenizer"))
            self.sinks, self.wandb_id = run_sinks(cfg, self.step, self.wandb_id, TEXT.specs())
        # Every process computes (collectors sync sums across processes); only the main one has sinks.
        self.metrics = build_text_metrics(cfg, mask_id=self.mask_id, device=acc.device, sinks=self.sinks,
                                          is_main=acc.is_main_process, baselines=self.data.baselines())
        if self.resume_from is not None:
            self.metrics.load_state_dict(self._metric_state, rank=acc.process_index)

    # -------------------------------------------------------------------------------------------- set-up
    def _layout(self) -> dict:
        """What the saved data position and RNG states mean; a resume must keep it to be exact."""
        return {"trainer.micro_batch_size": self.cfg.trainer.micro_batch_size, "data.seq_len": self.cfg.data.seq_len,
                "num_processes": self.accelerator.num_processes}

    def _check_resume_compatible(self, ckpt: Path):
        saved = json.loads((ckpt / "model" / "config.json").read_text())
        fp = read_state(ckpt).get("tokenizer_fingerprint")
        if fp and fp != tokenizer_fingerprint(self.tokenizer):
            raise ConfigError(f"trainer.resume: tokenizer of {ckpt} differs from the data's tokenizer "
                              f"(vocab {saved['vocab_size']} vs {len(self.tokenizer)}); same data.* settings needed")
        for key in ("hidden_size", "num_layers", "num_heads", "causal"):
            if saved[key] != getattr(self.cfg.model, key):
                raise ConfigError(f"model.{key}: {getattr(self.cfg.model, key)} differs from the checkpoint's "
                                  f"{saved[key]} in {ckpt}")
        layout = read_state(ckpt).get("layout", {})
        for key, now in self._layout().items():
            if key in layout and layout[key] != now:
                raise ConfigError(f"{key}: {now} differs from the checkpoint's {layout[key]} in {ckpt}; an exact "
                                  f"resume (data position, per-process RNG, ZeRO shards) needs the same value")

    def _make_val_noise(self):
        """Fixed masking noise for the validation split, so every evaluation scores the same corruptions."""
        n, L = len(self.data.validation), self.cfg.data.seq_len
        g = step_generator(self.cfg.trainer.seed, 0, salt=424242)
        t = sample_t(n, self.cfg.diffusion.t_min, self.cfg.diffusion.stratified, g)
        return t, torch.rand(n, L, generator=g)

    def _load(self, ckpt: Path):
        self.accelerator.load_state(str(ckpt))
        st = read_state(ckpt)
        self.step, self.epoch, self.batches_in_epoch = st["step"], st["epoch"], st["batches_in_epoch"]
        self.best_val, self.best_ckpt, self.wandb_id = st["best_val"], st.get("best_ckpt"), st.get("wandb_id")
        self.history = st.get("history", {})
        self._metric_state = st.get("metrics", {})
        self.accelerator.print(f"resumed from {ckpt} at step {self.step}")

    # -------------------------------------------------------------------------------------------- loss
    def compute_loss(self, batch, t=None, uniforms=None, model=None) -> StepOutputs:
        """The loss of one micro-batch. ``t`` (B,) and ``uniforms`` (B, L) are the masking noise, drawn on the host.

        No host sync on a GPU: a packed batch (no padding, so no ``attention_mask``) is masked on the host, where
        the noise is, and the masked positions go to the device as an index of known length, by asynchronous
        copies from pinned memory; the LM head and the CE then run at those positions only. A padded batch
        needs the device's pad mask, so it is masked there and its masked count is read back (one sync).
        """
        model = self.model if model is None else model  # not `or`: bool() of a compiled module raises
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        valid = ids != self.pad_id
        if self.causal:
            logits = model(ids, attn)
            nll, tgt_valid = ar_token_losses(logits, ids, valid)
            return StepOutputs(nll.sum(), tgt_valid.sum(), ids, valid, token_ce=nll, logits=logits)
        if attn is None:  # every position is valid: the mask depends on the noise alone, on the host
            masked = noise_mask(t, uniforms, self.schedule)
            positions = masked.flatten().nonzero().squeeze(1)
            masked, positions, t = (to_device(x, ids.device) for x in (masked, positions, t))
        else:
            t = to_device(t, ids.device)
            masked = noise_mask(t, to_device(uniforms, ids.device), self.schedule, valid)
            positions = masked.flatten().nonzero().squeeze(1)
        weight = self.schedule.weight(t.float())
        noisy = torch.where(masked, torch.full_like(ids, self.mask_id), ids)
        logits = model(noisy, attn, logits_index=positions)
        ce = diffusion_token_losses(logits, ids.flatten()[positions])
        w = weight[positions // ids.shape[1]]
        if self.cfg.diffusion.clip_weight > 0 and model.training:  # biased, for the gradient only
            w = w.clamp(max=self.cfg.diffusion.clip_weight)
        return StepOutputs((w * ce).sum(), valid.sum(), ids, valid, masked, t, weight, ce, logits, positions)

    def _step_noise(self, step: int):
        """t and mask uniforms for the whole optimizer step's global batch: (accum * world * B, L)."""
        c = self.cfg
        n = c.trainer.grad_accum_steps * self.accelerator.num_processes * c.trainer.micro_batch_size
        g = step_generator(c.trainer.seed, step + 1)
        t = sample_t(n, c.diffusion.t_min, c.diffusion.stratified, g)
        return t, torch.rand(n, c.data.seq_len, generator=g)

    def _rows(self, micro: int) -> slice:
        B, world = self.cfg.trainer.micro_batch_size, self.accelerator.num_processes
        start = (micro * world + self.accelerator.process_index) * B  # the order Accelerate shards batches in
        return slice(start, start + B)

    def _num_targets(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens in the NELBO denominator: every valid token (AR: every valid next-token target)."""
        return ((ids[:, 1:] if self.causal else ids) != self.pad_id).sum()

    # -------------------------------------------------------------------------------------------- data
    def _next_batches(self, n: int) -> list:
        out = []
        while len(out) < n:
            if not hasattr(self, "_iter"):
                self.train_dl.set_epoch(self.epoch)
                dl = self.train_dl
                if self.batches_in_epoch:
                    dl = self.accelerator.skip_first_batches(self.train_dl, self.batches_in_epoch)
                self._iter = iter(dl)
            try:
                out.append(next(self._iter))
                self.batches_in_epoch += 1
            except StopIteration:
                del self._iter
                self.epoch += 1
                self.batches_in_epoch = 0
        return out

    # -------------------------------------------------------------------------------------------- loop
    def train(self, stop_at: int | None = None) -> dict:
        """Run to ``trainer.max_steps`` (or stop early after ``stop_at`` steps, as an interruption would).

        SIGTERM (preemption) makes every process stop after the same step, write a checkpoint and return with
        ``self.preempted`` set. A NaN/Inf loss or gradient norm raises ``TrainingStopped`` naming the first bad
        step, at the next log step or before the next save, so the poisoned state is never saved.
        """
        self._stop = StopSignal().install()
        self._watch = NonFiniteWatch()
        self.preempted = False
        try:
            return self._train(stop_at)
        finally:
            self._stop.uninstall()

    def _train(self, stop_at: int | None) -> dict:
        acc, c = self.accelerator, self.cfg
        model, opt = self.model, self.optimizer
        accum, world = c.trainer.grad_accum_steps, acc.num_processes
        tokens_per_step = accum * world * c.trainer.micro_batch_size * c.data.seq_len
        raw_model = acc.unwrap_model(model)
        bar = None
        if acc.is_main_process and c.trainer.progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=c.trainer.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        t0 = time.perf_counter()
        start_step = self.step
        last = {}
        model.train()
        while self.step < min(c.trainer.max_steps, stop_at or c.trainer.max_steps):
            step, step_start = self.step + 1, time.perf_counter()
            batches = self._next_batches(accum)
            t_all, u_all = self._step_noise(self.step)
            local = sum(self._num_targets(b["input_ids"]) for b in batches).double()
            # One tensor all-reduce, no host sync: the global token count and the processes' SIGTERM votes.
            n_global, stop_votes = acc.reduce(torch.stack([local, self._stop.flag(local.device)]), "sum")
            self._stop.push(stop_votes)
            grad_norm, step_loss = None, torch.zeros((), dtype=torch.float64, device=acc.device)
            for m, batch in enumerate(batches):
                rows = self._rows(m)
                with acc.accumulate(model):
                    out = self.compute_loss(batch, t_all[rows], u_all[rows], model=self.train_model)
                    self.metrics.update(step, batch=out, model=raw_model)  # before backward: may reuse the graph
                    # x world: DDP averages gradients over processes; x accum: accelerate divides by accum.
                    acc.backward(out.loss_sum * (world * accum) / n_global)
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(model.parameters(), c.optim.grad_clip or float("inf"))
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                step_loss += out.loss_sum.detach().double()
            self._watch.update(step, step_loss, grad_norm)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step used
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(raw_model)
            self.step += 1
            self.metrics.update(step, step=StepInfo(grad_norm, lr, tokens_per_step, time.perf_counter() - step_start,
                                                    self.epoch, raw_model))
            if bar is not None:
                bar.update(1)

            logs = self.metrics.compute(step) if self.metrics.due(step) else {}
            if step % c.trainer.eval_every_n_steps == 0 or step == c.trainer.max_steps:
                logs.update(self.evaluate())
                self.history.setdefault("val_loss", []).append([step, self.epoch, logs["val/loss"]])
            if logs:
                last.update(logs)
                self.log(logs)  # the nonfinite_loss health rule stops here when the logged loss is NaN/Inf
                self._check_finite()  # ... and this, when a step between two logs was
                if bar is not None and "train/loss" in logs:
                    bar.set_postfix(loss=f"{logs['train/loss']:.3f}",
                                    tok_s=f"{logs.get('train/tokens_per_second', 0):.0f}")
            saved = False
            if "val/loss" in logs and logs["val/loss"] < self.best_val:
                self.best_val = logs["val/loss"]
                self.best_ckpt = f"step_{step:07d}"
                self.save()  # the best checkpoint is always on disk
                saved = True
            if not saved and (step % c.trainer.save_every_n_steps == 0 or step == c.trainer.max_steps):
                self.save()
                saved = True
            if self._stop.should_stop():  # the same step on every process
                if not saved:
                    self.save()
                self.preempted = True
                break
        if bar is not None:
            bar.close()
        hours = (time.perf_counter() - t0) / 3600
        summary = {"summary/training_time_hours": hours, "summary/total_steps": self.step,
                   "summary/final_loss": last.get("train/loss", float("nan")), "summary/best_val_loss": self.best_val,
                   "summary/best_val_perplexity": math.exp(self.best_val) if math.isfinite(self.best_val) else None,
                   "summary/steps_this_session": self.step - start_step}
        if not self.preempted:  # the run is not over: its summary comes when it is
            self.log(summary)
        return {**last, **summary}

    def _check_finite(self):
        """Collective. Raise if a step since the last check had a NaN/Inf loss or gradient norm on any process."""
        bad = self._watch.first_bad_step(self.accelerator) if hasattr(self, "_watch") else None
        if bad is not None:
            raise TrainingStopped(f"non-finite loss or gradient norm at step {bad}; stopped at step {self.step} "
                                  f"without saving the poisoned state (last good checkpoint: {self._latest_name()})")

    def _latest_name(self):
        ckpts = list_checkpoints(self.ckpt_root)
        return ckpts[-1].name if ckpts else "none"

    def log(self, metrics: dict):
        """Health rules, then every sink; a rule that stops training (NaN/Inf loss) raises here."""
        stops = self.metrics.log(self.step, metrics)
        if stops:
            rule, message = stops[0]
            if self.accelerator.is_main_process:  # what can be saved: the metrics (already flushed) and why
                (self.run_dir / "stopped.json").write_text(json.dumps(
                    {"step": self.step, "rule": rule.name, "message": message,
                     "last_checkpoint": self._latest_name(), "metrics": {k: str(v) for k, v in metrics.items()}},
                    indent=1))
            raise TrainingStopped(f"{message}; stopping without saving the poisoned state (last good "
                                  f"checkpoint: {self._latest_name()})")

    # -------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict:
        """NELBO per valid token on the validation split (exact NLL for AR), float64, identical noise each time."""
        acc = self.accelerator
        model = self.ema.module if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        # eval_batches counts *global* batches, so 1 and N processes score the same rows: each process runs its
        # share (rounded up) and rows past the limit are dropped after the gather.
        max_batches = max_batches or self.cfg.trainer.eval_batches or None
        limit = max_batches * self.cfg.trainer.micro_batch_size if max_batches else None
        per_process = math.ceil(max_batches / acc.num_processes) if max_batches else None
        t_all, u_all = self._val_noise
        total = torch.zeros(2, dtype=torch.float64, device=acc.device)
        for i, batch in enumerate(self.val_dl):
            if per_process and i >= per_process:
                break
            idx = batch["idx"].cpu()
            out = self.compute_loss(batch, t_all[idx], u_all[idx], model=model)
            rows = torch.cat([self._per_row_sums(out), batch["idx"][:, None].to(torch.float64)], 1)
            rows = acc.gather_for_metrics(rows)  # drops the rows Accelerate duplicated to even out shards
            if limit:
                rows = rows[rows[:, 2] < limit]
            total += rows[:, :2].sum(0)
        model.train(was_training)
        loss = float(total[0] / total[1])
        return {"val/loss": loss, "val/perplexity": math.exp(loss), "val/num_tokens": float(total[1])}

    def _per_row_sums(self, out: StepOutputs) -> torch.Tensor:
        B = out.input_ids.shape[0]
        if self.causal:
            return torch.stack([out.token_ce.double().sum(1), out.valid[:, 1:].double().sum(1)], 1)
        rows = out.positions // out.input_ids.shape[1]
        nelbo = torch.zeros(B, dtype=torch.float64, device=out.input_ids.device)
        nelbo.index_add_(0, rows, (out.weight[rows].double() * out.token_ce.double()))
        return torch.stack([nelbo, out.valid.double().sum(1)], 1)

    # -------------------------------------------------------------------------------------------- save
    def save(self):
        """Collective: checkpoint the current step (never a state that followed a NaN/Inf step)."""
        self._check_finite()
        state = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                 "best_val": self.best_val, "best_ckpt": self.best_ckpt, "wandb_id": self.wandb_id,
                 "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer), "history": self.history,
                 "world_size": self.accelerator.num_processes, "layout": self._layout(),
                 "metrics": self.metrics.state_dict()}
        export = self.ema.module if self.ema is not None else self.model
        save_checkpoint(self.accelerator, self.ckpt_root, self.step, state, export, self.tokenizer,
                        self.cfg.trainer.min_free_disk_mb)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.ckpt_root, self.cfg.trainer.keep_last, self.best_ckpt)

    def sample(self, n: int, steps: int, seed: int = 0) -> list[str]:
        from tdlm.sampling import ancestral_sample

        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:  # sharded parameters: sample from the exported model
            model = load_exported(self.ckpt_root / self._latest_name() / "model").to(self.accelerator.device)
        else:
            model = self.accelerator.unwrap_model(self.ema.module if self.ema is not None else self.model)
        model.eval()
        g = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        if self.causal:
            ids = torch.full((n, 1), self.tokenizer.bos_token_id, device=self.accelerator.device)
            for _ in range(self.cfg.data.seq_len - 1):
                logits = model(ids)[:, -1].float()
                probs = logits.softmax(-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
        else:
            special = tuple(i for i in (self.pad_id, self.tokenizer.bos_token_id) if i is not None)
            ids = ancestral_sample(model, self.schedule, n, self.cfg.data.seq_len, self.mask_id, steps=steps,
                                   generator=g, forbidden_token_ids=special)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=False)

    def close(self):
        for sink in self.sinks:
            sink.close()
        self.sinks.clear()
        acc = self.accelerator
        if acc.state.deepspeed_plugin is not None:
            acc.free_memory()  # DeepSpeed's engine.destroy() needs the process group that end_training() destroys
        acc.end_training()
        # Two-process gloo runs abort at exit about 1 in 6 unless the prepared objects are dropped first.
        del self.model, self.train_model, self.optimizer, self.train_dl, self.val_dl
        self.__dict__.pop("_iter", None)
        acc.free_memory()
        gc.collect()


def preempted_message(trainer: Trainer, argv: list[str]) -> str:
    """How to continue a run stopped by SIGTERM: the same command with trainer.resume=auto."""
    args = [a for a in argv if not a.startswith(("trainer.resume=", "trainer.overwrite="))]
    launcher = "accelerate launch <same launch options>" if "LOCAL_RANK" in os.environ else "python"
    cmd = " ".join(shlex.quote(a) for a in [sys.argv[0], *args, "trainer.resume=auto"])
    return (f"stopped by SIGTERM after step {trainer.step}; checkpoint {trainer.ckpt_root / trainer._latest_name()} "
            f"written. Resume with: {launcher} {cmd}")


def run_cli(argv: list[str] | None, doc: str, load, make_trainer, train_and_report) -> int:
    """The shell both trainers' ``main`` share: ``--help``; bad input (``ConfigError``) is one ``error:`` line and
    exit code 2, a run stopped by a health rule (``TrainingStopped``) one line and 3; the trainer is closed
    (wandb finished, process group torn down) whatever happens."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        return 0 if argv else 2
    trainer = None
    try:
        cfg = load(argv[0], argv[1:])
        trainer = make_trainer(cfg)
        return train_and_report(cfg, trainer, argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        if trainer is not None:
            trainer.close()


def _train_and_report(cfg: RunConfig, trainer: Trainer, argv: list[str]) -> int:
    result = trainer.train()
    acc = trainer.accelerator
    if trainer.preempted:
        if acc.is_main_process:
            print(preempted_message(trainer, argv), flush=True)
        return 0
    if acc.is_main_process and "val/perplexity" in result:
        vp = result.get("val/perplexity")
        kind = "exact perplexity (AR)" if cfg.model.causal else "perplexity bound (NELBO)"
        print(f"validation {kind}: {vp:.3f}   val/loss {result.get('val/loss'):.4f} nats/token   "
              f"steps {result['summary/total_steps']}   run dir {cfg.run_dir}")
    if cfg.trainer.sample_at_end and acc.is_main_process:
        for i, text in enumerate(trainer.sample(cfg.trainer.sample_at_end, cfg.trainer.sample_steps)):
            print(f"--- sample {i} ---\n{text[:400]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, __doc__, load_config, Trainer, _train_and_report)


if __name__ == "__main__":
    sys.exit(main())
