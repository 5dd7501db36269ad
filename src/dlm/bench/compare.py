"""``dlm bench compare``: train every model of a compare config over several seeds on the same
data, tokenizer, backbone size and token budget, evaluate every run the same way, and write
a report (``report.md``, ``results.json``, plots).

Layout of ``OUT``::

    OUT/.lock                   held while a comparison runs (dlm.runlock): one comparison per folder
    OUT/compare.json            what was asked (written first: marks the folder as a comparison)
    OUT/runs/<model>-s<seed>/   normal run folders (dlm eval / dlm sample read them)
    OUT/evals/<model>-s<seed>.json   each run's measurements, one part at a time
    OUT/report.md, OUT/results.json, OUT/*.png

Nothing is written before everything is checked (the configs, the data, the judge, the run
folders already there); the lock is taken before the folder is read, so a second compare on
one ``--out`` stops with the same line whatever the first one is doing.

Resuming: a finished run is never retrained, an interrupted one continues with ``resume``,
and each measurement is cached as soon as it is done (keyed by its settings and the run's
step), so running the same command again picks up where it stopped, mid-evaluation too.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.bench import measures
from dlm.bench.spec import ModelPlan, Spec
from dlm.checkpoint import CHECKPOINT_NAME, has_checkpoint, is_run_dir, latest_checkpoint, load_weights, read_run_config
from dlm.errors import DlmError
from dlm.fsio import atomic_write_text, ensure_dir, writing
from dlm.runlock import LOCK, run_lock
from dlm.service import RESUMABLE, flatten, sampler_settings  # RESUMABLE: where a run may differ from the plan

MARK = "compare.json"


@dataclass
class Unit:
    """One (model, seed) run of the comparison."""

    model: ModelPlan
    seed: int
    path: Path
    state: str  # "new" | "partial" | "done"

    @property
    def name(self) -> str:
        return f"{self.model.name}-s{self.seed}"


def check_out(out: Path) -> None:
    """``out`` is new, empty, or an earlier comparison's folder."""
    if out.exists() and not out.is_dir():
        raise DlmError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        with writing(out, "read"):
            entries = list(out.iterdir())
        if [e for e in entries if e.name != LOCK] and not (out / MARK).is_file():  # the lock: a comparison starting
            raise DlmError(f"--out {out} exists and is not a comparison folder (no {MARK}): choose another --out")


def prepare_out(out: Path, spec: Spec, command: str) -> None:
    """Create ``out`` and record what was asked (this also proves it writable, before any training)."""
    check_out(out)
    ensure_dir(out)
    atomic_write_text(out / MARK, json.dumps({
        "command": command, "config": spec.source, "overrides": spec.overrides, "seeds": spec.seeds,
        "models": {m.name: m.overrides for m in spec.models}, "settings": spec.settings.__dict__,
    }, indent=1, default=str))


def plan_units(spec: Spec, out: Path) -> list[Unit]:
    """Every (model, seed) and whether it is trained, to be continued or new; a run folder
    trained with other settings stops the comparison here, before any training."""
    units = []
    for model in spec.models:
        for seed in spec.seeds:
            path = out / "runs" / f"{model.name}-s{seed}"
            cfg = spec.run_config(model, seed)
            state = "new"
            if path.exists() and (not path.is_dir() or any(path.iterdir())) and not is_run_dir(path):
                raise DlmError(f"{path} exists and is not a run folder: move it away or choose another --out")
            if is_run_dir(path) and has_checkpoint(path):
                saved = flatten(read_run_config(path).to_dict())
                planned = flatten(cfg.to_dict())
                for key in sorted(set(saved) | set(planned)):
                    if saved.get(key) != planned.get(key) and key not in RESUMABLE:
                        raise DlmError(f"{path} was trained with {key}={saved.get(key)!r}, this comparison asks for "
                                       f"{planned.get(key)!r}: use another --out (or the settings it was started with)")
                step = checkpoint_step(latest_checkpoint(path))
                if step > cfg.train.steps:
                    raise DlmError(f"{path} has trained {step} steps, more than this comparison's {cfg.train.steps}")
                state = "done" if step == cfg.train.steps else "partial"
            units.append(Unit(model, seed, path, state))
    return units


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])


