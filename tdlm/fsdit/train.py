"""Train FSDiT: a DiT that generates a 32x32 image of a class from a support set of other images of that class,
by flow matching, conditioned on the pooled SigLIP embedding of the support set.

    accelerate launch tdlm/fsdit/train.py configs/fsdit_cifar100.yaml [key=value ...]
    python tdlm/fsdit/train.py configs/fsdit_demo.yaml trainer.max_steps=50       # one process
    python tdlm/fsdit/train.py configs/fsdit_demo.yaml trainer.resume=auto        # continue where it stopped

A step: a batch of episodes (target, support indices, class) -> pooled support embeddings -> (VAE latents) ->
t, noise and CFG drop drawn for the global batch from a generator keyed by the step -> per-sample velocity MSE ->
backward -> clip -> AdamW -> warm-up/cosine LR -> EMA. Metrics go through the shared collectors
(``tdlm/metrics/image/``, docs/metrics_fsdit.md); checkpoints through ``tdlm/checkpoint.py``.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `python tdlm/fsdit/train.py` / `accelerate launch ...`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from tdlm.checkpoint import (check_run_dir, list_checkpoints, prepare_run_dir, prune_checkpoints, read_state,
                             resolve_resume, save_checkpoint)
from tdlm.config import ConfigError
from tdlm.faults import NonFiniteWatch, StopSignal
from tdlm.fsdit.config import IMAGE_SIZE, FSDiTRunConfig, load_fsdit_config
from tdlm.fsdit.data import FewShotDataset, fingerprint, load_cifar100_all, split_classes
from tdlm.fsdit.flow import flow_loss, make_ema, sample_t
from tdlm.fsdit.model import FSDiT, FSDiTConfig, count_parameters
from tdlm.fsdit.pipeline import SupportEmbedder, VaeCodec, build_encoder, fixed_set, sample_supports
from tdlm.metrics.core import StepInfo
from tdlm.metrics.image import IMAGE, FlowBatch, GradView, PerfTimes, SampleRequest, ValResult
from tdlm.metrics.image_health import build_fsdit_metrics
from tdlm.metrics.sinks import run_sinks
from tdlm.train import TrainingStopped, lr_lambda, make_accelerator, run_cli, step_generator


def _clock(device) -> float:
    """Host time after the device finished its queued work, so phase timers measure the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and conv kernels only (not biases, the null vector or context_scale)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                             fused=optim_cfg.fused)


