"""Collectors and health rules of the text trainer (masked diffusion, and the AR baseline where they apply).

Each collector's docstring is its definition on the reference page (``docs/metrics.md``, generated from this
module by ``python -m tdlm.metrics.docs``). Collectors read ``StepOutputs`` (source ``batch``), the unwrapped
model (``model``) and ``StepInfo`` (``step``); see ``tdlm/metrics/core.py`` for the contract.
"""

from __future__ import annotations

import math

import torch

from tdlm.metrics import functional as Fm
from tdlm.metrics.core import TIERS, Collector, MetricRunner, MetricSpec, Need, Registry, loss_grad_vectors, \
    tier_cadences
from tdlm.metrics.health import HealthMonitor, Rule

BUCKETS = ("low", "medium", "high")
BUCKET_EDGES = (0.3, 0.7)  # mask ratio of the sequence: [0, .3) low, [.3, .7) medium, [.7, 1] high

TEXT = Registry("text", needs={
    "loss": Need(("batch",), "loss sum and NELBO denominator (valid tokens) of each micro-batch"),
    "logits": Need(("batch",), "logits of the masked positions, (M, V), as the loss computed them"),
    "mask": Need(("batch",), "masked and valid position masks (B, L) and the clean token ids"),
    "t": Need(("batch",), "diffusion time of each sequence, (B,)"),
    "weights": Need(("batch",), "NELBO weight w(t) = −α′(t)/(1−α(t)) of each sequence, unclipped, (B,)"),
    "token_ce": Need(("batch",), "cross-entropy of each masked token, (M,)"),
    "optimizer_step": Need(("step",), "once per optimizer step: grad norm before clipping, LR, tokens, time"),
    "params": Need(("step",), "the parameters after the optimizer step"),
    "bucket_grads": Need(("batch", "model"), "gradient of each corruption bucket's own loss: one extra backward "
                         "pass per bucket and micro-batch, through the retained graph", expensive=True),
    "hidden_states": Need(("batch", "model"), "every block's output from one extra no-grad forward on the "
                          "step's noised batch", expensive=True),
    "attention_probs": Need(("batch", "model"), "explicit-softmax attention probabilities of every layer, from "
                            "the same extra forward", expensive=True),
})


def _diffusion_only(cls):
    cls.applies = classmethod(lambda c, ctx: not ctx.get("causal", False))
    return cls


# ---------------------------------------------------------------------------------------------------- shared
def _token_rows(inputs) -> torch.Tensor:
    """(M,) row index of each masked token, in the order of ``logits``/``token_ce`` (row-major)."""
    def make():
        out = inputs["batch"]
        return torch.arange(out.masked.shape[0], device=out.masked.device)[:, None].expand_as(out.masked)[out.masked]
    return inputs.cached("token_rows", make)


def _predictions(inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) bool correct (argmax == clean token) and (M,) float64 difficulty 1 − max_v p(v) per masked token.

    p_max = exp(max logit − logsumexp); logsumexp comes free from the CE the loss computed: CE = lse − logit[y].
    """
    def make():
        out = inputs["batch"]
        logits = out.logits.detach().float()  # (M, V)
        target = out.input_ids[out.masked]  # (M,)
        top, pred = logits.max(-1)
        lse = out.token_ce.detach().double() + logits.gather(1, target[:, None])[:, 0].double()
        return pred == target, 1.0 - torch.exp(top.double() - lse)
    return inputs.cached("predictions", make)


def _row_buckets(inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) corruption bucket of each sequence by its realised mask ratio, and (B,) bool has-valid-tokens."""
    def make():
        out = inputs["batch"]
        n_valid = out.valid.sum(1)
        r = out.masked.sum(1).double() / n_valid.clamp_min(1)
        return Fm.bucketize_ratio(r, BUCKET_EDGES), n_valid > 0
    return inputs.cached("row_buckets", make)


