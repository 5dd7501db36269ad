"""What a run configuration is: nested dataclasses, one per section, and nothing else.

A run is fully described by one :class:`RunConfig`, written to ``RUN_DIR/config.yaml``.
Reading one (YAML, ``key=value`` overrides, the dlm-run/1 layout) and resolving its
components' settings is :mod:`dlm.config`'s job; this module only says what the sections
hold and their ranges, so the components that read a section (the backbone reads
``model``, the data layer ``data``) depend on nothing above them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dlm.distill.settings import DistillConfig
from dlm.settings import ComponentConfig, setting

POSITIVE = {"lo": 0, "lo_open": True}
SEED_MAX = 2**63 - 1


@dataclass
class ModelConfig:
    """Backbone shape. ``size`` names a preset; any explicit field below overrides it."""

    size: str = "tiny"
    n_layer: int | None = setting(None, lo=1)
    n_head: int | None = setting(None, lo=1)
    d_model: int | None = setting(None, lo=2)
    mlp_ratio: int = setting(4, lo=1)
    cond_dim: int = setting(128, lo=1)  # width of the adaLN time embedding (time-conditioned models only)
    dropout: float = setting(0.0, lo=0, hi=1, hi_open=True)
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~1/3 more compute
    # "hf:FOLDER": a pretrained Hugging Face causal LM as the backbone (dlm.backbones.pretrained; set by
    # --init-from hf:FOLDER or smollm2-135m); "" (default): dlm's own transformer of ``size``
    pretrained: str = ""


@dataclass
class DataConfig:
    data: str = "shakespeare"  # built-in name, local file or folder, or Hugging Face dataset
    tokenizer: str = "bpe"  # char | byte | bpe | gpt2
    vocab_size: int = setting(4096, lo=2)  # bpe only: size of the locally trained byte-level BPE
    seq_len: int = setting(128, lo=2, hi=65536)
    val_fraction: float = setting(0.05, lo=0, hi=0.5, lo_open=True)
    # > 0: train on only the first N tokens of the training split (data-constrained runs, epochs over them)
    max_train_tokens: int = setting(0, lo=0)
    # prompt/response rows: how far the scored end-of-text filling after each response goes.
    # "batch" (LLaDA): each batch is cut to its longest row (prompt, response, one end-of-text),
    # the shorter rows filled to that length; "model": every row filled to seq_len (before this
    # setting existed: run folders without it read as "model", what they were trained with)
    sft_length: str = setting("batch", choices=("batch", "model"))


@dataclass
class TrainConfig:
    steps: int = setting(500, lo=0)  # 0: a run of the initialisation (the pretrained model as it is)
    batch_size: int = setting(32, lo=1)
    grad_accum: int = setting(1, lo=1)  # micro-batches per optimiser step; batch_size is per micro-batch
    lr: float = setting(1e-3, **POSITIVE)
    min_lr_ratio: float = setting(0.1, lo=0, hi=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = setting(50, lo=0)
    weight_decay: float = setting(0.0, lo=0)
    beta1: float = setting(0.9, lo=0, hi=1, hi_open=True)
    beta2: float = setting(0.98, lo=0, hi=1, hi_open=True)
    grad_clip: float = setting(1.0, lo=0)  # 0: no clipping
    ema_decay: float = setting(0.999, lo=0, hi=1, hi_open=True)  # 0 disables the EMA
    seed: int = setting(0, lo=0, hi=SEED_MAX)
    log_every: int = setting(10, lo=1)
    ckpt_every: int = setting(0, lo=0)  # 0: checkpoint only at the end (and on Ctrl-C / SIGTERM)
    keep_checkpoints: int = setting(2, lo=1)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # under torchrun: ddp (whole model on every rank) or fsdp (FSDP2: weights, grads, optimiser and EMA sharded)
    parallel: str = setting("ddp", choices=("ddp", "fsdp"))
    time_budget_s: float = setting(0.0, lo=0)  # > 0: stop after this many seconds, LR schedule follows time
    # diffusion SFT: each row's clean tokens hidden with this probability (the unconditional
    # pass of classifier-free guidance, sampler.guidance, learns from these rows); 0: off
    prompt_dropout: float = setting(0.0, lo=0, hi=1)
    peak_tflops: float = setting(0.0, lo=0)  # the device's bf16 peak for MFU (0: look it up; CPUs: no MFU)
    # > 0: the output layer and the loss run this many sequences at a time under activation
    # checkpointing, so a large vocabulary's (B, L, V) float32 logits never exist at once
    loss_chunk_rows: int = setting(0, lo=0)
    # training with static shapes: a weighted cross-entropy objective (AR's, MDLM's) runs the
    # output layer at every position, weighting the unscored ones by zero, instead of gathering
    # the scored positions (a boolean index: a host synchronisation a micro-step on a GPU, and
    # a shape that changes every step); unset: on CUDA only (on a CPU the gather's saved
    # compute wins)
    static_shapes: bool | None = None
    # a weighted cross-entropy objective (AR's, MDLM's, …) scored by the fused output layer and
    # loss (dlm.objectives.fused: chunks of rows, the gradient formed in the forward, the (N, V)
    # logits never whole; train.loss_chunk_rows then has nothing to chunk); false: the plain head
    fused_head: bool = True
    # torch.compile each transformer block and, with static shapes, the output layer with its
    # loss (inductor); the first step's wall time, compilation included, is reported apart as
    # compile_s and kept out of tokens/s; unset: on CUDA only (on a CPU compiling does not pay
    # for a run of minutes: benchmarks/speed/README.md), recorded as it was resolved
    compile: bool | None = None
    init_from: str | None = None  # fine-tune: start from this run's weights (fresh optimiser); set by --init-from
    # DiffuLLaMA's attention-mask annealing (a pretrained causal LM adapted to diffusion): at step s
    # each query attends causally and to each later key with probability s / N, one random (L, L)
    # mask a step; full attention from step N on; 0: full attention from the start
    attention_anneal_steps: int = setting(0, lo=0)


@dataclass
class EvalConfig:
    mc_samples: int = setting(4, lo=1)  # diffusion: Monte Carlo samples per sequence for the bound
    max_tokens: int = setting(65536, lo=0)  # validation tokens evaluated (0: all)
    batch_size: int = setting(32, lo=1)
    # discrete-time families (d3pm): evaluate every k-th of the T step terms — the exact NELBO
    # of the model that takes T/k steps (what ``sampler.steps`` = T/k samples from), not an
    # estimate of the T-step one; 1: every term
    time_stride: int = setting(1, lo=1)
    # continuous-time bounds: the share of the Monte Carlo times drawn log-uniformly on [1e-5, 1]
    # instead of uniformly, each draw weighted by 1/q(t) so the estimate keeps its expectation
    # (importance sampling of small t); None: the family's default (usdm 0.25, mdlm 0)
    log_t_share: float | None = setting(None, lo=0, hi=1, hi_open=True)


@dataclass
class RunConfig:
    family: str = "mdlm"
    schedule: str = "loglinear"
    time_conditioning: bool | None = None  # None: the family's default
    # the forward process, for families that offer more than one (d3pm: absorbing | uniform);
    # empty for the others, whose process is fixed
    process: ComponentConfig = field(default_factory=ComponentConfig)
    objective: ComponentConfig = field(default_factory=ComponentConfig)
    sampler: ComponentConfig = field(default_factory=ComponentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # a student of ``dlm distill`` (its teacher, rounds, divergence); empty for every other run
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        if self.process.name is None and not self.process.settings:
            del out["process"]  # families with a fixed process: config.yaml as before
        if self.distill.teacher is None:
            del out["distill"]  # not a distillation: config.yaml as before
        return out


def _to_dict(obj: Any) -> Any:
    if isinstance(obj, ComponentConfig):
        return {"name": obj.name, **obj.settings}
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return copy.deepcopy(obj)
