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
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `python tdlm/train.py` / `accelerate launch tdlm/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import yaml

from tdlm.checkpoint import (list_checkpoints, prune_checkpoints, read_state, resolve_resume, save_checkpoint)
from tdlm.config import ConfigError, RunConfig, load_config
from tdlm.data import Collator, resolve_data, tokenizer_fingerprint
from tdlm.diffusion import apply_noise, ar_token_losses, diffusion_token_losses, make_schedule, sample_t
from tdlm.metrics.sinks import JsonlSink, WandbSink
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


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """Same stream on every process: noise is drawn for the global batch, then each process takes its rows."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + salt) % (2**63))


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs

    kwargs = {}
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if multi and deepspeed and not torch.cuda.is_available():
        # Accelerate picks no backend for DeepSpeed without CUDA and then miscounts processes; gloo fixes it.
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    mp = cfg.trainer.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if os.environ.get("ACCELERATE_MIXED_PRECISION") not in (None, "", "no"):
        mp = os.environ["ACCELERATE_MIXED_PRECISION"]
    return Accelerator(
        mixed_precision=mp,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.trainer.grad_accum_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False, **kwargs)


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


class Trainer:
    def __init__(self, cfg: RunConfig):
        _quiet_libraries()
        self.cfg = cfg
        self.accelerator = acc = make_accelerator(cfg)
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self._check_run_dir()
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

        self.model = build_model(cfg.model, len(tok), self.mask_id, self.pad_id)
        self.schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.loglinear_eps)
        self.causal = cfg.model.causal
        optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.trainer.max_steps))

        collate = Collator(self.pad_id)
        train_dl = torch.utils.data.DataLoader(
            self.data.train, batch_size=cfg.trainer.micro_batch_size, shuffle=True, drop_last=True,
            collate_fn=collate, num_workers=cfg.trainer.num_workers,
            generator=torch.Generator().manual_seed(cfg.trainer.seed))
        val_dl = torch.utils.data.DataLoader(self.data.validation, batch_size=cfg.trainer.micro_batch_size,
                                             shuffle=False, collate_fn=collate)
        self.model, self.optimizer, self.train_dl, self.val_dl = acc.prepare(self.model, optimizer, train_dl, val_dl)
        acc.register_for_checkpointing(self.scheduler)
        self.ema = None
        if cfg.trainer.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(acc.unwrap_model(self.model), multi_avg_fn=get_ema_multi_avg_fn(cfg.trainer.ema_decay),
                                     use_buffers=False)
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
        self.sinks = []
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(
                {**cfg.to_dict(), "world_size": acc.num_processes}, sort_keys=False))
            tok.save_pretrained(str(self.run_dir / "tokenizer"))
            self.sinks.append(JsonlSink(self.run_dir / "metrics.jsonl",
                                        truncate_after_step=self.step if self.resume_from else None))
            if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
                sink = WandbSink(cfg.wandb, self.run_dir, cfg.to_dict(), run_id=self.wandb_id)
                self.wandb_id = sink.id
                self.sinks.append(sink)

    # -------------------------------------------------------------------------------------------- set-up
    def _check_run_dir(self):
        t = self.cfg.trainer
        has_run = (self.run_dir / "metrics.jsonl").exists() or bool(list_checkpoints(self.ckpt_root))
        if has_run and not t.resume and not t.overwrite:
            raise ConfigError(f"trainer.output_dir: {self.run_dir} already holds a run; set trainer.resume=auto "
                              f"to continue it or trainer.overwrite=true to replace it")
        if has_run and t.overwrite and not t.resume and self.accelerator.is_main_process:
            shutil.rmtree(self.run_dir)
        self.accelerator.wait_for_everyone()

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
        self.accelerator.print(f"resumed from {ckpt} at step {self.step}")

    # -------------------------------------------------------------------------------------------- loss
    def compute_loss(self, batch, t=None, uniforms=None, model=None) -> StepOutputs:
        model = self.model if model is None else model  # not `or`: bool() of a compiled module raises
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        valid = ids != self.pad_id
        if self.causal:
            logits = model(ids, attn)
            nll, tgt_valid = ar_token_losses(logits, ids, valid)
            return StepOutputs(nll.sum(), tgt_valid.sum(), ids, valid, token_ce=nll, logits=logits)
        nb = apply_noise(ids, valid, t.to(ids.device), uniforms.to(ids.device), self.schedule, self.mask_id)
        logits = model(nb.noisy_ids, attn, logits_mask=nb.masked)
        ce = diffusion_token_losses(logits, ids[nb.masked])
        w = nb.weight[:, None].expand_as(ids)[nb.masked]
        if self.cfg.diffusion.clip_weight > 0 and model.training:  # biased, for the gradient only
            w = w.clamp(max=self.cfg.diffusion.clip_weight)
        return StepOutputs((w * ce).sum(), valid.sum(), ids, valid, nb.masked, nb.t, nb.weight, ce, logits)

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
        """Run to ``trainer.max_steps`` (or stop early after ``stop_at`` steps, as an interruption would)."""
        acc, c = self.accelerator, self.cfg
        model, opt = self.model, self.optimizer
        accum, world = c.trainer.grad_accum_steps, acc.num_processes
        tokens_per_step = accum * world * c.trainer.micro_batch_size * c.data.seq_len
        log_every = c.metrics.logging_steps
        bar = None
        if acc.is_main_process and c.trainer.progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=c.trainer.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        win_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
        win_tokens = torch.zeros((), dtype=torch.float64, device=acc.device)
        win_t = torch.zeros((), dtype=torch.float64, device=acc.device)
        win_steps, win_start = 0, time.perf_counter()
        t0 = time.perf_counter()
        start_step = self.step
        last = {}
        model.train()
        while self.step < min(c.trainer.max_steps, stop_at or c.trainer.max_steps):
            batches = self._next_batches(accum)
            t_all, u_all = self._step_noise(self.step)
            local = sum(self._num_targets(b["input_ids"]) for b in batches).double()
            n_global = acc.reduce(local, "sum")  # tensor all-reduce: no host sync
            for m, batch in enumerate(batches):
                rows = self._rows(m)
                with acc.accumulate(model):
                    out = self.compute_loss(batch, t_all[rows], u_all[rows])
                    # x world: DDP averages gradients over processes; x accum: accelerate divides by accum.
                    acc.backward(out.loss_sum * (world * accum) / n_global)
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(model.parameters(), c.optim.grad_clip or float("inf"))
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                win_loss += out.loss_sum.detach().double()
                win_tokens += out.num_tokens.double()
                if out.t is not None:
                    win_t += out.t.double().sum()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(acc.unwrap_model(model))
            self.step += 1
            win_steps += 1
            if bar is not None:
                bar.update(1)

            if self.step % log_every == 0 or self.step == c.trainer.max_steps:
                sums = acc.reduce(torch.stack([win_loss, win_tokens, win_t]), "sum")
                loss = float(sums[0] / sums[1])
                dt = time.perf_counter() - win_start
                last = {"train/loss": loss, "train/learning_rate": self.scheduler.get_last_lr()[0],
                        "train/tokens_per_second": win_steps * tokens_per_step / dt,
                        "train/grad_norm": float(grad_norm), "train/epoch": self.epoch}
                if not self.causal:
                    last["diffusion/t_mean"] = float(sums[2]) / (win_steps * accum * world * c.trainer.micro_batch_size)
                if not math.isfinite(loss):
                    raise TrainingStopped(f"loss is {loss} at step {self.step}; stopping without saving the "
                                          f"poisoned state (last good checkpoint: {self._latest_name()})")
                self.log(last)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{last['train/tokens_per_second']:.0f}")
                win_loss.zero_(); win_tokens.zero_(); win_t.zero_()
                win_steps, win_start = 0, time.perf_counter()

            if self.step % c.trainer.eval_every_n_steps == 0 or self.step == c.trainer.max_steps:
                val = self.evaluate()
                self.log(val)
                last.update(val)
                self.history.setdefault("val_loss", []).append([self.step, self.epoch, val["val/loss"]])
                if val["val/loss"] < self.best_val:
                    self.best_val = val["val/loss"]
                    self.best_ckpt = f"step_{self.step:07d}"
                    self.save()  # the best checkpoint is always on disk
                    continue
            if self.step % c.trainer.save_every_n_steps == 0 or self.step == c.trainer.max_steps:
                self.save()
        if bar is not None:
            bar.close()
        hours = (time.perf_counter() - t0) / 3600
        summary = {"summary/training_time_hours": hours, "summary/total_steps": self.step,
                   "summary/final_loss": last.get("train/loss", float("nan")), "summary/best_val_loss": self.best_val,
                   "summary/best_val_perplexity": math.exp(self.best_val) if math.isfinite(self.best_val) else None,
                   "summary/steps_this_session": self.step - start_step}
        self.log(summary)
        return {**last, **summary}

    def _latest_name(self):
        ckpts = list_checkpoints(self.ckpt_root)
        return ckpts[-1].name if ckpts else "none"

    def log(self, metrics: dict):
        for sink in self.sinks:
            sink.log(metrics, self.step)

    # -------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict:
        """NELBO per valid token on the validation split (exact NLL for AR), float64, identical noise each time."""
        acc = self.accelerator
        model = self.ema.module if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        max_batches = max_batches or self.cfg.trainer.eval_batches or None
        t_all, u_all = self._val_noise
        total = torch.zeros(2, dtype=torch.float64, device=acc.device)
        for i, batch in enumerate(self.val_dl):
            if max_batches and i >= max_batches:
                break
            idx = batch["idx"].cpu()
            out = self.compute_loss(batch, t_all[idx], u_all[idx], model=model)
            per_row = self._per_row_sums(out)
            per_row = acc.gather_for_metrics(per_row)  # drops the rows Accelerate duplicated to even out shards
            total += per_row.sum(0)
        model.train(was_training)
        loss = float(total[0] / total[1])
        return {"val/loss": loss, "val/perplexity": math.exp(loss), "val/num_tokens": float(total[1])}

    def _per_row_sums(self, out: StepOutputs) -> torch.Tensor:
        B = out.input_ids.shape[0]
        if self.causal:
            return torch.stack([out.token_ce.double().sum(1), out.valid[:, 1:].double().sum(1)], 1)
        rows = torch.arange(B, device=out.input_ids.device)[:, None].expand_as(out.input_ids)[out.masked]
        nelbo = torch.zeros(B, dtype=torch.float64, device=out.input_ids.device)
        nelbo.index_add_(0, rows, (out.weight[rows].double() * out.token_ce.double()))
        return torch.stack([nelbo, out.valid.double().sum(1)], 1)

    # -------------------------------------------------------------------------------------------- save
    def save(self):
        state = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                 "best_val": self.best_val, "best_ckpt": self.best_ckpt, "wandb_id": self.wandb_id,
                 "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer), "history": self.history,
                 "world_size": self.accelerator.num_processes}
        export = self.ema.module if self.ema is not None else self.model
        save_checkpoint(self.accelerator, self.ckpt_root, self.step, state, export, self.tokenizer,
                        self.cfg.trainer.min_free_disk_mb)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.ckpt_root, self.cfg.trainer.keep_last, self.best_ckpt)

    def sample(self, n: int, steps: int, seed: int = 0) -> list[str]:
        from tdlm.sampling import ancestral_sample

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
        acc = self.accelerator
        acc.end_training()
        # Two-process gloo runs abort at exit about 1 in 6 unless the prepared objects are dropped first.
        del self.model, self.optimizer, self.train_dl, self.val_dl
        self.__dict__.pop("_iter", None)
        acc.free_memory()
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    trainer = None
    try:
        cfg = load_config(argv[0], argv[1:])
        trainer = Trainer(cfg)
        result = trainer.train()
        acc = trainer.accelerator
        if acc.is_main_process:
            vp = result.get("val/perplexity")
            kind = "exact perplexity (AR)" if cfg.model.causal else "perplexity bound (NELBO)"
            print(f"validation {kind}: {vp:.3f}   val/loss {result.get('val/loss'):.4f} nats/token   "
                  f"steps {result['summary/total_steps']}   run dir {cfg.run_dir}")
        if cfg.trainer.sample_at_end and acc.is_main_process:
            for i, text in enumerate(trainer.sample(cfg.trainer.sample_at_end, cfg.trainer.sample_steps)):
                print(f"--- sample {i} ---\n{text[:400]}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