def _zeros(*shape):
    return torch.zeros(shape, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- essential
@TEXT.register
class TrainLoss(Collector):
    """Training loss per token over the logging window: Σ w(t)·CE over masked tokens / Σ valid tokens, summed
    over all micro-batches and processes (AR: next-token NLL per target). It uses the true NELBO weight even
    when ``diffusion.clip_weight`` clips it for the gradient, so it stays comparable with ``val/loss``. Always
    on: the NaN/Inf stop rule reads it."""

    tier = "essential"
    required = True
    needs = ("loss", "weights", "token_ce", "mask")
    metrics = (MetricSpec("train/loss", "nats/token", "NELBO (AR: NLL) per valid token over the window", "min"),)

    def __init__(self, clip_weight: float = 0.0, **ctx):
        super().__init__()
        self.unclip = clip_weight > 0
        self.add_state("nelbo", _zeros())
        self.add_state("tokens", _zeros())

    def update(self, inputs):
        out = inputs["batch"]
        if self.unclip and out.weight is not None:
            self.nelbo += (out.weight[_token_rows(inputs)].double() * out.token_ce.detach().double()).sum()
        else:
            self.nelbo += out.loss_sum.detach().double()
        self.tokens += out.num_tokens.double()

    def compute(self):
        return {"train/loss": Fm.ratio(self.nelbo, self.tokens)}


@TEXT.register
class Optimization(Collector):
    """Per optimizer step, over the logging window: learning rate of the last step, global gradient norm
    before clipping (mean over the window's steps), and token positions (pads included: they cost compute)
    processed by all processes per second of training-step wall time (evaluation and checkpoints excluded)."""

    tier = "essential"
    needs = ("optimizer_step",)
    metrics = (MetricSpec("train/learning_rate", "1", "learning rate used by the window's last step"),
               MetricSpec("train/grad_norm", "1", "global L2 norm of the gradient before clipping, window mean"),
               MetricSpec("train/tokens_per_second", "tokens/s", "token positions per second, all processes"),
               MetricSpec("train/epoch", "epochs", "completed passes over the training split"))

    def __init__(self, **ctx):
        super().__init__()
        for name in ("lr", "epoch", "grad_sum", "grad_steps", "tokens", "seconds"):
            self.add_state(name, _zeros(), reduce=None)  # identical on every process

    def update(self, inputs):
        s = inputs["step"]
        self.lr.fill_(s.lr)
        self.epoch.fill_(s.epoch)
        if s.grad_norm is not None:
            self.grad_sum += torch.as_tensor(s.grad_norm, dtype=torch.float64).to(self.grad_sum.device)
            self.grad_steps += 1
        self.tokens += s.tokens
        self.seconds += s.seconds

    def compute(self):
        return {"train/learning_rate": self.lr.clone(), "train/grad_norm": Fm.ratio(self.grad_sum, self.grad_steps),
                "train/tokens_per_second": Fm.ratio(self.tokens, self.seconds), "train/epoch": self.epoch.clone()}


@TEXT.register
class ParamNorm(Collector):
    """L2 norm of all parameters (as one vector) after the optimizer step on the logging step."""

    tier = "essential"
    window = False
    needs = ("params",)
    metrics = (MetricSpec("train/param_norm", "1", "L2 norm of all parameters at the logging step"),)

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("norm", _zeros(), reduce=None)

    def update(self, inputs):
        params = [p.detach() for p in inputs["step"].model.parameters()]
        self.norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)).double()).to(self.norm)

    def compute(self):
        return {"train/param_norm": self.norm.clone()}


@_diffusion_only
@TEXT.register
class DiffusionTime(Collector):
    """Mean diffusion time t over every sequence of the window. t ~ U[t_min, 1], so it should sit at
    (1 + t_min)/2 ≈ 0.5; stratified sampling over the global batch keeps it within a fraction of a percent."""

    tier = "essential"
    needs = ("t",)
    metrics = (MetricSpec("diffusion/t_mean", "1", "mean t over the window's sequences (expect (1+t_min)/2)"),)

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("t_sum", _zeros())
        self.add_state("rows", _zeros())

    def update(self, inputs):
        t = inputs["batch"].t
        self.t_sum += t.double().sum()
        self.rows += t.numel()

    def compute(self):
        return {"diffusion/t_mean": Fm.ratio(self.t_sum, self.rows)}


