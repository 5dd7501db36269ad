"""A family ties a forward process, an objective, a sampler and a backbone together.

The training loop, the evaluator and the CLI only talk to this interface; they never ask
which family is in use. Adding a family is one new file here and one registry line.

The contract, for every family:

* ``loss(model, batch, generator, rows)`` → :class:`~dlm.objectives.Scored` for the rows
  ``rows`` of the global batch: per-sequence nats and token counts. Noise is drawn for the
  whole global batch and then sliced, so one process with batch 2b and two with batch b
  draw the same noise; the loop normalises by the count of the whole optimiser step.
* ``nll(model, batch, generator, mc_samples)`` → (B,) nats of −log p(target | clean
  context): exact (``is_bound`` False) or an upper bound.
* ``sample(model, given, clean, generator, settings)`` → (tokens, network calls): clean
  positions kept as given, the rest generated.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from functools import partial
from typing import Any, ClassVar

import torch

from dlm.backbones import Backbone, build_backbone, resolve_size
from dlm.batch import Batch
from dlm.schema import RunConfig
from dlm.settings import ComponentConfig, apply_dict, check_settings
from dlm.errors import DlmError
from dlm.objectives import OBJECTIVES, Corrupted, Objective, Scored
from dlm.objectives.base import Predictor
from dlm.objectives.chunked import chunked_score, dense_score
from dlm.objectives.fused import fused_score
from dlm.processes import PROCESSES
from dlm.registry import ProcessView, Registry
from dlm.samplers import SAMPLERS, Sampler, SamplerSettings


def component_settings(registry: Registry, comp: ComponentConfig, default: str, section: str) -> tuple[type, Any]:
    """The component class named in ``comp`` (or ``default``) and its checked ``Settings``."""
    cls = registry.get(comp.name or default)
    settings = cls.Settings()
    if comp.settings and not dataclasses.fields(settings):
        raise DlmError(f"{section} '{comp.name or default}' takes no settings, got {', '.join(comp.settings)}")
    apply_dict(settings, dict(comp.settings), section + ".")
    check_settings(settings, section + ".")
    return cls, settings


class Family(ABC):
    name: ClassVar[str]
    label: ClassVar[str]  # in messages: "unknown masked-diffusion objective 'x'"
    causal: ClassVar[bool] = False
    is_bound: ClassVar[bool] = True  # False: ``nll`` is exact; True: an upper bound (NELBO)
    default_time_conditioning: ClassVar[bool] = False
    # the run config's ``process:`` choices → names in ``dlm.processes.PROCESSES``; empty for a
    # family without a forward process (its components are registered for the "causal" one)
    process_choices: ClassVar[dict[str, str]] = {}
    default_process: ClassVar[str | None] = None
    default_objective: ClassVar[str]
    default_sampler: ClassVar[str] = "ancestral"
    discrete_time: ClassVar[bool] = False  # True: ``eval.time_stride`` applies
    # set for each family class from the above (``__init_subclass__``): the components of its
    # default process, and a registry of its process choices (None when the section must stay empty)
    objectives: ClassVar[ProcessView]
    samplers: ClassVar[ProcessView]
    processes: ClassVar[Registry | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "label", None) is None:
            return  # an abstract intermediate class
        cls.objectives = cls.objectives_for()
        cls.samplers = cls.samplers_for()
        choices = cls.process_choices
        has_settings = any(dataclasses.fields(PROCESSES.get(key).Settings) for key in choices.values())
        if len(choices) > 1 or has_settings:
            cls.processes = Registry(f"{cls.label} process")
            for choice, key in choices.items():
                cls.processes.register(choice)(PROCESSES.get(key))

    @classmethod
    def process_key(cls, cfg: RunConfig | None = None) -> str:
        """The ``PROCESSES`` name of ``cfg``'s process (the default one without ``cfg``);
        "causal" for a family without a forward process."""
        if not cls.process_choices:
            return "causal"
        choice = (cfg.process.name if cfg is not None else None) or cls.default_process
        if choice not in cls.process_choices:
            cls.processes.get(choice)  # one line naming the choices
        return cls.process_choices[choice]

    @classmethod
    def objectives_for(cls, cfg: RunConfig | None = None) -> ProcessView:
        return OBJECTIVES.for_process(cls.process_key(cfg), f"{cls.label} objective")

    @classmethod
    def samplers_for(cls, cfg: RunConfig | None = None) -> ProcessView:
        return SAMPLERS.for_process(cls.process_key(cfg), f"{cls.label} sampler")

    def __init__(self, cfg: RunConfig, vocab_size: int, eos_id: int):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.check_config(cfg)
        self.time_conditioned = self.time_conditioning_of(cfg)
        self.objectives = self.objectives_for(cfg)
        self.samplers = self.samplers_for(cfg)
        cls, settings = component_settings(self.objectives, cfg.objective, self.default_objective, "objective")
        self.objective: Objective = cls(settings)
        self.sampler_cls, self.sampler_settings = component_settings(
            self.samplers, cfg.sampler, self.default_sampler, "sampler")

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Refuse settings this family cannot honour (one line, before any work)."""

    @classmethod
    def time_conditioning_of(cls, cfg: RunConfig) -> bool:
        """Whether a run of ``cfg`` conditions the network on t (``time_conditioning``, else
        the family's default)."""
        tc = cfg.time_conditioning
        return cls.default_time_conditioning if tc is None else tc

    @classmethod
    def bound_draws_time(cls, cfg: RunConfig) -> bool:
        """Whether ``dlm eval``'s figure is a Monte Carlo integral over a random time t (then
        ``eval.log_t_share`` applies)."""
        return False

    @classmethod
    def bound_kind(cls, cfg: RunConfig) -> str:
        """How the figure is computed, in words, for a message that refuses a setting."""
        return "likelihood is exact"

    @classmethod
    def resolve(cls, cfg: RunConfig) -> None:
        """Check the config's process, objective and sampler sections against their components
        and record every setting (defaults included) in it."""
        cls.check_config(cfg)
        resolve_size(cfg.model)  # an unknown size or heads that do not split d_model: before any data is read
        sections = []
        if cls.processes is not None:
            sections.append(("process", cls.processes, cls.default_process))
        elif cfg.process.name is not None or cfg.process.settings:
            raise DlmError(f"family '{cls.name}' has one forward process: drop the process section "
                           f"(process: is for families that offer several, e.g. d3pm)")
        if cfg.eval.log_t_share is not None and not cls.bound_draws_time(cfg):
            raise DlmError(f"eval.log_t_share is for bounds integrated over a time drawn at random (usdm, mdlm with "
                           f"time conditioning); this '{cls.name}' run's {cls.bound_kind(cfg)}: drop it")
        if cfg.eval.time_stride != 1 and not cls.discrete_time:
            raise DlmError(f"eval.time_stride is for discrete-time families (d3pm); '{cls.name}' is "
                           f"continuous-time: drop it")
        # the process first: the objective and sampler are looked up among those that serve it
        sections += [("objective", None, cls.default_objective), ("sampler", None, cls.default_sampler)]
        for section, registry, default in sections:
            if registry is None:
                registry = cls.objectives_for(cfg) if section == "objective" else cls.samplers_for(cfg)
            comp: ComponentConfig = getattr(cfg, section)
            _, settings = component_settings(registry, comp, default, section)
            comp.name = comp.name or default
            comp.settings = dataclasses.asdict(settings)

    @property
    def input_vocab_size(self) -> int:
        return self.vocab_size

    def score(self, objective: Objective, model, c: Corrupted, where: torch.Tensor, process, x, t=None,
              pad=None) -> Scored:
        """``objective`` at ``where``, the network called on inputs ``x`` (and ``t`` when
        time-conditioned) through a :class:`Predictor`; a one-pass objective in training with
        ``train.loss_chunk_rows`` > 0 runs a chunk of sequences at a time; with static shapes
        (``train.static_shapes``) a weighted cross-entropy is scored at every position; with
        ``train.fused_head`` a weighted cross-entropy is scored by the fused head and loss."""
        rows, fused = self.cfg.train.loss_chunk_rows, self.cfg.train.fused_head
        t = t if self.time_conditioned else None
        static = torch.is_grad_enabled() and objective.one_pass() and self.static_shapes(x.device)
        if static or (fused and torch.is_grad_enabled() and objective.one_pass()):
            weighted = objective.token_weights(c, where, process)  # None: not a weighted cross-entropy
            if weighted is not None and static:
                return model(x, t, pad=pad, head_fn=partial(dense_score, weighted, c, rows,
                                                            compiled=self.cfg.train.compile, fused=fused))
            if weighted is not None:
                return model(x, t, score_mask=where, pad=pad,
                             head_fn=partial(fused_score, objective, process, weighted, c, where))
        if rows and torch.is_grad_enabled() and objective.one_pass():
            return model(x, t, score_mask=where, pad=pad,
                         head_fn=partial(chunked_score, objective, c, where, process, rows))
        return objective.score(Predictor(model, x, t, pad, self.time_conditioned), c, where, process)

    def static_shapes(self, device: torch.device) -> bool:
        """Whether training scores with static shapes on ``device`` (``train.static_shapes``)."""
        static = self.cfg.train.static_shapes
        return device.type == "cuda" if static is None else static

    backbone: ClassVar[str] = "transformer"  # the BACKBONES entry the family's network is
    process = None  # the forward process (a diffusion family's); None for the autoregressive one

    def build_model(self) -> Backbone:
        """The network: the family's backbone shaped by the ``model`` section; a process that
        learns something (parameters of its own) becomes its submodule ``process``, so the
        optimiser, checkpoints and ``.to(device)`` take it along."""
        backbone = "pretrained" if self.cfg.model.pretrained else self.backbone  # --init-from hf:FOLDER
        model = build_backbone(backbone, self.cfg.model, vocab_in=self.input_vocab_size, vocab_out=self.vocab_size,
                               causal=self.causal, cond_dim=self.cfg.model.cond_dim if self.time_conditioned else 0)
        if self.process is not None and any(True for _ in self.process.parameters()):
            model.add_module("process", self.process)
        return model

    def bound_info(self) -> dict:
        """What ``dlm eval`` should say about the bound beyond its Monte Carlo samples."""
        return {}

    def set_carry(self, carry: float) -> None:
        """``dlm eval --carry λ``: bound the model whose x_θ carries λ of its mass on the input
        token (uniform-state diffusion, where a network may learn to deny it); refused elsewhere."""
        raise DlmError(f"--carry is for uniform-state runs (usdm); this is a '{self.name}' run")

    def network_steps(self, settings: SamplerSettings, length: int) -> int:
        """The denoising steps a sample of ``length`` tokens takes under ``settings``."""
        return settings.steps

    def sampler_section(self, name: str | None, changes: dict) -> ComponentConfig:
        """The ``sampler:`` section for sampler ``name`` (None: the run's own) with ``changes``
        (what the user set) on top. The run's own sampler keeps its recorded settings; another
        one starts from its own defaults and keeps, of the run's, only the settings every
        sampler of the process shares (steps, temperature, top-k, top-p, guidance): a setting
        of the same name in another sampler may mean something else (the ancestral sampler's
        boolean ``cache`` is not Fast-dLLM's ``cache`` mode)."""
        own = self.cfg.sampler
        settings = dict(own.settings)
        if name is not None and name != own.name:
            shared = {f.name for f in dataclasses.fields(self.samplers.get(name).Settings)} & set(self._shared_settings())
            settings = {k: v for k, v in settings.items() if k in shared}
        return ComponentConfig(name or own.name, {**settings, **changes})

    def _shared_settings(self) -> list[str]:
        """Settings declared by every sampler of this family's process (the common base)."""
        names = None
        for sampler in self.samplers.names():
            fields = {f.name for f in dataclasses.fields(self.samplers.get(sampler).Settings)}
            names = fields if names is None else names & fields
        return sorted(names or ())

    def choose_sampler(self, comp: ComponentConfig) -> SamplerSettings:
        """Use the sampler ``comp`` names, with its checked settings, from now on; returns them."""
        self.sampler_cls, self.sampler_settings = component_settings(self.samplers, comp, self.default_sampler, "sampler")
        return self.sampler_settings

    def sampler(self, settings: SamplerSettings | None = None) -> Sampler:
        """The run's sampler with ``settings`` (default: the run's). Plain ``SamplerSettings``
        (steps, temperature, top-k, top-p) take the rest from the run's sampler settings."""
        if settings is None:
            settings = self.sampler_settings
        elif not isinstance(settings, self.sampler_cls.Settings):
            merged = {**dataclasses.asdict(self.sampler_settings), **dataclasses.asdict(settings)}
            settings = self.sampler_cls.Settings(**merged)
        return self.sampler_cls(settings)

    @abstractmethod
    def loss(self, model: Backbone, batch: Batch, generator: torch.Generator, rows=slice(None)) -> Scored:
        """The objective on rows ``rows`` of the global ``batch``: per-sequence nats and counts."""

    @abstractmethod
    def nll(self, model: Backbone, batch: Batch, generator: torch.Generator, mc_samples: int) -> torch.Tensor:
        """−log p(target | clean context) per sequence in nats, (B,) float64: exact, or an upper
        bound averaged over ``mc_samples`` Monte Carlo draws when ``is_bound``."""

    @abstractmethod
    def sample(self, model: Backbone, given: torch.Tensor, clean: torch.Tensor, generator: torch.Generator,
               settings: SamplerSettings | None = None) -> tuple[torch.Tensor, int]:
        """(B, L) tokens with the ``clean`` positions of ``given`` kept, and the network calls."""

    def generate(self, model: Backbone, num: int, length: int, prompt: torch.Tensor | None,
                 generator: torch.Generator, settings: SamplerSettings | None = None) -> tuple[torch.Tensor, int]:
        """``num`` samples of ``length`` tokens that all start with ``prompt`` (1-D ids, or None)."""
        device = next(model.parameters()).device
        given = torch.zeros((num, length), dtype=torch.long, device=device)
        clean = torch.zeros((num, length), dtype=torch.bool, device=device)
        if prompt is not None and len(prompt):
            given[:, : len(prompt)] = prompt.to(device)
            clean[:, : len(prompt)] = True
        return self.sample(model, given, clean, generator, settings)
