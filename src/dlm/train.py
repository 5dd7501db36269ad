"""The training loop. It never asks which process or objective is in use: the family
turns a batch into a loss, the loop does the rest (accumulation, clipping, AdamW with
warm-up + cosine decay, EMA, logging, atomic checkpoints, exact resume, clean stops)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dlm.checkpoint import (SHARDS, begin_checkpoint, checkpoint_shards, commit_checkpoint, create_run_dir,
                            load_checkpoint, load_weights, remove_partial_checkpoints, run_data_identity,
                            save_checkpoint)
from dlm.config import RunConfig
from dlm.data import BlockLoader, TokenData, load_tokenizer, prepare_data
from dlm.data.corpora import check_data_identity
from dlm.device import autocast, generator, resolve_device
from dlm.distributed import Dist, init_distributed
from dlm.errors import DlmError
from dlm.families import FAMILIES, Family
from dlm.flops import flops_per_token, mfu, peak_tflops
from dlm.metrics import trim_metrics
from dlm.runlock import run_lock


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


def check_config(cfg: RunConfig) -> None:
    """Every setting in range and the family's components resolved (raises DlmError)."""
    from dlm.config import finalize

    finalize(cfg)


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay,
    min(decay, (1 + n) / (10 + n)), so short runs are not dominated by the initial weights.

    Built from the wrapped model, it is laid out like the weights: under FSDP2 each rank
    keeps the EMA of its own shards (DTensors), and the update is elementwise, shard by shard."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)


def accumulate_gradients(family: Family, net: torch.nn.Module, model: torch.nn.Module, batches, noise: torch.Generator,
                         dist: Dist, device: torch.device) -> torch.Tensor:
    """Gradients of one optimiser step over the global micro-batches ``batches``; returns its loss
    as a 0-dim float64 tensor (reading it is a host synchronisation: the loop does so only
    on the steps it logs or checkpoints).

    Each rank scores its rows of every micro-batch; the gradient is that of
    Σ nats / Σ scored tokens over the whole step — every micro-batch and every rank — so
    one process with batch 2b and two with batch b take the same step, and a sequence with
    few scored tokens weighs no more than its tokens do.
    """
    mine = slice(dist.rank, None, dist.world)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # Σ nats, Σ scored tokens
    batches = list(batches)
    for micro, batch in enumerate(batches):
        sync = micro == len(batches) - 1 or not dist.enabled  # DDP / FSDP2: reduce grads once per step
        with contextlib.nullcontext() if sync else dist.no_sync(net):
            with autocast(device):
                scored = family.loss(net, batch, noise, mine)
            scored.nats.sum().backward()  # each backward sums grads: normalised once below
        totals += torch.stack([scored.nats.detach().sum().double(), scored.count.sum().double()])
    # DDP's all-reduce and FSDP2's reduce-scatter averaged the gradients over ranks, hence world / count
    totals = dist.all_reduce_sum(totals)
    count = totals[1].clamp_min(1.0)
    scale = (dist.world / count).float()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    return totals[0] / count


