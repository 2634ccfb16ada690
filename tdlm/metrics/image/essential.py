"""Essential-tier FSDiT collectors (every ``metrics.logging_steps``): loss, optimisation, flow, condition,
timing and validation metrics."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tdlm.metrics import common
from tdlm.metrics import functional as Fm
from tdlm.metrics.core import Collector, MetricSpec
from tdlm.metrics.image.inputs import IMAGE, _std, _zeros


@IMAGE.register
class TrainLoss(common.TrainLoss):
    """train/loss: mean per-sample velocity MSE over every episode of the logging window (all processes), CFG-dropped
    episodes included. train/loss_ema: exponential moving average (α = 0.99 per optimizer step) of each step's
    mean loss, bias-corrected (divided by 1 − α^steps, so it starts at the first loss, not at 0), carried across
    windows. Always on: the NaN/Inf stop rule reads train/loss."""

    metrics = (MetricSpec("train/loss", "MSE", "velocity MSE per episode, window mean", "min"),
               MetricSpec("train/loss_ema", "MSE", "bias-corrected EMA (α = 0.99 per step) of the step loss"))
    alpha = 0.99

    def __init__(self, grad_accum_steps: int = 1, **ctx):
        super().__init__()
        # The EMA is linear in the step losses: each process keeps the EMA of its own step means, and the sum over
        # processes divided by their number is the EMA of the global step means (equal batch sizes).
        self.accum = grad_accum_steps
        self.add_state("ema_num", _zeros())
        self.add_state("ema_steps", _zeros(), reduce=None)
        self._ema_mean, self._ema_step = None, None

    def update(self, inputs):
        super().update(inputs)
        out = inputs["loss"]
        if inputs.step != self._ema_step:  # the first micro-batch of an optimizer step: one EMA step per step
            self._ema_step = inputs.step
            self.ema_num = self.alpha * self.ema_num
            self.ema_steps += 1
        # equal micro-batches (drop_last): the step mean is the mean of the micro-batch means
        self.ema_num = self.ema_num + (1 - self.alpha) * out.reported_sum / out.num_targets.double() / self.accum

    def compute(self):
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._ema_mean = self.ema_num / world  # ema_num holds the sum over processes here (synced)
        return {**super().compute(), "train/loss_ema": self._ema_mean / (1 - self.alpha ** self.ema_steps)}

    def reset(self):
        ema_mean, steps = self._ema_mean, self.ema_steps.clone()
        super().reset()
        self.ema_steps = steps
        if ema_mean is not None:  # every process continues from the combined EMA
            self.ema_num = ema_mean.clone()
        self._ema_mean = None


@IMAGE.register
class LossByTime(Collector):
    """train/loss_tbin_i: mean per-episode loss of the window's episodes whose t lies in [i/K, (i+1)/K)
    (K = flow.num_t_bins; bin 0 is nearly pure noise, bin K−1 nearly clean data). Sums and counts are added over
    steps and processes before dividing (not a mean of per-process means); NaN for a bin with no episode."""

    tier = "essential"
    needs = ("flow",)
    metrics = (MetricSpec("train/loss_tbin_{i}", "MSE", "velocity MSE of the episodes with t in bin i"),)

    def __init__(self, num_t_bins: int = 10, **ctx):
        super().__init__()
        self.add_state("sums", _zeros(num_t_bins))
        self.add_state("counts", _zeros(num_t_bins))
        self.bins = num_t_bins

    def update(self, inputs):
        out = inputs["batch"]
        s, n = Fm.time_bin_sums(out.loss, out.t, self.bins)
        self.sums += s
        self.counts += n

    def compute(self):
        return {f"train/loss_tbin_{i}": v for i, v in enumerate(Fm.ratio(self.sums, self.counts))}


@IMAGE.register
class Optimization(common.Optimization):
    """train/grad_norm: global L2 norm of the gradient before clipping (what clip_grad_norm_ returns), mean over
    the window's steps. train/lr: the learning rate of the window's last step. train/step_time: wall seconds per
    optimizer step over the window, from the batch request to the EMA update; logging, validation, checkpoints
    and sampling are left out (as in the text trainer's throughput)."""

    names = {"grad_norm": "train/grad_norm", "lr": "train/lr", "step_time": "train/step_time"}
    metrics = (MetricSpec("train/grad_norm", "1", "global gradient norm before clipping, window mean"),
               MetricSpec("train/lr", "1", "learning rate of the window's last step"),
               MetricSpec("train/step_time", "s", "wall time per step (evaluation and saving excluded), window mean"))


@IMAGE.register
class ParamNorm(common.ParamNorm):
    """L2 norm of all trainable parameters (as one vector) after the optimizer step on the logging step; the
    frozen SigLIP encoder is not part of the model and not counted."""


@IMAGE.register
class FlowStats(Collector):
    """Over the window's episodes: diffusion/t_mean, the mean training t (t ~ U(0, 1) or logit-normal, both
    symmetric about 0.5). diffusion/cos_eps_mean: the cosine similarity between the predicted and the true
    **velocity** v = x − ε (not the noise: the model predicts velocity), per episode over all C·H·W values, then
    averaged; 0 at initialisation (the zero-initialised output layer predicts 0), rising as the model learns,
    negative would be a sign error. latent/z_std: the standard deviation of every value of the clean model input
    x over the window (pixels in [-1, 1]: about 0.5 for CIFAR; VAE latents after model.vae_scale: about 1)."""

    tier = "essential"
    needs = ("flow",)
    metrics = (MetricSpec("diffusion/t_mean", "1", "mean training t over the window (expect about 0.5)"),
               MetricSpec("diffusion/cos_eps_mean", "1", "cosine(predicted velocity, x − ε) per episode, mean", "max"),
               MetricSpec("latent/z_std", "1", "std of all values of the clean model input x"))

    def __init__(self, **ctx):
        super().__init__()
        for name in ("t_sum", "rows", "cos_sum", "z_n", "z_s", "z_ss"):
            self.add_state(name, _zeros())

    def update(self, inputs):
        out = inputs["batch"]
        self.t_sum += out.t.detach().double().sum()
        self.rows += out.t.numel()
        cos = F.cosine_similarity(out.v_pred.flatten(1).double(), out.v_target.flatten(1).double(), dim=1)
        self.cos_sum += cos.sum()
        x = out.x.detach().double()
        self.z_n += x.numel()
        self.z_s += x.sum()
        self.z_ss += x.pow(2).sum()

    def compute(self):
        return {"diffusion/t_mean": Fm.ratio(self.t_sum, self.rows),
                "diffusion/cos_eps_mean": Fm.ratio(self.cos_sum, self.rows),
                "latent/z_std": _std(self.z_n, self.z_s, self.z_ss)}


@IMAGE.register
class ConditionStats(Collector):
    """The pooled support embeddings e (mean of the SigLIP pooler_output of the support images) of every episode
    in the window, all processes: support_pooled_abs_mean = mean |e| over all values; support_pooled_l2_mean =
    mean ‖e‖₂ per episode; support_pooled_dim_std_mean = the std of each dimension over the window's episodes,
    averaged over dimensions (low = every support set looks alike). Pairs: every unordered pair of episodes of the
    same micro-batch, cosine of their e; same_class_pair_ratio = same-class pairs / pairs (about 1/classes with
    random batches); same/diff_class_cos_mean/std = mean and population std of the cosine over same-class and
    different-class pairs (NaN when the window had no such pair). SigLIP separates the classes when same ≫ diff."""

    tier = "essential"
    needs = ("condition",)
    metrics = (MetricSpec("cond/support_pooled_abs_mean", "1", "mean |e| over all values"),
               MetricSpec("cond/support_pooled_l2_mean", "1", "mean ‖e‖₂ per episode"),
               MetricSpec("cond/support_pooled_dim_std_mean", "1", "per-dimension std over episodes, mean"),
               MetricSpec("cond/same_class_pair_ratio", "fraction", "same-class pairs / pairs in the batches"),
               MetricSpec("cond/same_class_cos_mean", "1", "mean cosine of same-class pairs"),
               MetricSpec("cond/diff_class_cos_mean", "1", "mean cosine of different-class pairs"),
               MetricSpec("cond/same_class_cos_std", "1", "std of the cosine of same-class pairs"),
               MetricSpec("cond/diff_class_cos_std", "1", "std of the cosine of different-class pairs"))

    def __init__(self, cond_dim: int = 1, **ctx):
        super().__init__()
        for name in ("n", "abs_sum", "l2_sum"):
            self.add_state(name, _zeros())
        self.add_state("dim_s", _zeros(cond_dim))
        self.add_state("dim_ss", _zeros(cond_dim))
        self.add_state("same", _zeros(3))  # [pairs, Σcos, Σcos²]
        self.add_state("diff", _zeros(3))

    def update(self, inputs):
        out = inputs["batch"]
        e = out.cond.detach().double()
        self.n += e.shape[0]
        self.abs_sum += e.abs().sum()
        self.l2_sum += torch.linalg.vector_norm(e, dim=-1).sum()
        self.dim_s += e.sum(0)
        self.dim_ss += e.pow(2).sum(0)
        cos, same = Fm.pair_cosines(e, out.labels)
        for state, mask in ((self.same, same), (self.diff, ~same)):
            c = cos * mask
            state += torch.stack([mask.double().sum(), c.sum(), (c * c).sum()])

    def compute(self):
        pairs = self.same[0] + self.diff[0]
        dim_std = _std(self.n, self.dim_s, self.dim_ss)  # (cond_dim,)
        return {"cond/support_pooled_abs_mean": Fm.ratio(self.abs_sum, self.n * self.dim_s.numel()),
                "cond/support_pooled_l2_mean": Fm.ratio(self.l2_sum, self.n),
                "cond/support_pooled_dim_std_mean": dim_std.mean(),
                "cond/same_class_pair_ratio": Fm.ratio(self.same[0], pairs),
                "cond/same_class_cos_mean": Fm.ratio(self.same[1], self.same[0]),
                "cond/diff_class_cos_mean": Fm.ratio(self.diff[1], self.diff[0]),
                "cond/same_class_cos_std": _std(self.same[0], self.same[1], self.same[2]),
                "cond/diff_class_cos_std": _std(self.diff[0], self.diff[1], self.diff[2])}


@IMAGE.register
class Perf(Collector):
    """Seconds per iteration, mean over the window's iterations and processes, each read after a device
    synchronisation (CUDA is asynchronous): data_time = waiting for the next batch and moving it to the device;
    siglip_encode_time = getting the pooled support embeddings (SigLIP forwards on cache misses in
    siglip.mode=online; a lookup in the precomputed table otherwise); vae_time = getting VAE latents of the
    targets (0 without model.use_vae); train_step_time = forward, backward, clipping and optimizer step;
    total_iter_time = the whole iteration from the batch request to the EMA update (logging, validation, saving
    and sampling excluded). siglip_cache_hit_rate = hits / lookups of distinct support images over the window
    (the precomputed table always hits); siglip_cache_items = images held by the cache (table rows or LRU
    entries) at the end of the window."""

    tier = "essential"
    needs = ("timing",)
    TIMES = ("data_time", "siglip_encode_time", "vae_time", "train_step_time", "total_iter_time")
    metrics = tuple(MetricSpec(f"perf/{n}", "s", f"{n.replace('_', ' ')} per iteration, window mean")
                    for n in TIMES) + (
        MetricSpec("perf/siglip_cache_hit_rate", "fraction", "hits / lookups of the embedding cache"),
        MetricSpec("perf/siglip_cache_items", "images", "images held by the embedding cache"))

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("times", _zeros(len(self.TIMES)))
        self.add_state("iters", _zeros())
        self.add_state("hits", _zeros())
        self.add_state("lookups", _zeros())
        self.add_state("items", _zeros(), reduce="max")

    def update(self, inputs):
        p = inputs["perf"]
        self.times += torch.tensor([getattr(p, n) for n in self.TIMES], dtype=torch.float64, device=self.times.device)
        self.iters += 1
        self.hits += p.cache_hits
        self.lookups += p.cache_lookups
        self.items.fill_(p.cache_items)

    def compute(self):
        times = Fm.ratio(self.times, self.iters.expand(len(self.TIMES)))
        return {**{f"perf/{n}": times[i] for i, n in enumerate(self.TIMES)},
                "perf/siglip_cache_hit_rate": Fm.ratio(self.hits, self.lookups),
                "perf/siglip_cache_items": self.items.clone()}


@IMAGE.register
class Validation(common.Validation):
    """On evaluation steps (trainer.eval_every_n_steps), whatever the tiers, the live model in eval mode (no CFG
    drop, no dropout) scores a fixed held-out set: data.val_size episodes of the validation classes (classes never
    trained on), each with its fixed support set, noise ε and t (t stratified over the set, so every t-bin is
    filled). val/loss: their mean velocity MSE. val/train_classes_loss: the same model and protocol on as many
    fixed episodes of the training classes. val/train_val_gap = val/loss − val/train_classes_loss (> 0: the model
    does better on the classes it trains on; unlike the original code's EMA-vs-live gap, both sides are the same model).
    val/loss_ema: the EMA weights on the validation set (when trainer.ema_decay > 0). val/loss_tbin_i: val/loss
    by t-bin as train/loss_tbin_i. Only logged on evaluation steps."""

    metrics = (MetricSpec("val/loss", "MSE", "velocity MSE on the fixed validation-class episodes", "min"),
               MetricSpec("val/train_classes_loss", "MSE", "same, fixed training-class episodes"),
               MetricSpec("val/train_val_gap", "MSE", "val/loss − val/train_classes_loss"),
               MetricSpec("val/loss_ema", "MSE", "val/loss of the EMA weights", "min"),
               MetricSpec("val/loss_tbin_{i}", "MSE", "val/loss of the episodes with t in bin i"))

    def __init__(self, num_t_bins: int = 10, **ctx):
        super().__init__()
        self.bins = num_t_bins
        for name in ("train", "train_n", "ema", "ema_n"):
            self.add_state(name, _zeros())
        self.add_state("sums", _zeros(num_t_bins))
        self.add_state("counts", _zeros(num_t_bins))
        self._fed_ema = False

    def update(self, inputs):
        super().update(inputs)
        v = inputs["val"]
        self.train += v.train_classes_loss.double().sum()
        self.train_n += v.train_classes_loss.numel()
        if v.ema_loss is not None:
            self.ema += v.ema_loss.double().sum()
            self.ema_n += v.ema_loss.numel()
            self._fed_ema = True
        s, c = Fm.time_bin_sums(v.loss, v.t, self.bins)
        self.sums += s
        self.counts += c

    def compute(self):
        out = super().compute()
        if not out:
            return {}
        train = Fm.ratio(self.train, self.train_n)
        out.update({"val/train_classes_loss": train, "val/train_val_gap": out["val/loss"] - train})
        out.update({f"val/loss_tbin_{i}": v for i, v in enumerate(Fm.ratio(self.sums, self.counts))})
        if self._fed_ema:
            out["val/loss_ema"] = Fm.ratio(self.ema, self.ema_n)
        return out

    def reset(self):
        super().reset()
        self._fed_ema = False


@IMAGE.register
class FewShotFID(Collector):
    """On evaluation steps that are multiples of eval.fid_every_n_steps, and at the last step (only when
    eval.fid_every_n_steps > 0): the model that checkpoints export (the EMA weights when trainer.ema_decay > 0)
    generates eval.fid_num_samples images (rounded up to a multiple of the number of validation classes), the
    same number per validation class, each class from one fixed support set of data.support_size images drawn
    with sample.seed, with the sample section's method, steps and cfg_scale; the reference set is every other
    image of those classes, the support images left out (a reference holding them rewards copying them).
    val/fid: the Fréchet distance ‖μ_g − μ_r‖² + tr Σ_g + tr Σ_r − 2 tr (Σ_g Σ_r)^½ between Gaussians fitted
    to the features of generated and reference images (float64), in the feature space of eval.fid_extractor:
    only inception makes it an FID; siglip gives a Fréchet distance in SigLIP features, randconv in random-CNN
    features (tests). Biased upwards roughly like 1/N: compare values only at the same N, classes and extractor.
    val/kid, val/kid_std: mean and std over 100 random subsets (up to 1000 images of each set) of the unbiased
    MMD² with the kernel (x·y/d + 1)³ (KID), which has no such bias. perf/fid_time: wall seconds of that
    evaluation (sampling, features, distances), not part of perf/total_iter_time. The same value as
    eval/fsdit_sample.py --classes val followed by eval/fid.py --gen on that step's checkpoint."""

    tier = "essential"
    needs = ("validation",)
    metrics = (MetricSpec("val/fid", "1", "few-shot Fréchet distance in eval.fid_extractor's features", "min"),
               MetricSpec("val/kid", "1", "KID (unbiased MMD², cubic kernel), mean over subsets", "min"),
               MetricSpec("val/kid_std", "1", "std of KID over the subsets"),
               MetricSpec("perf/fid_time", "s", "wall time of the few-shot FID evaluation"))

    @classmethod
    def applies(cls, context) -> bool:
        return context.get("fid_every", 0) > 0

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("values", torch.full((4,), float("nan"), dtype=torch.float64), reduce=None)
        self._fed = False

    def update(self, inputs):
        r = inputs["val"].fid
        if r is None:
            return
        self.values = torch.tensor([r["fid"], r["kid_mean"], r["kid_std"], r["seconds"]],
                                   dtype=torch.float64).to(self.values)
        self._fed = True

    def compute(self):
        if not self._fed:
            return {}
        return dict(zip(("val/fid", "val/kid", "val/kid_std", "perf/fid_time"), self.values.clone()))

    def reset(self):
        super().reset()
        self._fed = False