class EvalCache:
    """One run's measurements, ``{"step": s, "parts": {key: {"spec": …, "result": …}}}``, written
    after every part: a part is reused only for the same step and the same settings."""

    def __init__(self, path: Path, step: int):
        self.path = path
        self.step = step
        self.parts: dict = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}  # a cache that cannot be read is measured again
            if isinstance(data, dict) and data.get("step") == step and isinstance(data.get("parts"), dict):
                self.parts = data["parts"]

    def get(self, key: str, spec: dict):
        part = self.parts.get(key)
        return part["result"] if isinstance(part, dict) and part.get("spec") == spec else None

    def put(self, key: str, spec: dict, result: dict) -> dict:
        self.parts[key] = {"spec": spec, "result": result}
        atomic_write_text(self.path, json.dumps({"step": self.step, "parts": self.parts}, indent=1))
        return result


def say(text: str) -> None:
    print(f"dlm bench {time.strftime('%H:%M:%S')}: {text}", file=sys.stderr, flush=True)


def evaluate_unit(unit: Unit, spec: Spec, out: Path, data, judge, tag: str) -> dict:
    """Every measurement of one finished run, from the cache where it is there already."""
    from dlm.runs import load_run

    s = spec.settings
    run = load_run(unit.path, run_device(unit))
    cache = EvalCache(out / "evals" / f"{unit.name}.json", run.step)
    parts: dict = {"train": measures.train_figures(unit.path)}

    def part(key: str, what: str, settings: dict, fn):
        found = cache.get(key, settings)
        if found is None:
            say(f"{tag} {unit.name}: {what}")
            found = cache.put(key, settings, fn())
        parts[key] = found

    part("likelihood", "likelihood", {"max_tokens": run.cfg.eval.max_tokens, "mc_samples": run.cfg.eval.mc_samples,
                                      "seed": s.eval_seed}, lambda: measures.likelihood(run, data, s.eval_seed))
    own = run.cfg.sampler.name or run.family.default_sampler
    for sampler in [None, *(n for n in s.samplers if n in run.family.samplers and n != own)]:
        key, what = ("gen", "") if sampler is None else (f"gen:{sampler}", f" ({sampler})")
        for steps in distinct_budgets(run, s.sample_steps):
            part(f"{key}@{steps}", f"Gen PPL at {steps} steps{what}",
                 {"samples": s.samples, "judge": judge.name, "seed": s.eval_seed},
                 lambda: measures.sample_quality(run, judge, steps, s.samples, min(s.samples, 16), s.eval_seed, sampler))
    for steps in distinct_budgets(run, s.speed_steps):
        part(f"speed@{steps}", f"sampling speed at {steps} steps",
             {"batches": s.speed_batches, "repeats": s.speed_repeats, "threads": s.threads},
             lambda: measures.speed(run, steps, s.speed_batches, s.speed_repeats, s.eval_seed))
    for length in s.infill_lengths:
        part(f"infill@{length}", f"masked-token completion, spans of {length}",
             {"rows": s.infill_rows, "steps": s.infill_steps, "seed": s.eval_seed},
             lambda: measures.infill(run, data, length, s.infill_rows, s.infill_steps, s.eval_seed))
    if spec.mark_steps:
        for epochs, step in spec.mark_steps.items():
            part(f"epoch@{epochs:g}", f"validation bits after {epochs:g} epochs (step {step})",
                 {"step": step, "max_tokens": run.cfg.eval.max_tokens, "seed": s.eval_seed},
                 lambda: {**measures.likelihood(load_step(run, step), data, s.eval_seed), "step": step, "epochs": epochs})
        prune_checkpoints(unit.path, set(spec.mark_steps.values()))
    return parts


def distinct_budgets(run, budgets: list[int]) -> list[int]:
    """The sampling budgets that give distinct network steps: a family whose steps do not
    follow the setting (AR: one per token) is measured once."""
    seen, keep = set(), []
    for steps in budgets:
        network = run.family.network_steps(sampler_settings(run, steps=steps), run.cfg.data.seq_len)
        if network not in seen:
            seen.add(network)
            keep.append(steps)
    return keep


def run_device(unit: Unit) -> str:
    return unit.model.cfg.train.device


def load_step(run, step: int):
    """``run`` with the weights (the EMA where there is one) of its checkpoint at ``step``."""
    from safetensors.torch import load_file

    folder = run.path / "checkpoints" / f"step_{step:08d}"
    if not (folder / "meta.json").is_file():
        raise DlmError(f"{folder} is missing: the data-constrained marks need every epoch's checkpoint "
                       f"(delete {run.path} to train it again)")
    name = "ema.safetensors" if (folder / "ema.safetensors").is_file() else "model.safetensors"
    load_weights(run.model, load_file(folder / name), folder)
    run.model.to(run.device).eval()
    return run


