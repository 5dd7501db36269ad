"""The loop: :class:`Trainer` sets a run up, then steps, logs, checkpoints and stops."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.backbones.pretrained import save_architecture, with_run_architecture
from dlm.checkpoint import Checkpoint, create_run_dir
from dlm.config import RunConfig
from dlm.data import BlockLoader, TokenData
from dlm.data.loader import PrefetchLoader
from dlm.device import generator
from dlm.distributed import Dist
from dlm.errors import DlmError
from dlm.families import FAMILIES, Family
from dlm.flops import flops_per_token, head_params, peak_tflops
from dlm.trainer.checkpointer import Checkpointer, open_for_resume
from dlm.trainer.compiling import compile_blocks
from dlm.trainer.divergence import DivergenceGuard
from dlm.trainer.ema import EMA
from dlm.trainer.reporting import Reporter
from dlm.trainer.setup import build_optimizer, load_init_weights, prepare_run_data
from dlm.trainer.state import TrainState
from dlm.trainer.step import accumulate_gradients, annealed_attention, lr_at, step_seed
from dlm.trainer.stopping import Stopping
from dlm.trainer.throughput import Throughput


@dataclass
class TrainResult:
    step: int
    elapsed_s: float
    tokens: int
    tokens_per_s: float
    loss: float
    params: int
    interrupted: str | None = None  # the signal's name when a signal stopped the run
    compile_s: float = 0.0  # train.compile: this session's compiler check and first (compiling) step
    steps: int = 0  # train.steps, the steps the run was asked for
    time_budget_ended: bool = False  # train.time_budget_s ran out before train.steps


class Trainer:
    """One session of a run on this rank. Built, it has the data, the model (compiled and
    wrapped by the distributed strategy as ``net``), the optimiser, the EMA, the loader and
    the counters, resumed from the run's checkpoint or in a new run folder; :meth:`train`
    then runs the loop. It never asks which process or objective is in use: the family
    turns a batch into a loss."""

    def __init__(self, cfg: RunConfig, out: Path, resume: bool, progress: bool, data: TokenData | None,
                 device: torch.device, dist: Dist, probe_s: float = 0.0):
        self.cfg, self.out, self.device, self.dist = cfg, out, device, dist
        t = cfg.train
        torch.manual_seed(t.seed)
        init_from = Path(t.init_from) if t.init_from and not resume else None
        self.data = data if data is not None else prepare_run_data(cfg, out, resume, init_from, dist)
        train_rows, train_clean = self.data.rows("train", cfg.data.seq_len)
        self._build_model(init_from, out if resume else init_from)
        ckpt, shards = open_for_resume(out, cfg, self.data, dist, self.model) if resume else (None, None)
        self._wrap()
        self.opt = build_optimizer(self.model, cfg, device)
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        # one global batch of batch_size × world blocks per micro-step; rank r takes rows r::world
        lengths = self.data.lengths("train") if cfg.data.sft_length == "batch" else None
        self.loader = PrefetchLoader(BlockLoader(train_rows, t.batch_size * dist.world, t.seed, clean=train_clean,
                                                 lengths=lengths), pin=device.type == "cuda")  # read ahead in a thread
        self.state = TrainState()
        self.checkpointer = Checkpointer(out, dist, self.model, self.opt, self.ema, self.loader, device,
                                         t.keep_checkpoints)
        if ckpt is not None:
            self._resume(ckpt, shards)
        elif dist.is_main:
            create_run_dir(out, cfg, self.data.tokenizer, data_identity=self.data.identity)
            if cfg.model.pretrained:  # the run keeps the model's architecture: it loads without the folder
                save_architecture(self.family.cfg.model.pretrained, out)
        self.tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len * dist.world
        self.reporter = Reporter(cfg, out, self.state, self.params, enabled=dist.is_main, progress=progress)
        counted = hasattr(self.model, "head_positions")  # the output layer's positions, each rank's own
        self.throughput = Throughput(self.per_token, self.peak, device, compiling=t.compile, probe_s=probe_s,
                                     head_flops=6.0 * head_params(self.model),
                                     head_rows=(lambda: self.model.head_positions * dist.world) if counted else None)
        self.guard = DivergenceGuard(device, self.state.step)
        self.stopping = Stopping(t.steps, t.time_budget_s, dist)

    def _build_model(self, init_from: Path | None, source: Path | None) -> None:
        """The family's model on the device (fine-tuning: the source run's weights, its EMA
        when it has one; a fresh optimiser follows), and what its FLOPs are measured by. A
        pretrained backbone's architecture comes from the run ``source`` (resumed or
        fine-tuned) where it keeps a copy."""
        tok = self.data.tokenizer
        cfg = self.cfg if source is None else with_run_architecture(self.cfg, source)
        self.family: Family = FAMILIES.get(self.cfg.family)(cfg, tok.vocab_size, tok.eos_id)
        model = self.family.build_model()
        if init_from is not None:
            load_init_weights(model, init_from)
        if self.cfg.train.attention_anneal_steps:
            model.anneal_attention(None)  # one line from a backbone that cannot
        self.model = model.to(self.device)
        self.params = self.model.num_params()
        self.per_token = flops_per_token(self.model, self.cfg.data.seq_len)
        self.peak = peak_tflops(self.device, self.cfg.train.peak_tflops)

    def _wrap(self) -> None:
        if self.cfg.train.compile:  # before the strategy wraps it: DDP and FSDP2 then see compiled blocks
            compile_blocks(self.model)
        # DDP, FSDP2 or (one process) the model itself; FSDP2 shards `model` in place, so the
        # optimiser and the EMA are built over its shards
        self.net = self.dist.wrap(self.model)

    def _resume(self, ckpt: Checkpoint, shards: Path | None) -> None:
        self.checkpointer.restore(ckpt, shards, self.state)
        if self.state.step >= self.cfg.train.steps:
            raise DlmError(f"{self.out} already finished {self.state.step} steps; "
                           "pass a larger --steps to train further")

    def train(self) -> TrainResult:
        """Steps until ``train.steps``, the time budget or a signal, then a last checkpoint."""
        self.throughput.start(self.state.start_session())
        self.model.train()
        with self.reporter, self.stopping, contextlib.closing(self.loader):
            while self.stopping.should_continue(self.state.step):
                self.train_step()
                self.after_step(time.perf_counter())
            self.guard.check(self.state.step, self.checkpointer.saved)
            loss = self.reporter.final_loss()
            self.checkpointer.save(self.state)
        return self.result(loss)

    def train_step(self) -> None:
        """One optimiser step over ``train.grad_accum`` micro-batches, and the EMA's."""
        t, state = self.cfg.train, self.state
        lr = lr_at(self.cfg, state.step, self.stopping.progress(state))
        for group in self.opt.param_groups:
            group["lr"] = lr
        t_step = time.perf_counter()
        noise = generator(self.device, step_seed(t.seed, state.step))
        if t.attention_anneal_steps:
            self.model.anneal_attention(annealed_attention(t.seed, state.step, t.attention_anneal_steps,
                                                           self.cfg.data.seq_len))
        batches = (self.loader.next_batch().to(self.device, non_blocking=True) for _ in range(t.grad_accum))
        loss = accumulate_gradients(self.family, self.net, self.model, batches, noise, self.dist, self.device)
        self.guard.observe(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   t.grad_clip if t.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += self.tokens_per_step
        if self.ema is not None:
            self.ema.update(self.model, state.step)
        self.reporter.step_done(loss, lr, grad_norm)
        self.throughput.step_done(t_step, self.tokens_per_step, state)

    def after_step(self, now: float) -> None:
        """Log, checkpoint and decide whether to stop, as the step just taken calls for."""
        t, step = self.cfg.train, self.state.step
        logging = step % t.log_every == 0 or step == t.steps
        if logging:
            self.guard.check(step, self.checkpointer.saved)
            self.reporter.write(self.state, now, self.throughput.fields(now))
        if t.ckpt_every and step % t.ckpt_every == 0:
            self.guard.check(step, self.checkpointer.saved)
            self.checkpointer.save(self.state)
        self.stopping.after_step(self.state, now, logging)

    def result(self, loss: float) -> TrainResult:
        s = self.state
        elapsed = s.elapsed(time.perf_counter())
        return TrainResult(step=s.step, elapsed_s=elapsed, tokens=s.tokens, tokens_per_s=Throughput.overall(s, elapsed),
                           loss=loss, params=self.params, interrupted=self.stopping.stopped_by,
                           compile_s=self.throughput.compile_s, steps=self.cfg.train.steps,
                           time_budget_ended=self.stopping.time_budget_ended)