@_diffusion_only
@TEXT.register
class MaskAccuracy(Collector):
    """Over the window: the fraction of masked tokens whose argmax prediction is the clean token; masked tokens
    per optimizer step (global batch, window mean); valid (non-pad) positions / all positions. The guide's
    "valid to total masked" would be identically 1 here (masking never selects a pad), so ``valid_ratio`` is
    the padding share the guide's reading ("low values indicate padding issues") describes."""

    tier = "essential"
    needs = ("logits", "mask")
    metrics = (MetricSpec("metrics/mask_accuracy", "fraction", "masked tokens predicted exactly (argmax)", "max"),
               MetricSpec("metrics/total_masked_tokens", "tokens/step", "masked tokens per global batch"),
               MetricSpec("metrics/valid_ratio", "fraction", "valid (non-pad) positions / all positions"))

    def __init__(self, **ctx):
        super().__init__()
        for name in ("correct", "masked", "valid", "positions"):
            self.add_state(name, _zeros())
        self.add_state("steps", _zeros(), reduce=None)
        self._last_step = None

    def update(self, inputs):
        out = inputs["batch"]
        correct, _ = _predictions(inputs)
        self.correct += correct.sum()
        self.masked += correct.numel()
        self.valid += out.valid.sum()
        self.positions += out.valid.numel()
        if inputs.step != self._last_step:
            self.steps += 1
            self._last_step = inputs.step

    def compute(self):
        return {"metrics/mask_accuracy": Fm.ratio(self.correct, self.masked),
                "metrics/total_masked_tokens": Fm.ratio(self.masked, self.steps),
                "metrics/valid_ratio": Fm.ratio(self.valid, self.positions)}


# ---------------------------------------------------------------------------------------------------- research
@_diffusion_only
@TEXT.register
class CorruptionBuckets(Collector):
    """Sequences are bucketed by their realised mask ratio (masked / valid tokens): low [0, 0.3), medium
    [0.3, 0.7), high [0.7, 1]. Accuracy = correct masked tokens / masked tokens of the bucket's sequences over
    the research window (NaN when the bucket had no masked token); count = sequences in the bucket."""

    tier = "research"
    needs = ("logits", "mask")
    metrics = tuple(MetricSpec(f"research/{b}_corruption_accuracy", "fraction", f"mask accuracy of {b}-corruption "
                               "sequences") for b in BUCKETS) + tuple(
        MetricSpec(f"research/{b}_corruption_count", "sequences", f"{b}-corruption sequences in the window")
        for b in BUCKETS)

    def __init__(self, **ctx):
        super().__init__()
        for name in ("correct", "tokens", "seqs"):
            self.add_state(name, _zeros(len(BUCKETS)))

    def update(self, inputs):
        correct, _ = _predictions(inputs)
        bucket, has_tokens = _row_buckets(inputs)
        tok_bucket = bucket[_token_rows(inputs)]
        self.correct.index_add_(0, tok_bucket, correct.double())
        self.tokens.index_add_(0, tok_bucket, torch.ones_like(correct, dtype=torch.float64))
        self.seqs.index_add_(0, bucket, has_tokens.double())

    def compute(self):
        acc = Fm.ratio(self.correct, self.tokens)
        return {**{f"research/{b}_corruption_accuracy": acc[i] for i, b in enumerate(BUCKETS)},
                **{f"research/{b}_corruption_count": self.seqs[i] for i, b in enumerate(BUCKETS)}}