def prune_checkpoints(path: Path, keep_steps: set[int]) -> None:
    """Drop the per-epoch checkpoints that are not epoch marks once the marks are measured
    (the latest stays: it is what dlm eval / sample read)."""
    ckpts = path / "checkpoints"
    latest = latest_checkpoint(path).name
    for folder in ckpts.iterdir():
        if CHECKPOINT_NAME.fullmatch(folder.name) and folder.name != latest and checkpoint_step(folder) not in keep_steps:
            shutil.rmtree(folder, ignore_errors=True)


def run_compare(spec: Spec, out: Path, command: str, progress: bool = True) -> int:
    threads = torch.get_num_threads()
    if spec.settings.threads:
        torch.set_num_threads(spec.settings.threads)  # timings with a fixed number of threads
    try:
        return _run(spec, out, command, progress)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) get theirs back


def _run(spec: Spec, out: Path, command: str, progress: bool) -> int:
    from dlm.bench.plots import require_matplotlib
    from dlm.data import prepare_data

    t0 = time.perf_counter()
    if spec.settings.plots:
        require_matplotlib()  # not after an hour of training
    check_out(out)
    datas = {}
    for model in spec.models:  # tokenise once; bad data (or too few tokens) fails before any training
        key = json.dumps(model.cfg.data.__dict__, sort_keys=True)
        if key not in datas:
            datas[key] = prepare_data(model.cfg.data)
    judge = choose_judge(spec)  # a missing judge fails before anything is written
    # one comparison per folder: the lock comes before anything in it is read or written, so a
    # second compare on this --out stops here with one line whatever the first one is doing
    with run_lock(out):
        check_out(out)
        units = plan_units(spec, out)  # a run trained with other settings stops us before anything is written
        prepare_out(out, spec, command)
        return _train_and_measure(spec, out, command, progress, units, datas, judge, t0)


def _train_and_measure(spec: Spec, out: Path, command: str, progress: bool, units: list[Unit], datas: dict, judge,
                       t0: float) -> int:
    from dlm.bench.plots import write_plots
    from dlm.bench.report import build_results, write_report
    from dlm.train import train

    n = len(units)
    say(f"{len(spec.models)} models × {len(spec.seeds)} seeds into {out} "
        f"({sum(u.state == 'done' for u in units)} trained already)")
    per_run = {}
    for k, unit in enumerate(units, 1):
        tag = f"[{k}/{n}]"
        data = datas[json.dumps(unit.model.cfg.data.__dict__, sort_keys=True)]
        if unit.state != "done":
            cfg = spec.run_config(unit.model, unit.seed)
            say(f"{tag} {unit.name}: {'continuing' if unit.state == 'partial' else 'training'} "
                f"({cfg.family}, {cfg.train.steps} steps)")
            ensure_dir(unit.path.parent)
            result = train(cfg, unit.path, resume=unit.state == "partial", progress=progress, data=data)
            if result.interrupted:
                say(f"stopped by {result.interrupted} (checkpoint saved); run the same command to continue")
                return 130 if result.interrupted == "SIGINT" else 143
        per_run[unit.name] = evaluate_unit(unit, spec, out, data, judge, tag)
    first = spec.models[0].cfg
    baselines = measures.floors(first, datas[json.dumps(first.data.__dict__, sort_keys=True)],
                                spec.settings.infill_lengths, spec.settings.infill_rows)
    results = build_results(spec, units, per_run, command, time.perf_counter() - t0, out, baselines)
    plots = write_plots(results, units, out) if spec.settings.plots else []
    write_report(results, plots, out)
    say(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {out / 'report.md'}")
    return 0


def choose_judge(spec: Spec):
    """The Gen PPL judge: ``compare.judge=source`` is the synthetic source the data comes from
    (``dlm.data.sources``: exact), anything else a judge model (``dlm.judge``)."""
    from dlm.data.sources import SOURCES, SourceJudge, source_of
    from dlm.judge import load_judge

    if spec.settings.judge != "source":
        return load_judge(spec.settings.judge, measures_device(spec))
    sources = {m.cfg.data.data for m in spec.models}
    if len(sources) != 1 or source_of(next(iter(sources))) is None:
        raise DlmError(f"compare.judge=source judges samples by the synthetic source the data comes from "
                       f"({', '.join(SOURCES.names())}); this comparison's data is {', '.join(sorted(sources))}")
    return SourceJudge(source_of(next(iter(sources))))


def measures_device(spec: Spec) -> torch.device:
    from dlm.device import resolve_device

    return resolve_device(spec.models[0].cfg.train.device)