def check_compile(device: torch.device) -> float:
    """``train.compile``: make sure inductor can build kernels on ``device`` before any work
    (raises DlmError); returns the seconds it took (inductor's import and a one-kernel build).

    A C++ compiler is looked for first (inductor's CPU kernels are C++): a warm kernel cache
    would let the probe pass without one, and the model's own kernels would then fail mid-run.
    """
    t0 = time.perf_counter()
    try:
        if device.type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        probe = torch.compile(lambda x: x * 2 + 1, dynamic=False)
        probe(torch.ones(4, device=device))
    except Exception as e:  # any failure to build: inductor raises many kinds
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        need = "a C++ compiler (or set CXX)" if device.type == "cpu" else "Triton and a C compiler"
        raise DlmError(f"--compile: torch.compile cannot build kernels for {device.type} on this machine "
                       f"({first.strip()}); install {need}, or train without --compile") from None
    return time.perf_counter() - t0


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each transformer block in place (``nn.Module.compile``).

    Only the blocks: their shapes are fixed during training, while the output layer runs at
    a varying number of scored positions (``score_mask``, ``head_fn`` chunks) that would
    recompile. All blocks share one compiled graph (inductor treats the weights as inputs),
    so compile time does not grow with depth. In place, the parameter names stay plain (no
    ``_orig_mod.``): checkpoints, the EMA and the optimiser state are those of an eager run,
    and FSDP2 then shards each compiled block as torchtitan does. A model without blocks
    is compiled whole.
    """
    blocks = getattr(model, "blocks", None)
    for module in blocks if blocks is not None else (model,):
        module.compile()


def load_init_weights(model: torch.nn.Module, source: Path) -> None:
    """Fine-tuning starts from ``source``'s newest checkpoint: its EMA weights when it kept
    an EMA (what ``dlm eval`` and ``dlm sample`` of that run use), else its raw weights."""
    ckpt = load_checkpoint(source, with_trainer=False)
    load_weights(model, ckpt.ema if ckpt.ema is not None else ckpt.model, source)


def lr_at(cfg: RunConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from lr to lr·min_lr_ratio."""
    t = cfg.train
    warm = min(1.0, (step + 1) / max(1, t.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * warm * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


class _StopFlag:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, exit. Second: stop at once."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing this step and writing a checkpoint (again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def step_seed(seed: int, step: int) -> int:
    """The seed of the noise (times, masks) of one optimiser step.

    Deriving it from (seed, step) instead of carrying a generator along makes a resumed run
    draw exactly the noise the uninterrupted run drew. Every rank draws the noise of the
    whole global batch from it and keeps its own rows, so the noise (and so the run) does not
    depend on the number of processes. (dlm-run/1 seeded with (seed, rank, step); rank 0's
    seeds are unchanged.)
    """
    return int(hashlib.sha1(f"{seed}/0/{step}".encode()).hexdigest()[:15], 16)


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard, when installed) of one run; a no-op when disabled
    (every rank but 0). Lines past ``keep_until`` — a crashed run's — are dropped first."""

    def __init__(self, run_dir: Path, keep_until: int, enabled: bool = True):
        self.file = self.tb = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        trim_metrics(path, keep_until)  # a crashed run's lines past the checkpoint, and a torn last line
        self.file = open(path, "a", encoding="utf-8")
        try:  # never required
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:
            self.tb = None

    def write(self, rec: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key, value in rec.items():
                if key != "step":
                    self.tb.add_scalar(key, value, rec["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def train(
    cfg: RunConfig,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    data: TokenData | None = None,
) -> TrainResult:
    """Train ``cfg`` into run folder ``out`` (or continue the run there with ``resume``).

    Under torchrun every rank calls this; rank 0 alone writes the run folder.
    """
    check_config(cfg)
    device = resolve_device(cfg.train.device)
    dist = init_distributed(device, cfg.train.parallel)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        probe_s = check_compile(device) if cfg.train.compile else 0.0  # before any work
        # one writer per run folder: a second `--resume` of a run in use stops with one line
        with run_lock(Path(out)) if dist.is_main else contextlib.nullcontext():
            return _train(cfg, Path(out), resume, progress and dist.is_main, data, device, dist, probe_s)
    finally:
        dist.shutdown()


def _train(cfg: RunConfig, out: Path, resume: bool, progress: bool, data: TokenData | None,
           device: torch.device, dist: Dist, probe_s: float = 0.0) -> TrainResult:
    torch.manual_seed(cfg.train.seed)
    init_from = Path(cfg.train.init_from) if cfg.train.init_from and not resume else None
    if data is None:
        tokenizer = None
        if resume:
            tokenizer = load_tokenizer(out / "tokenizer.json")
        elif init_from is not None:
            tokenizer = load_tokenizer(init_from / "tokenizer.json")
        if not dist.is_main:
            dist.barrier()  # rank 0 tokenises (and trains the BPE) once; the others read its cache
        data = prepare_data(cfg.data, tokenizer)
        if dist.is_main:
            dist.barrier()
    train_rows, train_clean = data.rows("train", cfg.data.seq_len)
    tok = data.tokenizer
    family: Family = FAMILIES.get(cfg.family)(cfg, tok.vocab_size, tok.eos_id)
    model = family.build_model()
    if init_from is not None:  # fine-tuning: the source run's weights (its EMA when it has one), a fresh optimiser
        load_init_weights(model, init_from)
    model = model.to(device)
    params = model.num_params()
    per_token, peak = flops_per_token(model, cfg.data.seq_len), peak_tflops(device, cfg.train.peak_tflops)

    ckpt = None
    if resume:
        if dist.is_main:
            remove_partial_checkpoints(out)  # a SIGKILLed writer's leftovers
        check_data_identity(run_data_identity(out), data.identity, cfg.data.data)
        ckpt = load_checkpoint(out)
        shards = checkpoint_shards(out)  # the optimiser state of a run on several processes
        load_weights(model, ckpt.model, out)  # whole weights, before the strategy shards them
    if cfg.train.compile:  # before the strategy wraps it: DDP and FSDP2 then see compiled blocks
        compile_blocks(model)
    # DDP, FSDP2 or (one process) the model itself; FSDP2 shards `model` in place, so the
    # optimiser and the EMA below are built over its shards
    net = dist.wrap(model)

    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.lr,
        betas=(cfg.train.beta1, cfg.train.beta2),
        fused=device.type == "cuda",
    )
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    # one global batch of batch_size × world blocks per micro-step; rank r takes rows r::world
    loader = BlockLoader(train_rows, cfg.train.batch_size * dist.world, cfg.train.seed, clean=train_clean)

    step, elapsed_before, tokens = 0, 0.0, 0
    # the steps that compiled (the first of each compiled session): their time and tokens stay
    # out of tokens/s; summed over the sessions of a resumed run
    untimed_s, untimed_tokens = 0.0, 0
    if ckpt is not None:
        if ema is not None and ckpt.ema is not None:
            ema.shadow = dist.shard_like(ckpt.ema, ema.shadow)
        st = ckpt.trainer
        try:
            # whatever number of processes wrote it: DCP reshards the sharded state, a
            # single process's whole state is split here
            if st.get("optimizer") is not None:
                dist.load_full_optimizer_state(model, opt, st["optimizer"])
            elif shards is not None:
                dist.load_optimizer_shards(model, opt, shards)
            else:
                raise KeyError("optimizer")
            loader.load_state_dict(st["loader"])
            torch.set_rng_state(st["torch_rng"])
            if device.type == "cuda" and st.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(st["cuda_rng"], device)
        except (KeyError, ValueError, RuntimeError) as e:
            raise DlmError(f"checkpoint in {out} does not fit this run: {e}") from None
        step, elapsed_before, tokens = ckpt.step, float(st["elapsed_s"]), int(st["tokens"])
        untimed_s, untimed_tokens = float(st.get("untimed_s", 0.0)), int(st.get("untimed_tokens", 0))
        if step >= cfg.train.steps:
            raise DlmError(f"{out} already finished {step} steps; pass a larger --steps to train further")
    elif dist.is_main:
        create_run_dir(out, cfg, tok, data_identity=data.identity)

    def trainer_state() -> dict[str, Any]:
        return {
            # several processes: the optimiser state goes, sharded, into the checkpoint's dcp/ folder
            "optimizer": None if dist.enabled else opt.state_dict(),
            "loader": loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "elapsed_s": elapsed_before + (time.perf_counter() - t_start),
            "tokens": tokens,
            "untimed_s": untimed_s,
            "untimed_tokens": untimed_tokens,
        }

    def checkpoint() -> None:
        if not dist.enabled:
            save_checkpoint(out, step, model, ema.shadow if ema else None, trainer_state(), cfg.train.keep_checkpoints)
            return
        # several processes: whole weights and EMA gathered to rank 0 (one safetensors file
        # each, loadable by one process); the optimiser state written by every rank, sharded
        weights = dist.full_state(model.state_dict())
        ema_weights = dist.full_state(ema.shadow) if ema else None
        tmp = dist.broadcast_object(begin_checkpoint(out, step) if dist.is_main else None)
        if tmp is not None:
            dist.save_sharded({"optimizer": dist.optimizer_state(model, opt)}, tmp / SHARDS)
        dist.barrier()
        if dist.is_main:
            commit_checkpoint(out, step, tmp, weights, ema_weights, trainer_state(), cfg.train.keep_checkpoints)
        dist.barrier()

    metrics = MetricsLog(out, step, enabled=dist.is_main)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len * dist.world
    budget = cfg.train.time_budget_s
    bar = tqdm(
        total=cfg.train.steps, initial=step, disable=not progress, unit="step", file=sys.stderr,
        desc=f"{cfg.family} {params / 1e6:.1f}M", dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    window_loss, window_steps, window_t, last_loss = 0.0, 0, t_start, float("nan")
    window_tokens = 0  # tokens trained since window_t (the compiling step's not counted)
    # compiling: the next step is the session's first compiled one; unlogged: its compile_s is
    # not yet in metrics.jsonl
    compiling, unlogged, compile_s = cfg.train.compile, False, 0.0
    diverged = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss since the last check
    checked = step  # the last step whose losses were all seen finite
    last_step_loss: torch.Tensor | None = None

    def check_finite() -> None:
        """Stop before a diverged model is logged or saved (a host synchronisation)."""
        nonlocal checked
        if bool(diverged):
            where = "the last checkpoint is intact" if checked > 0 or resume else "no checkpoint was written"
            raise DlmError(f"training diverged: the loss became non-finite between steps {checked + 1} and {step}; "
                           f"{where} (try a lower train.lr)")
        checked = step

    stopped_by: str | None = None
    model.train()
    try:
        with _StopFlag() as stop:
            while step < cfg.train.steps:
                elapsed = elapsed_before + time.perf_counter() - t_start
                if budget > 0:  # every rank must use the same learning rate
                    elapsed = dist.all_reduce([elapsed], op="max")[0]
                prog = max(step / cfg.train.steps, elapsed / budget if budget > 0 else 0.0)
                lr = lr_at(cfg, step, prog)
                for group in opt.param_groups:
                    group["lr"] = lr
                t_step = time.perf_counter()
                noise = generator(device, step_seed(cfg.train.seed, step))
                batches = (loader.next_batch().to(device, non_blocking=True) for _ in range(cfg.train.grad_accum))
                step_loss = accumulate_gradients(family, net, model, batches, noise, dist, device)
                diverged |= ~torch.isfinite(step_loss)  # no host synchronisation on steps that do not log
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
                )
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tokens += tokens_per_step
                if ema is not None:
                    ema.update(model, step)
                window_loss = window_loss + step_loss
                window_steps += 1
                window_tokens += tokens_per_step
                last_step_loss = step_loss
                bar.update(1)
                if compiling:  # this step built the kernels: compile time, reported apart, not throughput
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # the step's kernels too, not only their launch
                    window_t = time.perf_counter()
                    untimed_s, untimed_tokens = untimed_s + window_t - t_step, untimed_tokens + tokens_per_step
                    compile_s, window_tokens, unlogged = probe_s + window_t - t_step, 0, True
                now = time.perf_counter()
                logging = step % cfg.train.log_every == 0 or step == cfg.train.steps
                if logging:
                    check_finite()
                    rec = {
                        "step": step,
                        "loss": float(window_loss) / window_steps,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens": tokens,
                        "elapsed_s": elapsed_before + now - t_start,
                    }
                    if unlogged:
                        rec["compile_s"], unlogged = compile_s, False
                    if window_tokens:  # none when the window held only the compiling step
                        tps = window_tokens / max(now - window_t, 1e-9)
                        rec.update({"tokens_per_s": tps, **({"mfu": mfu(tps, per_token, peak)} if peak else {})})
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}",
                                        **({"mfu": f"{rec['mfu']:.1%}"} if peak else {}), refresh=False)
                    metrics.write(rec)
                    window_loss, window_steps, window_tokens, window_t = 0.0, 0, 0, now
                compiling = False
                if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
                    check_finite()
                    checkpoint()
                # stop together: a signal on any rank, or the time budget, stops every rank (agreed
                # on logging steps when there are several processes: one collective there, none between)
                signalled = stop.signal is not None
                over_budget = budget > 0 and elapsed_before + now - t_start >= budget
                if dist.enabled:
                    if not logging:
                        continue
                    signalled, over_budget = (v > 0 for v in dist.all_reduce([float(signalled), float(over_budget)],
                                                                                op="max"))
                if signalled:
                    stopped_by = stop.signal or "SIGTERM"
                    break
                if over_budget:
                    break
            check_finite()
            if last_step_loss is not None:
                last_loss = float(last_step_loss)
            checkpoint()
    finally:
        bar.close()
        metrics.close()
    elapsed = elapsed_before + time.perf_counter() - t_start
    if tokens <= untimed_tokens:  # only compiling steps: nothing else to time them by
        untimed_s, untimed_tokens = 0.0, 0
    return TrainResult(
        step=step,
        elapsed_s=elapsed,
        tokens=tokens,
        tokens_per_s=(tokens - untimed_tokens) / max(elapsed - untimed_s, 1e-9),
        loss=last_loss,
        params=params,
        interrupted=stopped_by,
        compile_s=compile_s,
    )