@_diffusion_only
@TEXT.register
class WeightDifficulty(Collector):
    """Over every masked token of the research window: its NELBO weight w = w(t) of its sequence (unclipped)
    and its difficulty d = 1 − max_v p(v). ``weight_difficulty_correlation`` is the Pearson r of (w, d),
    computed in torch from float64 moment sums (merged exactly across steps and processes; equals
    ``scipy.stats.pearsonr``). w(t) falls with t for every schedule while a token gets harder as t removes its
    context, so a model that has learned anything gives r < 0: the guide's "should be positive" contradicts
    the maths, and the health rule fires on the sign the maths rules out (see the rules table).
    Per masked token E[w] = E[t·w(t)]/E[t] = 1/E[t] ≈ 2 for the linear schedule, within the guide's 1–3."""

    tier = "research"
    needs = ("logits", "mask", "weights", "token_ce")
    metrics = (MetricSpec("research/weight_difficulty_correlation", "1", "Pearson r of (w(t), 1 − p_max) over "
                          "masked tokens"),
               MetricSpec("research/avg_loss_weight", "1", "mean w(t) over masked tokens"),
               MetricSpec("research/avg_prediction_difficulty", "1", "mean 1 − p_max over masked tokens", "min"),
               MetricSpec("research/weight_std", "1", "population std of w(t) over masked tokens"))

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("m", _zeros(6))

    def update(self, inputs):
        _, difficulty = _predictions(inputs)
        self.m += Fm.moments(inputs["batch"].weight[_token_rows(inputs)], difficulty)

    def compute(self):
        n, sw, sd, sww = self.m[0], self.m[1], self.m[2], self.m[3]
        return {"research/weight_difficulty_correlation": Fm.pearson_from_moments(self.m),
                "research/avg_loss_weight": Fm.ratio(sw, n), "research/avg_prediction_difficulty": Fm.ratio(sd, n),
                "research/weight_std": Fm.std_from_moments(n, sw, sww)}


@_diffusion_only
@TEXT.register
class BucketGradNorms(Collector):
    """On research steps, the training loss is split by corruption bucket, L_b = Σ_{masked tokens of bucket-b
    sequences} w·CE / N (N = the step's global valid tokens, w clipped as in training), so Σ_b L_b is the
    training loss. gradient_norm_b = ‖∇_θ L_b‖₂ over all parameters, from one extra backward per bucket
    (``torch.autograd.grad``, ``.grad`` untouched); gradients are summed over micro-batches and processes
    before the norm, so it is the global batch's. total = ‖Σ_b ∇L_b‖ = the step's ``train/grad_norm``. NaN
    for a bucket without masked tokens; ratio = high / low."""

    tier = "research"
    window = False
    needs = ("mask", "weights", "token_ce", "bucket_grads")
    metrics = tuple(MetricSpec(f"research/gradient_norm_{b}_corruption", "1", f"‖∇ loss of {b}-corruption "
                               "sequences‖") for b in BUCKETS) + (
        MetricSpec("research/gradient_norm_ratio_high_to_low", "1", "gradient_norm_high / gradient_norm_low"),
        MetricSpec("research/gradient_norm_total", "1", "‖Σ_b ∇L_b‖ (= train/grad_norm of that step)"))

    def __init__(self, clip_weight: float = 0.0, **ctx):
        super().__init__()
        self.clip = clip_weight
        self.add_state("grads", torch.zeros((), dtype=torch.float32))  # becomes (3, P) on the first update
        self.add_state("tokens", _zeros())
        self.add_state("bucket_tokens", _zeros(len(BUCKETS)))

    def update(self, inputs):
        out, model = inputs["batch"], inputs["model"]
        rows = _token_rows(inputs)
        tok_bucket = _row_buckets(inputs)[0][rows]  # (M,)
        w = out.weight[rows]
        if self.clip > 0:
            w = w.clamp(max=self.clip)  # the weight the training gradient used
        contrib = w * out.token_ce  # (M,), with grad
        losses = [(contrib * (tok_bucket == k)).sum() for k in range(len(BUCKETS))]
        params = [p for p in model.parameters() if p.requires_grad]
        self.grads = self.grads + loss_grad_vectors(losses, params)
        self.tokens += out.num_tokens.double()
        self.bucket_tokens.index_add_(0, tok_bucket, torch.ones_like(rows, dtype=torch.float64))

    def compute(self):
        g = self.grads.double() / self.tokens
        norms = torch.linalg.vector_norm(g, dim=-1) if g.dim() else torch.full((len(BUCKETS),), math.nan)
        norms = torch.where(self.bucket_tokens > 0, norms, math.nan)
        total = torch.linalg.vector_norm(g.sum(0)) if g.dim() else torch.tensor(math.nan)
        return {**{f"research/gradient_norm_{b}_corruption": norms[i] for i, b in enumerate(BUCKETS)},
                "research/gradient_norm_ratio_high_to_low": norms[2] / norms[0],
                "research/gradient_norm_total": total}


