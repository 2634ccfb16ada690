"""Research-tier FSDiT collectors (every ``metrics.detailed_metrics_steps``): condition histograms, the
conditioning path's magnitudes, context_scale, and the encoder-side vs DiT gradient and update norms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tdlm.metrics import functional as Fm
from tdlm.metrics.core import Collector, MetricSpec
from tdlm.metrics.image.inputs import ENCODER_PREFIXES, IMAGE, _std, _zeros
from tdlm.metrics.media import Histogram


@IMAGE.register
class ConditionHistograms(Collector):
    """On research steps, from that step's micro-batches: cond/support_pooled_hist, the histogram of every value
    of the pooled support embeddings over [−R, R] (R = 1.5 × the largest |value| among the fixed validation
    episodes' embeddings; values beyond R land in the edge bins); cond/same_class_cos_hist and
    cond/diff_class_cos_hist, histograms over [−1, 1] of the pair cosines of ConditionStats. Media: JSON
    {counts, edges} in metrics.jsonl, wandb.Histogram in wandb."""

    tier = "research"
    window = False
    needs = ("condition",)
    metrics = (MetricSpec("cond/support_pooled_hist", "count", "histogram of pooled embedding values"),
               MetricSpec("cond/same_class_cos_hist", "count", "histogram of same-class pair cosines"),
               MetricSpec("cond/diff_class_cos_hist", "count", "histogram of different-class pair cosines"))

    def __init__(self, hist_bins: int = 50, pooled_range: float = 1.0, **ctx):
        super().__init__()
        self.range = float(pooled_range)
        for name in ("pooled", "same", "diff"):
            self.add_state(name, _zeros(hist_bins))

    def update(self, inputs):
        out = inputs["batch"]
        bins = self.pooled.numel()
        e = out.cond.detach().double().clamp(-self.range, self.range)
        self.pooled += torch.histc(e, bins, -self.range, self.range)
        cos, same = Fm.pair_cosines(out.cond, out.labels)
        self.same += torch.histc(cos[same], bins, -1.0, 1.0)  # boolean indexing: due steps only
        self.diff += torch.histc(cos[~same], bins, -1.0, 1.0)

    def compute(self):
        return {"cond/support_pooled_hist": Histogram.from_counts(self.pooled, -self.range, self.range),
                "cond/same_class_cos_hist": Histogram.from_counts(self.same, -1.0, 1.0),
                "cond/diff_class_cos_hist": Histogram.from_counts(self.diff, -1.0, 1.0)}


@IMAGE.register
class ConditionDebug(Collector):
    """Magnitudes inside the conditioning path, over the window's episodes: t_emb_abs_mean, y_emb_abs_mean and
    c_abs_mean = mean |value| of the timestep embedding, the projected support embedding (the null vector on
    CFG-dropped rows) and c = t_emb + context_scale·y_emb (with model.cond_layernorm: LN(t_emb) +
    context_scale·LN(y_emb)); c_l2_mean = mean ‖c‖₂. support_pooled_*_model: mean |e| and mean ‖e‖₂ of the pooled
    support embeddings the model actually conditioned on, i.e. of the episodes whose condition was not dropped
    (cond/support_pooled_* counts every episode). y_emb → 0 means the condition is ignored."""

    tier = "research"
    needs = ("embeddings", "condition")
    metrics = (MetricSpec("dbg/t_emb_abs_mean", "1", "mean |t_emb|"),
               MetricSpec("dbg/y_emb_abs_mean", "1", "mean |y_emb| (null vector on dropped rows)"),
               MetricSpec("dbg/c_abs_mean", "1", "mean |c|"),
               MetricSpec("dbg/c_l2_mean", "1", "mean ‖c‖₂ per episode"),
               MetricSpec("dbg/support_pooled_abs_mean_model", "1", "mean |e| of the non-dropped episodes"),
               MetricSpec("dbg/support_pooled_l2_mean_model", "1", "mean ‖e‖₂ of the non-dropped episodes"))

    def __init__(self, **ctx):
        super().__init__()
        for name in ("rows", "t_abs", "y_abs", "c_abs", "c_l2", "kept", "e_abs", "e_l2", "vals_d", "vals_e"):
            self.add_state(name, _zeros())

    def update(self, inputs):
        out = inputs["batch"]
        self.rows += out.c.shape[0]
        self.vals_d += out.c.numel()
        self.t_abs += out.t_emb.double().abs().sum()
        self.y_abs += out.y_emb.double().abs().sum()
        self.c_abs += out.c.double().abs().sum()
        self.c_l2 += torch.linalg.vector_norm(out.c.double(), dim=-1).sum()
        keep = (~out.drop).double()  # (B,)
        e = out.cond.detach().double()
        self.kept += keep.sum()
        self.vals_e += keep.sum() * e.shape[-1]
        self.e_abs += (e.abs().sum(-1) * keep).sum()
        self.e_l2 += (torch.linalg.vector_norm(e, dim=-1) * keep).sum()

    def compute(self):
        return {"dbg/t_emb_abs_mean": Fm.ratio(self.t_abs, self.vals_d),
                "dbg/y_emb_abs_mean": Fm.ratio(self.y_abs, self.vals_d),
                "dbg/c_abs_mean": Fm.ratio(self.c_abs, self.vals_d), "dbg/c_l2_mean": Fm.ratio(self.c_l2, self.rows),
                "dbg/support_pooled_abs_mean_model": Fm.ratio(self.e_abs, self.vals_e),
                "dbg/support_pooled_l2_mean_model": Fm.ratio(self.e_l2, self.kept)}


@IMAGE.register
class ContextNorms(Collector):
    """ctx/c_norm_t_emb_ratio: per episode ‖context_scale ⊙ LN(y_emb)‖₂ / ‖LN(t_emb)‖₂, mean over the window,
    with LN a LayerNorm without affine (the blocks' norm): how large the support term of c is next to the time
    term once both are normalised (the original code's c_norm/t_emb ratio after LayerNorm). CFG-dropped episodes count
    with the null vector. ctx/context_norm_std: the population std over the window's episodes of ‖c‖₂ (0 = every
    episode gets the same conditioning magnitude)."""

    tier = "research"
    needs = ("embeddings",)
    metrics = (MetricSpec("ctx/c_norm_t_emb_ratio", "1", "‖context_scale·LN(y_emb)‖ / ‖LN(t_emb)‖, mean"),
               MetricSpec("ctx/context_norm_std", "1", "std over episodes of ‖c‖₂"))

    def __init__(self, **ctx):
        super().__init__()
        for name in ("rows", "ratio", "c_s", "c_ss"):
            self.add_state(name, _zeros())

    def update(self, inputs):
        out = inputs["batch"]
        D = out.t_emb.shape[-1]
        t_ln = F.layer_norm(out.t_emb.double(), (D,))
        y_ln = F.layer_norm(out.y_emb.double(), (D,)) * out.context_scale.detach().double()
        self.ratio += (torch.linalg.vector_norm(y_ln, dim=-1) / torch.linalg.vector_norm(t_ln, dim=-1)).sum()
        c_norm = torch.linalg.vector_norm(out.c.double(), dim=-1)
        self.rows += c_norm.numel()
        self.c_s += c_norm.sum()
        self.c_ss += c_norm.pow(2).sum()

    def compute(self):
        return {"ctx/c_norm_t_emb_ratio": Fm.ratio(self.ratio, self.rows),
                "ctx/context_norm_std": _std(self.rows, self.c_s, self.c_ss)}


@IMAGE.register
class ContextScale(Collector):
    """Statistics of the learnable context_scale parameter (the gate on y_emb; one value per channel, or one
    scalar) after the optimizer step of the research step: mean, population std, min, max over its entries.
    Staying at its initial value means the conditioning gate is not learning."""

    tier = "research"
    window = False
    needs = ("params",)
    metrics = tuple(MetricSpec(f"ctx/context_scale_{k}", "1", f"{k} of the context_scale entries")
                    for k in ("mean", "std", "min", "max"))

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("stats", torch.full((4,), math.nan, dtype=torch.float64), reduce=None)

    def update(self, inputs):
        s = inputs["step"].model.context_scale.detach().double().reshape(-1)
        self.stats = torch.stack([s.mean(), s.std(unbiased=False), s.min(), s.max()]).to(self.stats)

    def compute(self):
        return {f"ctx/context_scale_{k}": self.stats[i] for i, k in enumerate(("mean", "std", "min", "max"))}


@IMAGE.register
class GradientGroups(Collector):
    """On research steps, for the encoder side (the trainable conditioning path: support projector y_embedder,
    CFG null vector null_y and context_scale; the frozen SigLIP has no gradient) and for the DiT (everything
    else): raw_norm = ‖∇‖₂ of that group's gradient after backward and before clipping, i.e. before any LR
    scaling; effective_step = raw_norm × lr, the LR-scaled gradient norm; update_norm = ‖θ_after − θ_before‖₂, the
    parameter change the optimizer step actually applied (AdamW's normalisation, clipping and weight decay
    included), measured from a copy of the group's parameters taken before the step."""

    tier = "research"
    window = False
    needs = ("grads",)
    GROUPS = ("encoder", "dit")
    metrics = tuple(MetricSpec(f"grad/{g}_{k}", "1", d) for g in GROUPS for k, d in (
        ("raw_norm", "‖gradient‖ before clipping and LR scaling"), ("effective_step", "raw_norm × lr"),
        ("update_norm", "‖parameter change of the optimizer step‖")))

    def __init__(self, encoder_prefixes: tuple[str, ...] = ENCODER_PREFIXES, **ctx):
        super().__init__()
        self.prefixes = tuple(encoder_prefixes)
        self.add_state("raw", torch.full((2,), math.nan, dtype=torch.float64), reduce=None)
        self.add_state("lr", torch.full((), math.nan, dtype=torch.float64), reduce=None)
        self._params: list[list[torch.Tensor]] = [[], []]
        self._before: list[list[torch.Tensor]] | None = None

    def _groups(self, model) -> list[list[torch.Tensor]]:
        groups: list[list[torch.Tensor]] = [[], []]
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups[0 if name.startswith(self.prefixes) else 1].append(p)
        return groups

    def update(self, inputs):
        view = inputs["grads"]
        self._params = self._groups(view.model)
        norms = []
        for group in self._params:
            grads = [p.grad.detach() for p in group if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            norms.append(norm.double().to(self.raw.device))
        self.raw = torch.stack(norms)
        self.lr.fill_(view.lr)
        self._before = [[p.detach().clone() for p in group] for group in self._params]

    def compute(self):
        """Called after the optimizer step of the same step: the parameters now hold θ_after."""
        upd = torch.full((2,), math.nan, dtype=torch.float64, device=self.raw.device)
        if self._before is not None:
            for g, (now, before) in enumerate(zip(self._params, self._before)):
                diffs = [p.detach() - b for p, b in zip(now, before)]
                upd[g] = torch.nn.utils.get_total_norm(diffs).double() if diffs else 0.0
        self._before = None
        out = {}
        for g, name in enumerate(self.GROUPS):
            out.update({f"grad/{name}_raw_norm": self.raw[g], f"grad/{name}_effective_step": self.raw[g] * self.lr,
                        f"grad/{name}_update_norm": upd[g]})
        return out