class Trainer:
    def __init__(self, cfg: FSDiTRunConfig):
        self.cfg = c = cfg
        self.accelerator = acc = make_accelerator(cfg)
        self.device = acc.device
        self.run_dir, self.ckpt_root = cfg.run_dir, cfg.run_dir / "checkpoints"
        self._replace_old_run = check_run_dir(self.run_dir, self.ckpt_root, cfg.trainer)
        torch.manual_seed(c.trainer.seed)
        self._build_data()
        self.resume_from = resolve_resume(c.trainer.resume, self.ckpt_root)

        m = c.model
        self.model_config = FSDiTConfig(
            image_size=self.x_shape[-1], in_channels=self.x_shape[0], patch_size=m.patch_size,
            hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
            cond_dim=self.embedder.dim, projector=m.projector, context_scale=m.context_scale,
            context_scale_init=m.context_scale_init, cond_layernorm=m.cond_layernorm, class_dropout=m.class_dropout,
            t_scale=m.t_scale)
        if self.resume_from is not None:
            self._check_resume_compatible(self.resume_from)
        model = FSDiT(self.model_config)
        self.num_params = count_parameters(model)
        optimizer = build_optimizer(model, c.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c.optim, c.trainer.max_steps))
        train_dl = torch.utils.data.DataLoader(
            self.train_set, batch_size=c.trainer.batch_size, shuffle=True, drop_last=True,
            num_workers=c.data.num_workers, generator=torch.Generator().manual_seed(c.trainer.seed))
        if len(train_dl) < 1:
            raise ConfigError(f"trainer.batch_size: {c.trainer.batch_size} is larger than the {len(self.train_set)} "
                              f"training episodes")
        self.model, self.optimizer, self.train_dl = acc.prepare(model, optimizer, train_dl)
        acc.register_for_checkpointing(self.scheduler)
        self.raw_model = acc.unwrap_model(self.model)
        self.ema = None
        if c.trainer.ema_decay > 0:
            self.ema = make_ema(self.raw_model, c.trainer.ema_decay)
            acc.register_for_checkpointing(self.ema)

        self.step = self.epoch = self.batches_in_epoch = 0
        self.best_val, self.wandb_id, self.history, self._metric_state = math.inf, None, {}, {}
        if self.resume_from is not None:
            self._load(self.resume_from)
        if self.ema is not None:
            self.ema.module.eval()  # samples and val/loss_ema: never a random CFG drop
        prepare_run_dir(acc, c, self._replace_old_run)
        self.sinks = []
        if acc.is_main_process:
            self.sinks, self.wandb_id = run_sinks(c, self.step, self.wandb_id, IMAGE.specs())
        pooled_range = 1.5 * float(self.val_set.cond.abs().max())
        self.metrics = build_fsdit_metrics(c, cond_dim=self.embedder.dim, pooled_range=pooled_range,
                                           device=self.device, sinks=self.sinks, is_main=acc.is_main_process)
        if self.resume_from is not None:
            self.metrics.load_state_dict(self._metric_state, rank=acc.process_index)

    # -------------------------------------------------------------------------------------------- set-up
    def _build_data(self):
        """Images, class-disjoint episodes, SigLIP embeddings (computed once), the VAE, and the fixed sets."""
        c, acc = self.cfg, self.accelerator
        try:
            images, labels = load_cifar100_all(c.data.root)
        except FileNotFoundError:
            raise ConfigError(f"data.root: no CIFAR-100 python dataset at '{c.data.root}' (expected "
                              f"cifar-100-python/{{train,test,meta}}; `python -m tdlm.fsdit.data synthetic DIR` "
                              f"writes a generated one)") from None
        classes = split_classes(int(labels.max()) + 1, tuple(c.data.class_split), c.data.split_seed)
        for split in ("train", "val"):
            if not classes[split]:
                raise ConfigError(f"data.class_split: {c.data.class_split} leaves no {split} class")
        k = c.data.support_size
        try:
            self.train_set = FewShotDataset(images, labels, classes["train"], k, c.trainer.seed, return_indices=True)
            val_set = FewShotDataset(images, labels, classes["val"], k, c.trainer.seed + 1, return_indices=True)
        except ValueError as exc:
            raise ConfigError(str(exc).removeprefix("fsdit.")) from None
        self.vae = VaeCodec(c.model.vae_path, c.model.vae_scale, self.device) if c.model.use_vae else None
        encoder = build_encoder(c.siglip).to(self.device)
        self.encoder_params = sum(p.numel() for p in encoder.parameters())
        with acc.main_process_first():  # one process encodes the dataset; the others read its cache file
            self.embedder = SupportEmbedder(encoder, images, fingerprint(images, labels), c.siglip, self.device)
        encode = self._to_model_space
        self.x_shape = tuple(encode(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=self.device)).shape[1:])
        if self.x_shape[-1] % c.model.patch_size:
            raise ConfigError(f"model.patch_size: {c.model.patch_size} does not divide the model-space size "
                              f"{self.x_shape[-1]}")
        n = c.trainer.val_size
        self.val_set = fixed_set(val_set, n, self.embedder, encode, seed=c.trainer.seed + 101)
        self.train_probe = fixed_set(self.train_set, n, self.embedder, encode, seed=c.trainer.seed + 202)
        self.sample_images = self.sample_cond = None
        if c.sample.num_sets:
            self.sample_images, idx = sample_supports(val_set, c.sample.num_sets)
            self.sample_cond = self.embedder(idx)

    def _to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        return self.vae.encode(images) if self.vae is not None else images

    def _layout(self) -> dict:
        return {"trainer.batch_size": self.cfg.trainer.batch_size, "data.support_size": self.cfg.data.support_size,
                "num_processes": self.accelerator.num_processes}

    def _check_resume_compatible(self, ckpt: Path):
        saved = json.loads((ckpt / "model" / "config.json").read_text())
        now = vars(self.model_config)
        for key in ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "cond_dim", "in_channels",
                    "image_size", "projector", "context_scale"):
            if saved.get(key) == now[key]:
                continue
            derived = {"cond_dim": "siglip.path", "in_channels": "model.use_vae", "image_size": "model.use_vae"}
            if key in derived:  # cond_dim comes from the SigLIP encoder, the model-space shape from the VAE switch
                raise ConfigError(f"{derived[key]}: gives {key} {now[key]}, but the checkpoint in {ckpt} has "
                                  f"{saved.get(key)}")
            raise ConfigError(f"model.{key}: {now[key]} differs from the checkpoint's {saved.get(key)} in {ckpt}")
        layout = read_state(ckpt).get("layout", {})
        for key, value in self._layout().items():
            if key in layout and layout[key] != value:
                raise ConfigError(f"{key}: {value} differs from the checkpoint's {layout[key]} in {ckpt}; an exact "
                                  f"resume (data position, per-process RNG) needs the same value")

    def _load(self, ckpt: Path):
        self.accelerator.load_state(str(ckpt))
        st = read_state(ckpt)
        self.step, self.epoch, self.batches_in_epoch = st["step"], st["epoch"], st["batches_in_epoch"]
        self.best_val, self.wandb_id = st["best_val"], st.get("wandb_id")
        self.history, self._metric_state = st.get("history", {}), st.get("metrics", {})
        self.accelerator.print(f"resumed from {ckpt} at step {self.step}")

    # -------------------------------------------------------------------------------------------- one step
    def _next_batch(self):
        if not hasattr(self, "_iter"):
            self.train_dl.set_epoch(self.epoch)
            self.train_set.set_epoch(self.epoch)  # fresh support sets every epoch, a function of (seed, epoch, i)
            dl = self.train_dl
            if self.batches_in_epoch:
                dl = self.accelerator.skip_first_batches(self.train_dl, self.batches_in_epoch)
            self._iter = iter(dl)
        try:
            batch = next(self._iter)
        except StopIteration:
            del self._iter
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
            return self._next_batch()
        self.batches_in_epoch += 1
        return batch

    def _step_noise(self, step: int, shape: tuple) -> tuple[torch.Tensor, ...]:
        """t, noise and CFG drop of this process's rows, drawn for the global batch from a generator keyed by the
        step: the same numbers whatever the number of processes, and after a resume."""
        c, acc = self.cfg, self.accelerator
        B = c.trainer.batch_size
        g = step_generator(c.trainer.seed, step)
        n = B * acc.num_processes
        t = sample_t(n, c.flow.t_dist, g, stratified=c.flow.stratified)
        noise = torch.randn((n, *shape), generator=g)
        drop = torch.rand(n, generator=g) < c.model.class_dropout
        rows = slice(acc.process_index * B, (acc.process_index + 1) * B)
        return t[rows].to(self.device), noise[rows].to(self.device), drop[rows].to(self.device)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (mean loss, pre-clip grad norm) as device tensors."""
        acc, c, raw = self.accelerator, self.cfg, self.raw_model
        t0 = _clock(self.device)
        target, support_idx, labels = self._next_batch()
        t1 = _clock(self.device)
        hits, lookups = self.embedder.hits, self.embedder.lookups
        cond = self.embedder(support_idx)  # (B, D)
        t2 = _clock(self.device)
        x = self._to_model_space(target)  # (B, C, H, W)
        t3 = _clock(self.device)
        t, noise, drop = self._step_noise(step, tuple(x.shape[1:]))
        aux: dict = {}
        loss, _ = flow_loss(self.model, x, cond, t=t, noise=noise, drop=drop, aux=aux)  # (B,)
        self.metrics.update(step, batch=FlowBatch(
            loss, t, x, noise, aux["x_t"], aux["v_pred"], aux["v_target"], cond, labels.to(self.device), drop,
            aux["t_emb"], aux["y_emb"], aux["c"], raw.context_scale.detach()), model=raw)
        acc.backward(loss.mean())
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.metrics.update(step, grads=GradView(raw, lr))
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), c.optim.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        t4 = _clock(self.device)
        if self.ema is not None:
            self.ema.update_parameters(raw)
        t5 = _clock(self.device)
        self._perf = PerfTimes(t1 - t0, t2 - t1, t3 - t2 if self.vae is not None else 0.0, t4 - t3, t5 - t0,
                               self.embedder.hits - hits, self.embedder.lookups - lookups, self.embedder.items)
        self._lr = lr
        return loss.detach().mean(), grad_norm

    # -------------------------------------------------------------------------------------------- loop
    def train(self, stop_at: int | None = None) -> dict:
        """Run to ``trainer.max_steps`` (or stop after ``stop_at`` steps, as an interruption would). SIGTERM
        stops every process after the same step with a checkpoint; a NaN/Inf loss raises ``TrainingStopped``."""
        self._stop, self._watch, self.preempted = StopSignal().install(), NonFiniteWatch(), False
        try:
            return self._train(stop_at)
        finally:
            self._stop.uninstall()

    def _train(self, stop_at: int | None) -> dict:
        acc, c = self.accelerator, self.cfg
        end = min(c.trainer.max_steps, stop_at or c.trainer.max_steps)
        bar = None
        if acc.is_main_process and c.trainer.progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=c.trainer.max_steps, initial=self.step, desc="fsdit", dynamic_ncols=True)
        last, start, previous_end = {}, time.perf_counter(), time.perf_counter()
        self.model.train()
        while self.step < end:
            step = self.step + 1
            loss, grad_norm = self.train_step(step)
            self._watch.update(step, loss, grad_norm)
            self._stop.push(acc.reduce(self._stop.flag(self.device).clone(), "sum"))
            self.step = step
            now = time.perf_counter()
            self.metrics.update(step, step=StepInfo(grad_norm, self._lr, c.trainer.batch_size * acc.num_processes,
                                                    now - previous_end, self.epoch, self.raw_model),
                                perf=self._perf, sampler=self._sample_request())
            if c.metrics.tiers.essential.enabled and (step % c.trainer.eval_every_n_steps == 0
                                                      or step == c.trainer.max_steps):
                self.metrics.update(step, val=self.evaluate())
            logs = self.metrics.compute(step) if self.metrics.due(step) else {}
            if logs:
                last.update(logs)
                self.log(logs)
                self._check_finite()
                if "val/loss" in logs:
                    self.history.setdefault("val_loss", []).append([step, logs["val/loss"]])
                    self.best_val = min(self.best_val, logs["val/loss"])
                if bar is not None and "train/loss" in logs:
                    bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
            if bar is not None:
                bar.update(1)
            saved = step % c.trainer.save_every_n_steps == 0 or step == c.trainer.max_steps
            if saved:
                self.save()
            if self._stop.should_stop():
                if not saved:
                    self.save()
                self.preempted = True
                break
            previous_end = time.perf_counter()
        if bar is not None:
            bar.close()
        return {**last, "steps": self.step, "seconds": time.perf_counter() - start}

    def _sample_request(self) -> SampleRequest | None:
        s = self.cfg.sample
        if not s.num_sets:
            return None
        model = self.ema.module if self.ema is not None else self.raw_model
        return SampleRequest(model, self.sample_cond, self.sample_images, self.x_shape, s.per_set, s.steps, s.method,
                             s.cfg_scale, s.seed, self.vae.decode if self.vae is not None else None)

    @torch.no_grad()
    def evaluate(self) -> ValResult:
        """Per-episode losses of the fixed sets, this process's share (rows rank, rank + world, ...)."""
        acc, raw = self.accelerator, self.raw_model
        rows = slice(acc.process_index, None, acc.num_processes)
        was_training = raw.training
        raw.eval()
        try:
            val = self._fixed_losses(raw, self.val_set, rows)
            train = self._fixed_losses(raw, self.train_probe, rows)
            ema = self._fixed_losses(self.ema.module, self.val_set, rows) if self.ema is not None else None
        finally:
            raw.train(was_training)
        return ValResult(val, self.val_set.t[rows].to(self.device), train, ema)

    def _fixed_losses(self, model, s, rows: slice, chunk: int = 64) -> torch.Tensor:
        x, cond, t, noise = (v[rows] for v in (s.x, s.cond, s.t, s.noise))
        out = []
        for a in range(0, len(x), chunk):
            b = slice(a, a + chunk)
            xb = x[b].to(self.device)
            drop = torch.zeros(len(xb), dtype=torch.bool, device=self.device)
            out.append(flow_loss(model, xb, cond[b].to(self.device), t=t[b].to(self.device),
                                 noise=noise[b].to(self.device), drop=drop)[0])
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def log(self, metrics: dict):
        stops = self.metrics.log(self.step, metrics)
        if stops:
            rule, message = stops[0]
            raise TrainingStopped(f"{message}; stopping without saving the poisoned state (last good checkpoint: "
                                  f"{self._latest_name()})")

    def _check_finite(self):
        bad = self._watch.first_bad_step(self.accelerator)
        if bad is not None:
            raise TrainingStopped(f"non-finite loss or gradient norm at step {bad}; stopped at step {self.step} "
                                  f"without saving the poisoned state (last good checkpoint: {self._latest_name()})")

    def _latest_name(self) -> str:
        ckpts = list_checkpoints(self.ckpt_root)
        return ckpts[-1].name if ckpts else "none"

    def save(self):
        """Collective: atomic checkpoint of the current step (model, optimizer, LR, EMA, RNG, data position,
        metric windows) with the EMA weights (or the raw ones) exported under ``model/``."""
        self._check_finite()
        state = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                 "best_val": self.best_val, "wandb_id": self.wandb_id, "history": self.history,
                 "layout": self._layout(), "world_size": self.accelerator.num_processes,
                 "metrics": self.metrics.state_dict()}
        export = self.ema.module if self.ema is not None else self.raw_model
        save_checkpoint(self.accelerator, self.ckpt_root, self.step, state, export, None,
                        self.cfg.trainer.min_free_disk_mb)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.ckpt_root, self.cfg.trainer.keep_last, None)

    def close(self):
        for sink in getattr(self, "sinks", []):
            sink.close()
        self.sinks = []
        acc = self.accelerator
        acc.end_training()
        for name in ("model", "optimizer", "train_dl", "_iter"):
            self.__dict__.pop(name, None)
        acc.free_memory()
        gc.collect()