# ---------------------------------------------------------------------------------------------------- advanced
@TEXT.register
class ModelProbe(Collector):
    """On attention-analysis steps, one extra no-grad forward (eval mode) of the step's noised batch with
    explicit softmax attention. attention_entropy_layer{i}: −Σ_j p_ij log p_ij over the valid keys j, in nats,
    averaged over valid queries i, heads and sequences (uniform attention over n keys = log n);
    attention_entropy: its mean over layers (``attention_entropy_proxy`` is the same value under the guide's
    old name). hidden_state_norm_layer{i}: mean L2 norm of block i's output at valid positions;
    hidden_state_norm: the last block's (before the final norm). sequence_diversity: per sequence,
    1 − mean cosine similarity between the last block's outputs at distinct valid positions, averaged over
    sequences (0 = every position alike)."""

    tier = "advanced"
    window = False
    needs = ("mask", "hidden_states", "attention_probs")
    metrics = (MetricSpec("advanced/attention_entropy_layer{i}", "nats", "attention entropy of layer i"),
               MetricSpec("advanced/attention_entropy", "nats", "attention entropy, mean over layers"),
               MetricSpec("advanced/attention_entropy_proxy", "nats", "alias of advanced/attention_entropy"),
               MetricSpec("advanced/hidden_state_norm_layer{i}", "1", "mean ‖h‖₂ of block i's output"),
               MetricSpec("advanced/hidden_state_norm", "1", "mean ‖h‖₂ of the last block's output"),
               MetricSpec("advanced/sequence_diversity", "1", "1 − mean pairwise cosine across positions"))

    def __init__(self, num_layers: int = 1, mask_id: int = 0, chunk_elements: int = 2**24, **ctx):
        super().__init__()
        self.mask_id, self.chunk_elements = mask_id, chunk_elements
        for name in ("ent", "ent_n", "norm", "norm_n"):
            self.add_state(name, _zeros(num_layers))
        self.add_state("div", _zeros())
        self.add_state("div_n", _zeros())

    @torch.no_grad()
    def update(self, inputs):
        out, model = inputs["batch"], inputs["model"]
        ids = out.input_ids if out.masked is None else torch.where(out.masked, self.mask_id, out.input_ids)
        B, L = ids.shape
        rows = max(1, self.chunk_elements // (model.config.num_heads * L * L))  # bounds B·H·L² per layer
        was_training = model.training
        model.eval()
        for a in range(0, B, rows):
            v = out.valid[a:a + rows]
            res = model.hidden_states(ids[a:a + rows], v, return_attention=True, return_all_hidden=True)
            for i, (p, h) in enumerate(zip(res["attentions"], res["all_hidden"])):
                e, n = Fm.attention_entropy_sums(p, v, v)
                self.ent[i] += e
                self.ent_n[i] += n
                s, n = Fm.vector_norm_sums(h, v)
                self.norm[i] += s
                self.norm_n[i] += n
            d, n = Fm.sequence_diversity_sums(res["all_hidden"][-1], v)
            self.div += d
            self.div_n += n
        model.train(was_training)

    def compute(self):
        ent, norm = Fm.ratio(self.ent, self.ent_n), Fm.ratio(self.norm, self.norm_n)
        vals = {f"advanced/attention_entropy_layer{i}": e for i, e in enumerate(ent)}
        vals.update({f"advanced/hidden_state_norm_layer{i}": x for i, x in enumerate(norm)})
        vals.update({"advanced/attention_entropy": ent.mean(), "advanced/attention_entropy_proxy": ent.mean(),
                     "advanced/hidden_state_norm": norm[-1], "advanced/sequence_diversity": Fm.ratio(self.div,
                                                                                                     self.div_n)})
        return vals


TEXT.add_external("essential", "Trainer.evaluate (every trainer.eval_every_n_steps)",
                  MetricSpec("val/loss", "nats/token", "NELBO per valid token on the validation split (fixed "
                             "noise; EMA weights when trainer.ema_decay > 0)", "min"),
                  MetricSpec("val/perplexity", "1", "exp(val/loss): a perplexity upper bound (AR: exact)", "min"),
                  MetricSpec("val/num_tokens", "tokens", "valid tokens scored"))
TEXT.add_external("essential", "Trainer.train (once, at the end)",
                  MetricSpec("summary/training_time_hours", "h", "wall time of this session's loop"),
                  MetricSpec("summary/total_steps", "steps", "optimizer steps completed"),
                  MetricSpec("summary/final_loss", "nats/token", "last logged train/loss"),
                  MetricSpec("summary/best_val_loss", "nats/token", "lowest val/loss"),
                  MetricSpec("summary/best_val_perplexity", "1", "exp(best_val_loss)"),
                  MetricSpec("summary/steps_this_session", "steps", "steps since start or resume"))


# ---------------------------------------------------------------------------------------------------- health
def _buckets(kind: str) -> tuple[str, ...]:
    return tuple(f"research/{b}_corruption_{kind}" for b in BUCKETS)


TEXT_RULES = (
    Rule("nonfinite_loss", "training loss is NaN or Inf; stopping", ("train/loss",), "train/loss is NaN or ±Inf",
         lambda v, p: not math.isfinite(v["train/loss"]), stop=True, finite_only=False),
    Rule("mask_accuracy_low", "mask accuracy below the floor after warm-up", ("metrics/mask_accuracy",),
         "metrics/mask_accuracy < min", lambda v, p: v["metrics/mask_accuracy"] < p["min"], {"min": 0.4},
         warmup=True),
    Rule("high_above_medium_accuracy", "high-corruption accuracy above medium-corruption accuracy",
         _buckets("accuracy")[1:], "high_corruption_accuracy > medium_corruption_accuracy + margin",
         lambda v, p: v[_buckets("accuracy")[2]] > v[_buckets("accuracy")[1]] + p["margin"], {"margin": 0.01},
         warmup=True),
    Rule("bucket_zero_accuracy", "a corruption bucket with masked tokens has 0% accuracy", _buckets("accuracy"),
         "any bucket accuracy == 0 (NaN = empty bucket, ignored)", lambda v, p: any(x == 0 for x in v.values()),
         warmup=True, finite_only=False),
    Rule("weight_difficulty_correlation_sign", "weight–difficulty correlation has the sign the maths rules out "
         "(guide: 'negative'; w(t) falls with t, so the healthy sign is negative: expected_sign = -1)",
         ("research/weight_difficulty_correlation",), "expected_sign · r < −margin",
         lambda v, p: p["expected_sign"] * v["research/weight_difficulty_correlation"] < -p["margin"],
         {"expected_sign": -1.0, "margin": 0.05}, warmup=True),
    Rule("gradient_ratio_extreme", "high/low-corruption gradient ratio outside [min, max]",
         ("research/gradient_norm_ratio_high_to_low",), "ratio < min or ratio > max",
         lambda v, p: not p["min"] <= v["research/gradient_norm_ratio_high_to_low"] <= p["max"],
         {"min": 0.1, "max": 10.0}),
    Rule("high_corruption_gradient_vanishing", "high-corruption gradient norm vanishing",
         ("research/gradient_norm_high_corruption",), "gradient_norm_high_corruption < min",
         lambda v, p: v["research/gradient_norm_high_corruption"] < p["min"], {"min": 0.01}),
    Rule("low_corruption_gradient_exploding", "low-corruption gradient norm exploding",
         ("research/gradient_norm_low_corruption",), "gradient_norm_low_corruption > max",
         lambda v, p: v["research/gradient_norm_low_corruption"] > p["max"], {"max": 5.0}),
    Rule("val_train_gap", "validation loss far above training loss (overfitting)", ("val/loss", "train/loss"),
         "val/loss − train/loss > max_relative · |train/loss|",
         lambda v, p: v["val/loss"] - v["train/loss"] > p["max_relative"] * abs(v["train/loss"]),
         {"max_relative": 0.2}),
    Rule("t_mean_off", "mean diffusion time far from 0.5 (biased t sampling)", ("diffusion/t_mean",),
         "|t_mean − target| > tolerance", lambda v, p: abs(v["diffusion/t_mean"] - p["target"]) > p["tolerance"],
         {"target": 0.5, "tolerance": 0.05}),
)


def build_text_metrics(cfg, *, mask_id: int, device=None, sinks=(), is_main: bool = True) -> MetricRunner:
    """The runner of a text run: enabled tiers from ``cfg.metrics.tiers``, rules with YAML overrides."""
    ctx = {"causal": cfg.model.causal, "mask_id": mask_id, "num_layers": cfg.model.num_layers,
           "clip_weight": cfg.diffusion.clip_weight}
    enabled = {t: getattr(cfg.metrics.tiers, t).enabled for t in TIERS}
    health = HealthMonitor(TEXT_RULES, cfg.metrics.health, warmup_steps=cfg.optim.warmup_steps)
    return MetricRunner(TEXT.build(enabled, ctx), tier_cadences(cfg.metrics), cfg.trainer.max_steps,
                        health=health, sinks=sinks, device=device, is_main=is_main)


REFERENCE_INTRO = """
Every metric the text trainer logs, generated from `tdlm/metrics/text.py` (collectors: `TEXT`, rules:
`TEXT_RULES`). Each collector belongs to one tier; a tier is switched on in YAML and reports on its cadence:

```yaml
metrics:
  tiers: {essential: {enabled: true}, research: {enabled: true}, advanced: {enabled: true}}
  logging_steps: 100            # essential
  detailed_metrics_steps: 500   # research: a multiple of logging_steps
  attention_analysis_steps: 2000  # advanced: a multiple of logging_steps
  health: {mask_accuracy_low: {min: 0.5}}   # rule overrides, see the table at the end
trainer:
  eval_every_n_steps: 100       # val/*: a multiple of logging_steps
```

Config loading rejects a cadence that is not a multiple of `logging_steps`, so every panel shares the same
x positions. A tier also reports on the last step. *Window* collectors are updated on every step and report
over all steps since their last report; collectors that need an expensive input (extra backward or forward
passes) run only on the steps their tier is due, so those inputs are never produced otherwise. Values are
accumulated on the device as float64 sums and counts and combined across processes by summing before any
ratio is taken, so N processes log what one process logs over the same global batch. Fractions are in
[0, 1] (the guide's 40% is 0.4). A value with no data (an empty bucket) is NaN, never 0.

Where the TDLM metric guide and the mathematics disagree, the maths wins: `train/loss` uses the true NELBO
weight even when `diffusion.clip_weight` clips it for the gradient; the weight–difficulty correlation is
expected to be negative (see `WeightDifficulty`), so the health rule fires on a positive one; `valid_ratio` is
the share of non-pad positions. Sinks: `metrics.jsonl` (always), the console (`metrics.console`), and wandb
(`wandb.enabled`, online or offline) where every panel uses `trainer/global_step` and panels group by prefix.
An image trainer registers its own collectors and rules on the same core (`tdlm.metrics.core`,
`tdlm.metrics.health`, `tdlm.metrics.functional`).
"""


def reference_page() -> str:
    """The text of ``docs/metrics.md``."""
    from tdlm.metrics.docs import render

    return render(TEXT, TEXT_RULES, "Metric reference: text trainer", REFERENCE_INTRO)
