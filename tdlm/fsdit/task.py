"""FSDiT as a task on the shared engine: flow matching of a DiT that generates a 32x32 image of a class from a
support set of other images of that class, conditioned on the pooled SigLIP embedding of the support set.

A step (``tdlm.engine.loop``): a batch of episodes (target, support indices, class) -> pooled support embeddings ->
(VAE latents) -> t, noise and CFG drop drawn for the global batch from the step's generator -> per-sample velocity
MSE -> backward -> clip -> AdamW -> warm-up/cosine LR -> EMA. Metrics go through the shared collectors
(``tdlm/metrics/image/``, docs/metrics_fsdit.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tdlm.engine.config import ConfigError
from tdlm.engine.launch import run_cli
from tdlm.engine.loop import device_time
from tdlm.engine.task import LossOutput, Task
from tdlm.fsdit.config import IMAGE_SIZE, load_fsdit_config
from tdlm.fsdit.data import FewShotDataset
from tdlm.fsdit.flow import flow_loss, sample_t
from tdlm.fsdit.model import FSDiT, FSDiTConfig, count_parameters
from tdlm.fsdit.pipeline import VaeCodec, build_embedder, fixed_set, load_data, sample_supports
from tdlm.metrics.image import FlowBatch, PerfTimes, SampleRequest, ValResult


class FlowMatchingTask(Task):
    synchronized_timing = True  # the perf/* phase timers read the device's finished work

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        self.device = accelerator.device
        self._build_data()
        m = cfg.model
        self.model_config = FSDiTConfig(
            image_size=self.x_shape[-1], in_channels=self.x_shape[0], patch_size=m.patch_size,
            hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
            cond_dim=self.embedder.dim, projector=m.projector, context_scale=m.context_scale,
            context_scale_init=m.context_scale_init, cond_layernorm=m.cond_layernorm, class_dropout=m.class_dropout,
            t_scale=m.t_scale)
        self.model = FSDiT(self.model_config)
        self.num_params = count_parameters(self.model)
        self._phase_seconds = [0.0, 0.0]  # SigLIP, VAE: this step's, summed over its micro-batches
        self._cache_counts = (self.embedder.hits, self.embedder.lookups)
        accelerator.print(f"FSDiT: {self.num_params:,} trainable parameters (depth {m.depth}, hidden {m.hidden_size}, "
                          f"{m.num_heads} heads, patch {m.patch_size}, model space {self.x_shape}); frozen SigLIP "
                          f"{self.encoder_params:,} (not counted)")

    def _build_data(self):
        """Images, class-disjoint episodes, SigLIP embeddings (computed once), the VAE, and the fixed sets."""
        c, acc = self.cfg, self.accelerator
        images, labels, classes = load_data(c)
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
        # one process encodes the dataset; the others read its cache file
        self.embedder = build_embedder(c, images, labels, self.device, acc.main_process_first)
        self.encoder_params = sum(p.numel() for p in self.embedder.encoder.parameters())
        self.x_shape = tuple(self._to_model_space(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).shape[1:])
        if self.x_shape[-1] % c.model.patch_size:
            raise ConfigError(f"model.patch_size: {c.model.patch_size} does not divide the model-space size "
                              f"{self.x_shape[-1]}")
        n = c.data.val_size
        self.val_set = fixed_set(val_set, n, self.embedder, self._to_model_space, seed=c.trainer.seed + 101)
        self.train_probe = fixed_set(self.train_set, n, self.embedder, self._to_model_space, seed=c.trainer.seed + 202)
        self.sample_images = self.sample_cond = None
        if c.sample.num_sets:
            self.sample_images, idx = sample_supports(val_set, c.sample.num_sets)
            self.sample_cond = self.embedder(idx)
        self.fid = self._build_fid(images, labels, classes["val"]) if c.eval.fid_every_n_steps else None

    def _build_fid(self, images, labels, classes):
        """The in-training few-shot FID over the validation classes (``tdlm.fsdit.fewshot``)."""
        from tdlm.fsdit.fewshot import FewShotFID, draw_plan, per_class_for
        from tdlm.fsdit.fid import make_extractor

        c = self.cfg
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:  # sharded parameters: no process holds a whole model
            raise ConfigError("eval.fid_every_n_steps: the in-training FID needs whole weights, which ZeRO-3 shards; "
                              "set it to 0 and run eval/fsdit_sample.py + eval/fid.py on the checkpoints")
        plan = draw_plan(labels, classes, c.data.support_size, per_class_for(c.eval.fid_num_samples, len(classes)),
                         c.sample.seed, key="data.support_size")
        try:
            extractor = make_extractor(c.eval.fid_extractor, c.eval.inception_path, self.device,
                                       siglip_encoder=self.embedder.encoder, key="eval.inception_path")
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        return FewShotFID(plan, self.embedder(torch.as_tensor(plan.supports)), images, labels, extractor,
                          self.x_shape, c.sample, c.eval.fid_batch_size, self.device,
                          self.vae.decode if self.vae is not None else None)

    def _to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        return self.vae.encode(images) if self.vae is not None else images

    def layout(self) -> dict:
        return {"data.support_size": self.cfg.data.support_size}

    def check_resume(self, ckpt: Path, saved_state: dict):
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

    # ---------------------------------------------------------------------------------------- one step
    def draw_noise(self, generator, rows):
        """t, noise and the CFG drop of every global row (the engine slices them)."""
        c = self.cfg
        t = sample_t(rows, c.flow.t_dist, generator, stratified=c.flow.stratified)
        noise = torch.randn((rows, *self.x_shape), generator=generator)
        drop = torch.rand(rows, generator=generator) < c.model.class_dropout
        return t, noise, drop

    def num_targets(self, batch):
        return torch.tensor(float(batch[0].shape[0]), device=self.device)

    def loss(self, model, batch, noise):
        target, support_idx, labels = batch
        t0 = device_time(self.device)
        cond = self.embedder(support_idx)  # (B, D)
        t1 = device_time(self.device)
        x = self._to_model_space(target)  # (B, C, H, W)
        t2 = device_time(self.device)
        self._phase_seconds[0] += t1 - t0
        self._phase_seconds[1] += t2 - t1
        t, eps, drop = (v.to(self.device) for v in noise)
        aux: dict = {}
        loss, _ = flow_loss(model, x, cond, t=t, noise=eps, drop=drop, aux=aux)  # (B,)
        flow = FlowBatch(loss, t, x, eps, aux["x_t"], aux["v_pred"], aux["v_target"], cond, labels.to(self.device),
                         drop, aux["t_emb"], aux["y_emb"], aux["c"], self.model.context_scale.detach())
        return LossOutput(loss.sum(), self.num_targets(batch), loss.detach().double().sum(), flow)

    def step_sources(self, info, inference_model):
        """The step's phase timers and SigLIP cache counters (``perf``) and the sample recipe (``sampler``)."""
        siglip, vae = self._phase_seconds
        hits, lookups = self._cache_counts
        e = self.embedder
        perf = PerfTimes(info.data_seconds, siglip, vae if self.vae is not None else 0.0,
                         info.update_seconds - siglip - vae, info.seconds, e.hits - hits, e.lookups - lookups, e.items)
        self._phase_seconds, self._cache_counts = [0.0, 0.0], (e.hits, e.lookups)
        s = self.cfg.sample
        sampler = None
        if s.num_sets:
            sampler = SampleRequest(inference_model, self.sample_cond, self.sample_images, self.x_shape, s.per_set,
                                    s.steps, s.method, s.cfg_scale, s.seed,
                                    self.vae.decode if self.vae is not None else None)
        return {"perf": perf, "sampler": sampler}

    # ---------------------------------------------------------------------------------------- metrics, eval, end
    def build_metrics(self, sinks, is_main):
        from tdlm.metrics.image_health import build_fsdit_metrics

        pooled_range = 1.5 * float(self.val_set.cond.abs().max())
        return build_fsdit_metrics(self.cfg, cond_dim=self.embedder.dim, pooled_range=pooled_range,
                                   device=self.device, sinks=sinks, is_main=is_main)

    def metric_specs(self):
        from tdlm.metrics.image import IMAGE

        return IMAGE.specs()

    @torch.no_grad()
    def evaluate(self, model, ema, step=None):
        """Per-episode losses of the fixed sets, this process's share (rows rank, rank + world, ...), from the
        live model in eval mode (and the EMA on the validation set); on eval.fid_every_n_steps and at the end, the
        few-shot FID of the model checkpoints export (the EMA one, when there is one)."""
        acc, c = self.accelerator, self.cfg
        rows = slice(acc.process_index, None, acc.num_processes)
        val = self._fixed_losses(self.model, self.val_set, rows)
        train = self._fixed_losses(self.model, self.train_probe, rows)
        ema_loss = self._fixed_losses(ema, self.val_set, rows) if ema is not None else None
        fid = None
        if self.fid is not None and step is not None and (step % c.eval.fid_every_n_steps == 0
                                                          or step == c.trainer.max_steps):
            fid = self.fid(ema if ema is not None else self.model, acc.process_index, acc.num_processes,
                           _gather_object if acc.num_processes > 1 else None)
        return ValResult(val, self.val_set.t[rows].to(self.device), train, ema_loss, fid)

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

    def report(self, result, inference_model):
        steps = result["summary/total_steps"]
        media = sorted(str(p) for p in (self.cfg.run_dir / "media").glob(f"samples_*_step{steps:07d}.png"))
        print(f"steps {steps} in {result['summary/training_time_hours'] * 3600:.0f} s   train/loss "
              f"{result.get('train/loss', math.nan):.4f}   val/loss {result.get('val/loss', math.nan):.4f}   "
              f"run dir {self.cfg.run_dir}" + "".join(f"\n  {m}" for m in media))
        if self.fid is not None and "val/fid" in result:
            self._report_fid(result)

    def _report_fid(self, result):
        """The final few-shot Fréchet distance beside a freshly initialised model's on the same plan: the number
        has to move the right way. Named by its feature space (only Inception's is an FID)."""
        from tdlm.fsdit.fid import metric_name

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.trainer.seed)
            fresh = FSDiT(self.model_config).to(self.device).eval()
        before = self.fid(fresh)
        name, p = metric_name(before["extractor"]), self.fid.plan
        print(f"{name}, {before['n_gen']} samples of {len(p.classes)} validation classes vs {before['n_ref']} "
              f"held-out images (supports excluded), extractor {before['extractor']}:\n"
              f"  freshly initialised model {before['fid']:.4g} (KID {before['kid_mean']:.4g})   final "
              f"{'EMA ' if self.cfg.trainer.ema_decay > 0 else ''}model {result['val/fid']:.4g} "
              f"(KID {result['val/kid']:.4g} ± {result['val/kid_std']:.2g})")


def _gather_object(items: list) -> list:
    from accelerate.utils import gather_object

    return gather_object(items)


def cli(argv: list[str] | None = None, doc: str = __doc__) -> int:
    """``tdlm/fsdit/train.py``'s main: config -> engine(flow-matching task) -> fit -> report."""
    return run_cli(argv, doc, load_fsdit_config, FlowMatchingTask)