def _train_and_report(cfg: FSDiTRunConfig, trainer: Trainer, argv: list[str]) -> int:
    acc = trainer.accelerator
    acc.print(f"FSDiT: {trainer.num_params:,} trainable parameters (depth {cfg.model.depth}, hidden "
              f"{cfg.model.hidden_size}, {cfg.model.num_heads} heads, patch {cfg.model.patch_size}, model space "
              f"{trainer.x_shape}); frozen SigLIP {trainer.encoder_params:,} (not counted)")
    result = trainer.train()
    if trainer.preempted:
        acc.print(f"stopped by SIGTERM after step {trainer.step}; resume with the same command and "
                  f"trainer.resume=auto")
        return 0
    if acc.is_main_process:
        media = sorted(str(p) for p in (cfg.run_dir / "media").glob(f"samples_*_step{trainer.step:07d}.png"))
        print(f"steps {result['steps']} in {result['seconds']:.0f} s   train/loss "
              f"{result.get('train/loss', math.nan):.4f}   val/loss {result.get('val/loss', math.nan):.4f}   "
              f"run dir {cfg.run_dir}" + "".join(f"\n  {m}" for m in media))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, __doc__, load_fsdit_config, Trainer, _train_and_report)


if __name__ == "__main__":
    sys.exit(main())
