"""The training loop every task shares: micro-batches -> backward -> clip -> optimizer -> LR -> EMA, with the
cadences for evaluation, logging, saving and stopping, and the checkpoints and fault handling around them.

    engine = Engine(cfg, MaskedDiffusionTask)      # or any ``tdlm.engine.task.Task`` subclass
    result = engine.fit()
    engine.close()

The loss of a step is the sum of the task's per-target losses divided by the *global* number of targets of that
optimizer step (all processes and micro-steps), so it does not depend on how the batch is split. Noise is drawn
for the global batch from a generator keyed by the step (``tdlm.engine.randomness``). SIGTERM (preemption) makes
every process stop after the same step and write a checkpoint; a NaN/Inf loss or gradient norm raises
``TrainingStopped`` naming the first bad step, before anything poisoned is saved.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import torch

from tdlm.engine.checkpoint import (check_run_dir, list_checkpoints, prepare_run_dir, prune_checkpoints, read_state,
                                    resolve_resume, save_checkpoint)
from tdlm.engine.config import ConfigError
from tdlm.engine.faults import NonFiniteWatch, StopSignal, TrainingStopped
from tdlm.engine.launch import make_accelerator, quiet_libraries
from tdlm.engine.optim import build_optimizer, lr_lambda, make_ema
from tdlm.engine.randomness import global_rows, keyed_generator
from tdlm.engine.state import LoopState, check_layout
from tdlm.metrics.core import GradView, StepInfo
from tdlm.metrics.sinks import run_sinks


def device_time(device) -> float:
    """Host time after ``device`` finished its queued work, so a timer measures the work, not its launch (CUDA is
    asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Engine:
    def __init__(self, cfg, make_task):
        """``make_task(cfg, accelerator)`` builds the task (its model and data) once the launch has checked out."""
        quiet_libraries()
        self.cfg, t = cfg, cfg.trainer
        self.accelerator = acc = make_accelerator(cfg)
        self.run_dir, self.ckpt_root = cfg.run_dir, cfg.run_dir / "checkpoints"
        replace_old_run = check_run_dir(self.run_dir, self.ckpt_root, t)
        torch.manual_seed(t.seed)
        self.task = task = make_task(cfg, acc)
        resume_from = resolve_resume(t.resume, self.ckpt_root)
        if resume_from is not None:
            check_layout(read_state(resume_from).get("layout", {}), self.layout(), resume_from)
            task.check_resume(resume_from, read_state(resume_from))
        elif t.resume:
            acc.print(f"trainer.resume={t.resume}: no checkpoint in {self.ckpt_root}; starting from step 0")
        self._prepare_training()
        self._open_run(resume_from, replace_old_run)

    def _prepare_training(self) -> None:
        """Optimizer, LR schedule, training loader, Accelerate's wrapping, compilation, EMA and the loop state; the
        stateful ones registered for checkpointing in a fixed order (a resume loads them by position)."""
        acc, t, task = self.accelerator, self.cfg.trainer, self.task
        optimizer = build_optimizer(task.model, self.cfg.optim, task.no_decay)
        train_dl = torch.utils.data.DataLoader(
            task.train_set, batch_size=t.micro_batch_size, shuffle=task.train_sampler is None,
            sampler=task.train_sampler, drop_last=True, collate_fn=task.collate_fn,
            num_workers=t.num_workers, pin_memory=acc.device.type == "cuda",
            generator=torch.Generator().manual_seed(t.seed))
        self.model, self.optimizer, self.train_dl = acc.prepare(task.model, optimizer, train_dl)
        if len(self.train_dl) < t.grad_accum_steps:
            raise ConfigError(f"trainer.micro_batch_size: the training split has only {len(self.train_dl)} batches "
                              f"of {t.micro_batch_size} per process, fewer than grad_accum_steps={t.grad_accum_steps}")
        if t.max_epochs:  # the step count the epochs make; config.yaml records it (tdlm.engine.checkpoint)
            t.max_steps = max(1, round(t.max_epochs * len(self.train_dl) / t.grad_accum_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg.optim, t.max_steps))
        task.prepare(acc)
        acc.register_for_checkpointing(self.scheduler)
        self.raw_model = acc.unwrap_model(self.model)
        # The compiled module shares the parameters; evaluation, metrics' extra passes and sampling use the plain
        # one (other shapes and flags would each cost a recompile), checkpoints save the plain one (same keys).
        self.train_model = self.model
        if t.compile:
            if self.cfg.metrics.tiers.research.enabled:
                # research collectors take extra backward passes through the retained graph, which a compiled
                # backward that donates (reuses) its saved buffers refuses
                torch._functorch.config.donated_buffer = False
            self.train_model = torch.compile(self.model)
        self.ema = None
        if t.ema_decay > 0:
            self.ema = make_ema(self.raw_model, t.ema_decay)
            acc.register_for_checkpointing(self.ema)
        self.state = LoopState()
        acc.register_for_checkpointing(self.state)

    def _open_run(self, resume_from: Path | None, replace_old_run: bool) -> None:
        """Load the checkpoint to resume from, (re)create the run directory, open the sinks and the metrics."""
        acc = self.accelerator
        metric_state = {}
        if resume_from is not None:
            acc.load_state(str(resume_from))
            metric_state = read_state(resume_from).get("metrics", {})
            acc.print(f"resumed from {resume_from} at step {self.state.step}")
        if self.ema is not None:
            self.ema.module.eval()  # evaluation and samples: never dropout or a random CFG drop
        prepare_run_dir(acc, self.cfg, replace_old_run)
        self.sinks = []
        if acc.is_main_process:
            self.task.export(self.run_dir)
            self.sinks, self.state.wandb_id = run_sinks(self.cfg, self.state.step, self.state.wandb_id,
                                                        self.task.metric_specs())
        # Every process computes (collectors sync sums across processes); only the main one has sinks.
        self.metrics = self.task.build_metrics(self.sinks, acc.is_main_process)
        if resume_from is not None:
            self.metrics.load_state_dict(metric_state, rank=acc.process_index)

    def layout(self) -> dict:
        """What the saved data position and RNG states mean; a resume must keep it to be exact."""
        return {"trainer.micro_batch_size": self.cfg.trainer.micro_batch_size, **self.task.layout(),
                "num_processes": self.accelerator.num_processes}

    # -------------------------------------------------------------------------------------------- loop
    def fit(self, stop_at: int | None = None) -> dict:
        """Run to ``trainer.max_steps`` (or stop after ``stop_at`` steps, as an interruption would). A SIGTERM run
        returns with ``self.preempted`` set, after a checkpoint."""
        self._stop, self._watch, self.preempted = StopSignal().install(), NonFiniteWatch(), False
        try:
            return self._fit(stop_at)
        finally:
            self._stop.uninstall()

    def _fit(self, stop_at: int | None) -> dict:
        t, state = self.cfg.trainer, self.state
        end = min(t.max_steps, stop_at or t.max_steps)
        bar = None
        if self.accelerator.is_main_process and t.progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=t.max_steps, initial=state.step, desc="train", dynamic_ncols=True)
        start_time, start_step, last = time.perf_counter(), state.step, {}
        self.model.train()
        while state.step < end:
            step = state.step + 1
            epoch = state.epoch
            self.optimizer_step(step)
            logs = self._evaluate_and_log(step, epoch_ended=bool(t.max_epochs) and state.epoch > epoch)
            last.update(logs)
            if bar is not None:
                bar.update(1)
                if "train/loss" in logs:
                    bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
            saved = self._save_if_due(step, logs)
            if self._stop.should_stop():  # the same step on every process
                if not saved:
                    self.save()
                self.preempted = True
                break
        if bar is not None:
            bar.close()
        summary = {"summary/training_time_hours": (time.perf_counter() - start_time) / 3600,
                   "summary/total_steps": state.step, "summary/final_loss": last.get("train/loss", math.nan),
                   "summary/best_val_loss": state.best_val, "summary/steps_this_session": state.step - start_step,
                   **({"summary/flops": self._flops(state.step)} if self.task.flops_per_unit else {}),
                   **self.task.summary(state.best_val)}
        if state.step == t.max_steps:  # an interrupted run is not over: its summary comes when it is
            self.log(summary)
        return {**last, **summary}

    def optimizer_step(self, step: int) -> None:
        """One optimizer step over ``trainer.grad_accum_steps`` micro-batches, then the LR and EMA updates."""
        acc, t, task = self.accelerator, self.cfg.trainer, self.task
        accum, world, B = t.grad_accum_steps, acc.num_processes, t.micro_batch_size
        t0 = self._clock()
        batches = self._next_batches(accum)
        t1 = self._clock()
        task.begin_step(step)
        noise = task.draw_noise(keyed_generator(t.seed, step), accum * world * B)
        local = sum(task.num_targets(b) for b in batches).double()
        # One tensor all-reduce, no host sync: the global target count and the processes' SIGTERM votes.
        n_global, stop_votes = acc.reduce(torch.stack([local, self._stop.flag(local.device)]), "sum")
        self._stop.push(stop_votes)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        grad_norm, step_loss = None, torch.zeros((), dtype=torch.float64, device=acc.device)
        for m, batch in enumerate(batches):
            rows = global_rows(m, acc.process_index, world, B)
            with acc.accumulate(self.model):
                out = task.loss(self.train_model, batch, tuple(x[rows] for x in noise))
                # before backward: research collectors may take extra backward passes through the graph
                self.metrics.update(step, batch=out.batch, loss=out, model=self.raw_model)
                # x world: DDP averages gradients over processes; x accum: accelerate divides by accum.
                acc.backward(out.loss_sum * (world * accum) / n_global)
                if acc.sync_gradients:
                    self.metrics.update(step, grads=GradView(self.raw_model, lr))
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or math.inf)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            step_loss += out.loss_sum.detach().double()
        self._watch.update(step, step_loss, grad_norm)
        self.scheduler.step()
        t2 = self._clock()
        if self.ema is not None:
            self.ema.update_parameters(self.raw_model)
        self.state.step = step
        t3 = self._clock()
        info = StepInfo(grad_norm, lr, accum * world * B * task.units_per_row, t3 - t0, self.state.epoch,
                        self.raw_model, data_seconds=t1 - t0, update_seconds=t2 - t1, flops=self._flops(step))
        sample_from = self.ema.module if self.ema is not None else self.raw_model
        self.metrics.update(step, step=info, **task.step_sources(info, sample_from))

    def _flops(self, steps: int) -> float:
        """Model training FLOPs of ``steps`` optimizer steps: every step processes the same global batch."""
        t = self.cfg.trainer
        units = t.grad_accum_steps * self.accelerator.num_processes * t.micro_batch_size * self.task.units_per_row
        return float(steps * units * self.task.flops_per_unit)

    def _clock(self) -> float:
        """Host time; after the device's queued work when the task times phases."""
        return device_time(self.accelerator.device) if self.task.synchronized_timing else time.perf_counter()

    def _next_batches(self, n: int) -> list:
        """``n`` micro-batches, continuing the epoch at the saved cursor; a new epoch reshuffles (set_epoch). The
        epoch counter moves on as soon as an epoch's last batch is taken, so a step that ends an epoch says so."""
        out, state = [], self.state
        while len(out) < n:
            if not hasattr(self, "_iter"):
                self.train_dl.set_epoch(state.epoch)
                if hasattr(self.task.train_set, "set_epoch"):  # datasets that draw per epoch (FSDiT supports)
                    self.task.train_set.set_epoch(state.epoch)
                dl = self.train_dl
                if state.batches_in_epoch:
                    dl = self.accelerator.skip_first_batches(self.train_dl, state.batches_in_epoch)
                self._iter = iter(dl)
            try:
                out.append(next(self._iter))
                state.batches_in_epoch += 1
                if state.batches_in_epoch < len(self.train_dl):
                    continue
            except StopIteration:  # a cursor saved at an epoch's end by an earlier version
                pass
            del self._iter
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        return out

    def _evaluate_and_log(self, step: int, epoch_ended: bool = False) -> dict:
        """Evaluate on the evaluation cadence (whatever the metric tiers) and at epoch ends when training by
        epochs, log what is due, stop on bad values."""
        t, state = self.cfg.trainer, self.state
        evaluate = step % t.eval_every_n_steps == 0 or step == t.max_steps or epoch_ended
        if evaluate:
            was_training = self.model.training
            self.model.eval()
            try:
                val = self.task.evaluate(self.model, self.ema.module if self.ema is not None else None, step)
            finally:
                self.model.train(was_training)
            self.metrics.update(step, val=val)
        # an evaluation off the logging cadence (an epoch end) is logged at its own step, with train/epoch
        logs = self.metrics.compute(step, extra=evaluate) if self.metrics.due(step) or evaluate else {}
        if "val/loss" in logs:
            state.history.setdefault("val_loss", []).append([step, state.epoch, logs["val/loss"]])
            if epoch_ended:
                logs["train/epoch"] = float(state.epoch)  # completed passes, beside the epoch-end validation
        if logs:
            self.log(logs)  # the nonfinite_loss health rule stops here when the logged loss is NaN/Inf
            self._check_finite()  # ... and this, when a step between two logs was
        return logs

    def _save_if_due(self, step: int, logs: dict) -> bool:
        """The best checkpoint (lowest val/loss) is always on disk; otherwise save on the cadence and at the end."""
        t, state = self.cfg.trainer, self.state
        if "val/loss" in logs and logs["val/loss"] < state.best_val:
            state.best_val, state.best_ckpt = logs["val/loss"], f"step_{step:07d}"
            self.save()
            return True
        if step % t.save_every_n_steps == 0 or step == t.max_steps:
            self.save()
            return True
        return False

    def _check_finite(self):
        """Collective. Raise if a step since the last check had a NaN/Inf loss or gradient norm on any process."""
        bad = self._watch.first_bad_step(self.accelerator) if hasattr(self, "_watch") else None
        if bad is not None:
            message = f"non-finite loss or gradient norm at step {bad}; stopped at step {self.state.step}"
            self._write_stopped("nonfinite_step", message, {"first_bad_step": bad})
            raise TrainingStopped(f"{message} without saving the poisoned state (last good checkpoint: "
                                  f"{self.latest_checkpoint_name()})")

    def _write_stopped(self, rule: str, message: str, metrics: dict) -> None:
        """``stopped.json`` in the run directory: what stopped training, where, and the last good checkpoint."""
        if self.accelerator.is_main_process:
            (self.run_dir / "stopped.json").write_text(json.dumps(
                {"step": self.state.step, "rule": rule, "message": message,
                 "last_checkpoint": self.latest_checkpoint_name(),
                 "metrics": {k: str(v) for k, v in metrics.items()}}, indent=1))

    def latest_checkpoint_name(self) -> str:
        ckpts = list_checkpoints(self.ckpt_root)
        return ckpts[-1].name if ckpts else "none"

    def log(self, metrics: dict):
        """Health rules, then every sink; a rule that stops training (NaN/Inf loss) writes ``stopped.json`` (what
        fired, where, the last good checkpoint) and raises ``TrainingStopped``."""
        stops = self.metrics.log(self.state.step, metrics)
        if stops:
            rule, message = stops[0]
            self._write_stopped(rule.name, message, metrics)
            raise TrainingStopped(f"{message}; stopping without saving the poisoned state (last good "
                                  f"checkpoint: {self.latest_checkpoint_name()})")

    # -------------------------------------------------------------------------------------------- save, close
    def save(self):
        """Collective: checkpoint the current step (never a state that followed a NaN/Inf step), export the EMA
        weights (or the raw ones) under ``model/``, and prune to ``trainer.keep_last`` plus the best."""
        self._check_finite()
        state = {**self.state.state_dict(), **self.task.state(), "world_size": self.accelerator.num_processes,
                 "layout": self.layout(), "metrics": self.metrics.state_dict()}
        position = getattr(self.task.train_sampler, "position", None)
        if position is not None:
            state["data_position"] = position(self.state.epoch, self.state.batches_in_epoch)
        export = self.ema.module if self.ema is not None else self.model
        save_checkpoint(self.accelerator, self.ckpt_root, self.state.step, state, export, self.task.export,
                        self.cfg.trainer.min_free_disk_mb)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.ckpt_root, self.cfg.trainer.keep_last, self.state.best_ckpt)

    def inference_model(self) -> torch.nn.Module:
        """The weights to sample from: the EMA or the raw model, unwrapped; under ZeRO-3 (sharded parameters)
        the latest checkpoint's exported model."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            path = self.ckpt_root / self.latest_checkpoint_name() / "model"
            return self.task.load_export(Path(path)).to(self.accelerator.device).eval()
        return self.accelerator.unwrap_model(self.ema.module if self.ema is not None else self.model).eval()

    def close(self):
        for sink in self.sinks:
            sink.close()
        self.sinks.clear()
        acc = self.accelerator
        if acc.state.deepspeed_plugin is not None:
            acc.free_memory()  # DeepSpeed's engine.destroy() needs the process group that end_training() destroys
        acc.end_training()
        # Two-process gloo runs abort at exit about 1 in 6 unless the prepared objects are dropped first.
        self.task.close()
        for name in ("model", "train_model", "raw_model", "optimizer", "train_dl", "_iter"):
            self.__dict__.pop(name, None)
        acc.free_memory()
        gc.collect()
