"""The domain-free metric core and its maths: state contract, registry checks, cadence, sync, functional forms."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats

from tdlm.metrics import functional as Fm
from tdlm.metrics.core import Collector, MetricRunner, MetricSpec, Need, Registry, loss_grad_vectors, sync_states


class Mean(Collector):
    tier = "essential"
    needs = ("x",)
    metrics = (MetricSpec("toy/mean", "1", "mean of x"),)

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64))
        self.add_state("count", torch.zeros((), dtype=torch.float64))
        self.add_state("biggest", torch.full((), -math.inf, dtype=torch.float64), reduce="max")
        self.add_state("calls", torch.zeros((), dtype=torch.float64), reduce=None)

    def update(self, inputs):
        x = inputs["batch"]
        self.total += x.double().sum()
        self.count += x.numel()
        self.biggest = torch.maximum(self.biggest, x.double().max())
        self.calls += 1

    def compute(self):
        return {"toy/mean": Fm.ratio(self.total, self.count), "toy/max": self.biggest, "toy/calls": self.calls}


def toy_registry():
    reg = Registry("toy", {"x": Need(("batch",), "numbers"), "big": Need(("batch",), "costly", expensive=True)})
    reg.register(Mean)
    return reg


def test_state_update_compute_reset():
    c = Mean()
    from tdlm.metrics.core import Inputs
    c.update(Inputs(1, {"batch": torch.tensor([1.0, 2.0, 3.0])}))
    c.update(Inputs(2, {"batch": torch.tensor([10.0])}))
    out = c.compute()
    assert out["toy/mean"].item() == 4.0 and out["toy/max"].item() == 10.0 and out["toy/calls"].item() == 2
    c.reset()
    assert c.count.item() == 0 and c.biggest.item() == -math.inf
    assert math.isnan(c.compute()["toy/mean"].item())  # empty window: NaN, not 0
    with pytest.raises(ValueError, match="reduce"):
        c.add_state("bad", torch.zeros(()), reduce="mean")


def test_registry_checks_declarations():
    reg = toy_registry()
    assert Mean.sources == frozenset({"batch"})

    class Costly(Mean):
        needs = ("big",)
    with pytest.raises(ValueError, match="window = False"):
        reg.register(Costly)

    class Unknown(Mean):
        needs = ("nope",)
    with pytest.raises(ValueError, match="unknown needs"):
        reg.register(Unknown)

    class Research(Mean):
        tier = "research"
        window = False
        needs = ("big",)
        metrics = (MetricSpec("toy/big", "1", "costly"),)
    reg.register(Research)
    assert [type(c) for c in reg.build({"essential": True}, {})] == [Mean]
    assert [type(c) for c in reg.build({"research": True}, {})] == [Research]
    assert "toy/mean" in [s.name for s in reg.specs()]

    class Clash(Mean):
        pass
    with pytest.raises(ValueError, match="toy/mean"):
        reg.register(Clash)


def test_runner_cadence_window_and_due_only():
    class Snap(Mean):
        tier = "research"
        window = False

        def compute(self):
            return {f"snap/{k.split('/')[1]}": v for k, v in super().compute().items()}
    runner = MetricRunner([Mean(), Snap()], {"essential": 2, "research": 4}, last_step=7)
    assert [s for s in range(1, 8) if runner.due(s, "research")] == [4, 7]
    assert [s for s in range(1, 8) if runner.due(s)] == [2, 4, 6, 7]
    logged = {}
    for step in range(1, 8):
        runner.update(step, batch=torch.tensor([float(step)]))
        runner.update(step, other=1)  # no collector needs it: ignored
        if runner.due(step):
            logged[step] = runner.compute(step)
    assert [logged[s]["toy/mean"] for s in (2, 4, 6, 7)] == [1.5, 3.5, 5.5, 7.0]  # windows, then a partial one
    assert logged[4]["toy/calls"] == 2  # reset after step 2
    # the due-only collector saw step 4 and step 7 alone, and reports only then
    assert logged[4]["snap/mean"] == 4.0 and logged[7]["snap/mean"] == 7.0 and logged[4]["snap/calls"] == 1
    assert "snap/mean" not in logged[2] and "snap/mean" not in logged[6]
    assert all(isinstance(x, float) for v in logged.values() for x in v.values())


def test_runner_passes_media_through_and_sinks_get_one_record():
    hist = object()  # stands for a wandb.Histogram an image collector might return

    class Media(Mean):
        def compute(self):
            return {"toy/count": self.count, "toy/hist": hist, "toy/int": 3}
    got = []
    sink = type("Sink", (), {"log": lambda self, m, step: got.append((step, m)), "close": lambda self: None})()
    runner = MetricRunner([Media()], {"essential": 1}, last_step=10, sinks=[sink])
    runner.update(1, batch=torch.tensor([1.0, 2.0]))
    values = runner.compute(1)
    assert values == {"toy/count": 2.0, "toy/hist": hist, "toy/int": 3.0}
    assert runner.log(1, values) == [] and got == [(1, values)]


def test_loss_grad_vectors_match_autograd_and_leave_grad_alone():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    y = lin(x)
    losses = [y[:, 0].pow(2).sum(), y[:, 1].sum()]
    g = loss_grad_vectors(losses, list(lin.parameters()))
    assert g.shape == (2, 3 * 2 + 2)
    for k, loss in enumerate([lin(x)[:, 0].pow(2).sum(), lin(x)[:, 1].sum()]):
        ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(lin.parameters()))])
        torch.testing.assert_close(g[k], ref)
    assert all(p.grad is None for p in lin.parameters())
    (losses[0] + losses[1]).backward()  # the graph is still there for the training backward
    assert lin.weight.grad is not None


# ------------------------------------------------------------------------------------------ sync over 2 processes
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from tdlm.metrics.core import Inputs
        c = Mean()
        # rank 0 sees one value, rank 1 three: the mean of per-rank means (3.0) is not the global mean (5.0)
        data = torch.tensor([2.0]) if rank == 0 else torch.tensor([4.0, 5.0, 9.0])
        c.update(Inputs(1, {"batch": data}))
        sync_states([c])
        results[rank] = {k: float(v) for k, v in c.compute().items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_sums_counts_not_ratios():
    results = mp.Manager().dict()
    mp.spawn(_sync_worker, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank]["toy/mean"] == 5.0  # (2 + 4 + 5 + 9) / 4
        assert results[rank]["toy/max"] == 9.0
        assert results[rank]["toy/calls"] == 1.0  # reduce=None: a per-process value, not summed


# ------------------------------------------------------------------------------------------ functional maths
def test_pearson_and_std_from_moments_match_scipy_and_merge():
    rng = np.random.default_rng(0)
    x, y = rng.exponential(size=500), rng.normal(size=500)
    y = y + 0.3 * x
    m = Fm.moments(torch.tensor(x), torch.tensor(y))
    assert Fm.pearson_from_moments(m).item() == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    halves = Fm.moments(torch.tensor(x[:200]), torch.tensor(y[:200])) + Fm.moments(torch.tensor(x[200:]),
                                                                                   torch.tensor(y[200:]))
    torch.testing.assert_close(Fm.pearson_from_moments(halves), Fm.pearson_from_moments(m))
    assert Fm.std_from_moments(m[0], m[1], m[3]).item() == pytest.approx(x.std(), rel=1e-10)
    assert Fm.pearson_from_moments(torch.tensor([1.0, 1, 1, 1, 1, 1])).isnan()  # n = 1
    assert Fm.pearson_from_moments(Fm.moments(torch.tensor([1.0, 2]), torch.tensor([3.0, 3]))).isnan()  # constant


def test_mask_ratio_buckets_match_the_bucketized_ratio():
    masked = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    rows, ratio_bucket = Fm.mask_ratio_buckets(masked, torch.ones_like(masked), (0.3, 0.7))
    assert torch.equal(rows, Fm.bucketize_ratio(masked.double().mean(1), (0.3, 0.7))) and ratio_bucket.all()


def test_bucketize_ratio_edges():
    r = torch.tensor([0.0, 0.29, 0.3, 0.5, 0.69, 0.7, 1.0])
    assert Fm.bucketize_ratio(r, (0.3, 0.7)).tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_attention_entropy_known_values():
    # one sequence, 1 head, 3 positions, the last a pad: query 0 uniform over 2 valid keys, query 1 is (1/4, 3/4)
    p = torch.tensor([[[[0.5, 0.5, 0.0], [0.25, 0.75, 0.0], [1.0, 0.0, 0.0]]]])
    valid = torch.tensor([[True, True, False]])
    s, n = Fm.attention_entropy_sums(p, valid, valid)
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert n.item() == 2 and s.item() == pytest.approx(math.log(2) + h1)
    one_hot = torch.eye(4)[None, None].expand(2, 3, 4, 4)  # 2 sequences, 3 heads, attention on itself
    s, n = Fm.attention_entropy_sums(one_hot, None, None)
    assert s.item() == 0 and n.item() == 2 * 3 * 4


def test_vector_norm_and_sequence_diversity_known_values():
    h = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [5.0, 5.0]]])
    s, n = Fm.vector_norm_sums(h, torch.tensor([[True, True, False]]))
    assert s.item() == 6.0 and n.item() == 2
    same = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [7.0, 0.0]]])
    ortho = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [9.0, 9.0]]])  # third position is a pad
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]])
    for h, valid, expect in ((same, None, 0.0), (ortho, torch.tensor([[True, True, False]]), 1.0),
                             (opposite, torch.tensor([[True, True, False]]), 2.0)):
        s, n = Fm.sequence_diversity_sums(h, valid)
        assert n.item() == 1 and s.item() == pytest.approx(expect, abs=1e-12)
    h = torch.randn(3, 6, 5, dtype=torch.float64)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 4:] = False
    valid[2, 1:] = False  # one valid position: skipped
    s, n = Fm.sequence_diversity_sums(h, valid)
    ref = []
    for b in range(2):
        u = torch.nn.functional.normalize(h[b][valid[b]], dim=-1)
        cos = u @ u.T
        k = u.shape[0]
        ref.append(1 - (cos.sum() - k) / (k * (k - 1)))
    assert n.item() == 2 and s.item() == pytest.approx(sum(ref).item(), rel=1e-12)


def test_final_collector_runs_at_the_last_step_only_when_its_tier_is_off():
    class Snapshot(Mean):
        tier, window, final = "advanced", False, True
        metrics = (MetricSpec("snap/mean", "1", "mean of x on the last step"),)

        def compute(self):
            return {"snap/mean": Fm.ratio(self.total, self.count)}

    reg = Registry("toy", {"x": Need(("batch",), "numbers")})
    reg.register(Snapshot)
    for advanced, logged_at in ((False, [5]), (True, [2, 4, 5])):
        runner = MetricRunner(reg.build({"advanced": advanced}, {}), {"advanced": 2}, last_step=5)
        assert runner.collectors[0].final_only == (not advanced)
        seen = []
        for step in range(1, 6):
            runner.update(step, batch=torch.tensor([float(step)]))
            if runner.due(step):
                seen += [step] if "snap/mean" in runner.compute(step) else []
        assert seen == logged_at
    assert Registry("toy", {"x": Need(("batch",), "")}).build({}, {}) == []
