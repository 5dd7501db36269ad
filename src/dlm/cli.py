"""``dlm train | eval | sample | quickstart | lm-eval | bench compare``: the command line.

Common options are flags; everything else comes from a YAML config (``--config``) and
``key=value`` overrides (``train.lr=3e-4 model.n_layer=6``). Bad input ends in one line on
stderr and exit status 2.

This module parses, checks flags, calls ``dlm.service`` (what each command does, for
library users too) and prints; it holds no evaluation or sampling logic of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from dlm.errors import DlmError


def _train_flags(args) -> dict[str, Any]:
    return {
        "family": args.family,
        "objective": args.objective,
        "schedule": args.schedule,
        "data.data": args.data,
        "data.tokenizer": args.tokenizer,
        "data.vocab_size": args.vocab_size,
        "data.seq_len": args.seq_len,
        "model.size": args.size,
        "train.batch_size": args.batch_size,
        "train.grad_accum": args.grad_accum,
        "train.steps": args.steps,
        "train.lr": args.lr,
        "train.seed": args.seed,
        "train.device": args.device,
        "train.time_budget_s": args.time_budget,
        "train.parallel": args.parallel,
        "train.compile": args.compile,
    }
    # (``--init-from`` is not a config flag: it picks the base config, see dlm.service.init_from_config)


def cmd_train(args) -> int:
    from dlm.config import build_config
    from dlm.service import init_from_config, resume_config
    from dlm.train import train

    out = Path(args.out)
    flags = {k: v for k, v in _train_flags(args).items() if v is not None}
    if args.resume:
        cfg = resume_config(out, args.config, args.overrides, flags)
    elif args.init_from:  # fine-tuning: the source run's config is the base, --config's keys go on top
        cfg = init_from_config(Path(args.init_from), args.config, args.overrides, flags)
    else:
        cfg = build_config(args.config, args.overrides, flags)
    if not args.resume and cfg.distill != type(cfg.distill)():  # a student's rounds and steps are dlm distill's
        default = dataclasses.asdict(type(cfg.distill)())
        keys = ", ".join(f"distill.{k}" for k, v in dataclasses.asdict(cfg.distill).items() if v != default[k])
        raise DlmError(f"{keys}: distill.* settings are dlm distill's: run `dlm distill TEACHER --out DIR` "
                       "(it sets the rounds' training and sampling steps), not dlm train")
    result = train(cfg, out, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    summary = {
        "run": str(out),
        "step": result.step,
        "loss": result.loss if result.loss == result.loss else None,  # NaN (no step this session): null
        "tokens_per_s": round(result.tokens_per_s, 1),
        "elapsed_s": round(result.elapsed_s, 1),
        "params": result.params,
        **({"compile_s": round(result.compile_s, 1)} if result.compile_s else {}),  # compiled (on CUDA by default)
        **({"steps_asked": result.steps, "time_budget_ended": True} if result.time_budget_ended else {}),
    }
    compiled = f"; compiling {result.compile_s:.0f} s (inductor's start-up and the first step)" if result.compile_s else ""
    print(json.dumps(summary) if args.json else f"trained {out}: step {result.step}, loss {result.loss:.4f}, "
          f"{result.tokens_per_s:,.0f} tokens/s, {result.elapsed_s:.0f} s{compiled}")
    if result.time_budget_ended:
        print(f"dlm: note: {_time_budget_note(result, cfg, out, f'loss {result.loss:.4f}')}", file=sys.stderr)
    if result.interrupted:
        print(f"stopped by {result.interrupted}; the checkpoint is saved: continue with "
              f"`dlm train --out {out} --resume`", file=sys.stderr)
        return 130 if result.interrupted == "SIGINT" else 143
    return 0


def _time_budget_note(result, cfg, out: Path, reached: str) -> str:
    """What a run the time budget ended should say: where it stopped, why, what it reached, how to go on."""
    return (f"training stopped at step {result.step:,} of {result.steps:,} because its time budget of "
            f"{cfg.train.time_budget_s:g} s (train.time_budget_s, --time-budget) ran out, at {reached}; continue "
            f"with `dlm train --out {out} --resume --time-budget 0` (no time limit: the remaining "
            f"{result.steps - result.step:,} steps, the learning rate following the steps from there)")


def _format_samples(r: dict) -> str:
    return "\n".join([
        f"  samples        {r['samples']} of {r['sample_length']} tokens, {r['sample_steps']} steps "
        f"({r['sample_nfe']} network calls per batch), {r['sample_tokens_per_s']:,.0f} tokens/s",
        f"  gen ppl        {r['gen_ppl']:.2f} under {r['judge']} ({r['judge_tokens']:,} judge tokens "
        f"in {r['judge_documents']} documents)",
        f"  entropy        {r['entropy']:.3f} ± {r['entropy_std']:.3f} nats (unigram, per sample)",
    ])


def _format_eval(r: dict) -> str:
    if "nll" not in r:  # --no-likelihood
        return f"{r['family']} run {r['run']} at step {r['step']} — sample quality\n" + _format_samples(r)
    bound = "" if r.get("bound_name") else "NELBO, "  # a family that names its bound: named below instead
    kind = "upper bound (%s%d MC samples)" % (bound, r["mc_samples"]) if r["bound"] else "exact"
    if "bound_steps" in r:  # discrete time: which model's bound (every step, or a stride of them)
        kind += f", {r['bound_steps']}-step model (T = {r['process_steps']}, stride {r['time_stride']})"
    if r.get("log_t_share"):  # importance sampling of small t
        kind += f", {r['log_t_share']:.0%} of t log-uniform"
    if r.get("carry"):  # usdm: the bound of another x_θ than the network's softmax (docs/uniform.md)
        kind += f", x_θ = {r['x_theta']}"
    if r.get("bound_name"):  # a family that names its bound (gaussian: which terms, on what)
        kind += f": {r['bound_name']}"
    lines = [
        f"{r['family']} run {r['run']} at step {r['step']}, {r['data']} [{r['split']}], "
        f"{r['tokens']:,} tokens in {r['sequences']} sequences of {r['seq_len']} — {kind}",
        f"  nll            {r['nll']:.4f} ± {r['stderr']:.4f} nats/token",
        f"  perplexity     {r['ppl']:.2f}",
        f"  bits/token     {r['bits_per_token']:.4f}",
        f"  bits/byte      {r['bits_per_byte']:.4f} ± {r['stderr_bits_per_byte']:.4f}" if r["bits_per_byte"] is not None
        else "  bits/byte      — (the scored end-of-text filling stands for no bytes; per token figures only)",
    ]
    if "scored" in r:  # prompt/response rows: what the figures cover
        lines[0] += f"; scored: {r['scored']}"
    if r.get("unigram_bits_per_byte") is not None:
        lines.append(f"  references     token unigram {r['unigram_bits_per_byte']:.4f}, "
                     f"byte unigram {r['byte_unigram_bits_per_byte']:.4f} bits/byte")
    if "gen_ppl" in r:
        lines.append(_format_samples(r))
    return "\n".join(lines)


def _check_seed(seed: int) -> None:
    """``--seed`` of eval, sample and lm-eval: the range ``train.seed`` has (torch takes at most
    64 bits and would fail deep inside with a traceback)."""
    from dlm.config import SEED_MAX

    if not 0 <= seed <= SEED_MAX:
        raise DlmError(f"--seed must be in [0, {SEED_MAX}], got {seed}")


@contextlib.contextmanager
def _as_flags(**flags):
    """A sampler-settings error names the flag the user typed (``--top-k``), not the config
    key (``config key 'sampler.top_k'``), for every flag given (not None)."""
    try:
        yield
    except DlmError as e:
        message = str(e)
        for key, value in flags.items():
            if value is not None:
                message = message.replace(f"config key 'sampler.{key}'", "--" + key.replace("_", "-"))
        raise DlmError(message) from None


def _sampler_settings(run, args, temperature: float | None = None):
    """The settings of ``run``'s sampler that ``--sampler``, ``--steps``, ``--temperature`` (or
    ``temperature`` where it is not given), ``--top-k``, ``--top-p`` and the
    ``sampler.KEY=VALUE`` overrides ask for."""
    from dlm.service import sampler_settings

    temperature = args.temperature if args.temperature is not None else temperature
    with _as_flags(steps=args.steps, temperature=temperature, top_k=args.top_k, top_p=args.top_p):
        return sampler_settings(run, args.steps, temperature, args.top_k, args.top_p, args.sampler, args.overrides)


def _check_eval_flags(args) -> None:
    """``dlm eval``'s flags, each in its range, before the run is loaded."""
    _check_seed(args.seed)
    if args.samples is None and args.answers is None and args.no_likelihood:
        raise DlmError("--no-likelihood leaves nothing to evaluate: add --samples N or --answers N")
    if args.samples is not None and args.samples < 1:
        raise DlmError(f"--samples must be ≥ 1, got {args.samples}")
    if args.answers is not None and args.answers < 1:
        raise DlmError(f"--answers must be ≥ 1, got {args.answers}")
    for flag, value in (("--mc-samples", args.mc_samples), ("--batch-size", args.batch_size), ("--steps", args.steps),
                        ("--sample-batch", args.sample_batch)):
        if value is not None and value < 1:
            raise DlmError(f"{flag} must be ≥ 1, got {value}")
    if args.max_tokens is not None and args.max_tokens < 0:
        raise DlmError(f"--max-tokens must be ≥ 0 (0: all), got {args.max_tokens}")
    if args.time_stride is not None and args.time_stride < 1:
        raise DlmError(f"--time-stride must be ≥ 1, got {args.time_stride}")
    if args.log_t_share is not None and not 0.0 <= args.log_t_share < 1.0:  # NaN too
        raise DlmError(f"--log-t-share must be in [0, 1), got {args.log_t_share}")


def cmd_eval(args) -> int:
    from dlm import service
    from dlm.runs import load_run

    _check_eval_flags(args)
    run = load_run(Path(args.run), args.device, use_ema=not args.no_ema)
    service.configure_bound(run, args.log_t_share, args.time_stride, args.carry, name=args.run)
    settings = _sampler_settings(run, args)
    answer_rows = service.answer_rows(run, args.data, args.split, args.answers) if args.answers is not None else None
    if args.no_likelihood:
        result = service.run_summary(run)
    else:
        result = service.evaluate_run(run, args.data, args.split, args.mc_samples, args.max_tokens, args.batch_size,
                                      args.seed)
    if args.samples is not None:
        result.update(service.sample_quality(run, args.judge, args.samples, settings, args.sample_batch, args.seed))
    if answer_rows is not None:  # greedy unless --temperature is given
        greedy = _sampler_settings(run, args, temperature=0.0)
        result.update(service.answer_quality(run, answer_rows, greedy, args.sample_batch, args.seed))
    if args.json:
        print(json.dumps(result))
    else:
        text = [_format_eval(result)] if "nll" in result or "gen_ppl" in result else [
            f"{result['family']} run {result['run']} at step {result['step']}"]
        print("\n".join(text + ([_format_answers(result)] if answer_rows is not None else [])))
    return 0


def _format_answers(r: dict) -> str:
    lines = [
        f"  answers        {r['answers']} prompts, temperature {r['answer_temperature']:g}, "
        f"{r['answer_steps']} steps, {r['answer_seconds']:.1f} s",
        f"  exact match    {r['answer_exact_match']:.4f} ± {r['answer_exact_match_stderr']:.4f}",
        f"  token accuracy {r['answer_token_accuracy']:.4f} ± {r['answer_token_accuracy_stderr']:.4f} "
        f"({r['answer_target_tokens']:,} target tokens)",
    ]
    for ex in r["answer_examples"]:
        lines.append(f"    …{ex['prompt_tail']!r} → {ex['answer']!r} (reference {ex['reference']!r})")
    return "\n".join(lines)



def cmd_sample(args) -> int:
    from dlm.runs import load_run
    from dlm.service import sample_run

    _check_seed(args.seed)
    if args.trace is not None:  # before the run is loaded: a bad path costs nothing
        from dlm.trace import check_trace_path
        check_trace_path(Path(args.trace))
    run = load_run(Path(args.run), args.device, use_ema=not args.no_ema)
    with _as_flags(steps=args.steps, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p):
        result = sample_run(run, args.num, args.steps, args.length, args.prompt, args.temperature, args.top_k,
                            args.top_p, args.seed, args.infill, args.sampler, args.overrides,
                            trace=None if args.trace is None else Path(args.trace))
    if args.json:
        print(json.dumps(result))
    else:
        for i, text in enumerate(result["samples"]):
            print(f"──── sample {i + 1} ────\n{text}\n")
        print(f"{len(result['samples'])} samples of {result['length']} tokens in {result['seconds']:.2f} s "
              f"({result['nfe']} network calls)")
    for note in _sample_notes(result["samples"], args.prompt):
        print(f"dlm: note: {note}", file=sys.stderr)
    return 0


def _sample_notes(texts: list[str], prompt: str | None) -> list[str]:
    """What a reader of ``dlm sample``'s output should be told: copies that are all the same
    (greedy decoding is deterministic for a left-to-right model), answers that are empty."""
    notes = []
    if len(texts) > 1 and len(set(texts)) == 1:
        notes.append(f"all {len(texts)} samples are the same text (at temperature 0 decoding is greedy and "
                     "repeats itself; use --num 1, or a temperature above 0 for different samples)")
    empty = sum(not t[len(prompt or ""):].strip() for t in texts)  # an answer's text begins with its prompt
    if empty:
        where = "right after the prompt" if prompt else "at once"
        notes.append(f"{empty} of {len(texts)} {'answers' if prompt else 'samples'} are empty: the model "
                     f"produced end-of-text {where} (a model not fine-tuned on prompt/response pairs may; "
                     "try a temperature above 0, another prompt, or more training)")
    return notes


def _fresh_out(base: Path) -> Path:
    if not base.exists():
        return base
    i = 2
    while Path(f"{base}-{i}").exists():
        i += 1
    return Path(f"{base}-{i}")


def cmd_quickstart(args) -> int:
    from dlm.checkpoint import atomic_write_text
    from dlm.config import build_config
    from dlm.runs import load_run
    from dlm.service import evaluate_run, sample_run
    from dlm.train import train

    t0 = time.perf_counter()
    out = Path(args.out) if args.out else _fresh_out(Path("runs/quickstart"))
    flags = {"train.device": args.device, "train.steps": args.steps, "family": args.family}
    cfg = build_config("quickstart", args.overrides, {k: v for k, v in flags.items() if v is not None})
    print(f"dlm quickstart: training a {cfg.model.size} {cfg.family} model on the built-in "
          f"'{cfg.data.data}' corpus ({cfg.data.tokenizer} tokenizer) into {out}", file=sys.stderr)
    result = train(cfg, out, progress=not args.quiet)
    if result.interrupted:
        print(f"stopped by {result.interrupted}; continue with `dlm train --out {out} --resume`", file=sys.stderr)
        return 130 if result.interrupted == "SIGINT" else 143
    run = load_run(out, cfg.train.device)
    ev = evaluate_run(run, seed=cfg.train.seed)
    samples = sample_run(run, 4, seed=cfg.train.seed)
    atomic_write_text(out / "eval.json", json.dumps(ev, indent=1))
    atomic_write_text(out / "samples.txt", "\n\n".join(f"──── sample {i + 1} ────\n{t}" for i, t in enumerate(samples["samples"])) + "\n")
    total = time.perf_counter() - t0
    summary = {"run": str(out), "train": result.__dict__, "eval": ev, "samples": samples, "wall_s": total}
    atomic_write_text(out / "quickstart.json", json.dumps(summary, indent=1))
    for i, text in enumerate(samples["samples"]):
        print(f"──── sample {i + 1} ────\n{text}\n")
    print(_format_eval(ev))
    steps = f"{result.step:,} of {result.steps:,} steps (the time budget ended training)" if result.time_budget_ended \
        else f"{result.step:,} steps"
    print(f"\n{steps} at {result.tokens_per_s:,.0f} tokens/s; quickstart took {total / 60:.1f} min. "
          f"Run folder: {out} (dlm eval {out} · dlm sample {out} --prompt 'ROMEO.')")
    if result.time_budget_ended:
        reached = f"{ev['bits_per_byte']:.3f} bits/byte on held-out text"
        print(f"dlm: note: {_time_budget_note(result, cfg, out, reached)}", file=sys.stderr)
    return 0


def cmd_lm_eval(args) -> int:
    """``dlm lm-eval``: EleutherAI's lm-evaluation-harness on a run (see dlm.lm_eval_adapter)."""
    from dlm.lm_eval_adapter import format_results, results_json, run_lm_eval

    _check_seed(args.seed)
    results = run_lm_eval(args.run, args.tasks, include_path=args.include_path, limit=args.limit,
                          mc_samples=args.mc_samples, batch_size=args.batch_size, seed=args.seed, device=args.device)
    print(results_json(results) if args.json else format_results(results))
    return 0


def cmd_bench_compare(args) -> int:
    """``dlm bench compare``: every model of a compare config over several seeds, one report (dlm.bench)."""
    import shlex

    from dlm.bench.compare import run_compare
    from dlm.bench.spec import load_spec

    spec = load_spec(args.config, args.overrides, args.models, args.seeds, args.unique_tokens, args.epochs)
    command = "dlm " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    return run_compare(spec, Path(args.out), command, progress=not args.quiet)


class _FromRegistries:
    """A help text built from the registries when help is printed (not when the parser is
    built: the registries import torch, which a refused flag should not wait for)."""

    def __init__(self, text: str, **fields):
        self.text, self.fields = text, fields

    def __str__(self) -> str:
        return self.text.format(**{k: f() for k, f in self.fields.items()})

    def __mod__(self, params) -> str:  # argparse expands %(default)s and the like
        return str(self) % params

    def strip(self) -> str:
        return str(self).strip()


def _family_names() -> str:
    from dlm.families import FAMILIES

    return " | ".join(FAMILIES.names())


def _per_family(kind: str) -> str:
    """Each family's objectives or samplers, its default first, from the registries:
    ``mdlm: nelbo | llada | …; usdm: …``."""
    from dlm.families import FAMILIES
    from dlm.objectives import OBJECTIVES
    from dlm.samplers import SAMPLERS

    registry = {"objective": OBJECTIVES, "sampler": SAMPLERS}[kind]
    parts = []
    for name in FAMILIES.names():
        family = FAMILIES.get(name)
        processes = list(dict.fromkeys(family.process_choices.values())) or ["causal"]
        default = getattr(family, f"default_{kind}")
        names = sorted(sorted({n for process in processes for n in registry.names(process)}), key=lambda n: n != default)
        parts.append(f"{name}: {' | '.join(names)}")
    return "; ".join(parts)


def _names_of(module: str, attr: str):
    def names() -> str:
        import importlib

        registry = getattr(importlib.import_module(module), attr)
        return " | ".join(registry.names() if hasattr(registry, "names") else registry)
    return names


def _sampler_help(default: str) -> _FromRegistries:
    return _FromRegistries("the family's sampler (" + default + "; the family's default first): {samplers}; "
                           "its settings as sampler.KEY=VALUE (docs/samplers.md)",
                           samplers=lambda: _per_family("sampler"))


class _UsageError(Exception):
    """An argparse complaint (a flag of the wrong type, a missing argument): one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises :class:`_UsageError` instead of printing the whole
    usage block and exiting (sub-command parsers are of the same class)."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _is_main_rank() -> bool:
    """Under torchrun only rank 0 reports an error (every rank still exits 2)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _error(message: str) -> int:
    if _is_main_rank():
        print(f"dlm: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dlm", description="Diffusion language models and their autoregressive baseline.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_sample_parser(sub)
    _add_quickstart_parser(sub)
    _add_lm_eval_parser(sub)
    _add_bench_parser(sub)
    _add_export_parser(sub)
    _add_distill_parser(sub)
    return p


def _add_train_parser(sub) -> None:
    """``dlm train``: a new run, ``--resume`` or ``--init-from``, flags for the common config keys."""
    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    t.add_argument("--config", help="YAML config file, or the name of a shipped config (e.g. quickstart)")
    t.add_argument("--family", help=_FromRegistries("{families} (default mdlm)", families=_family_names))
    t.add_argument("--objective", help=_FromRegistries("the family's objective, its default first: {objectives}",
                                                       objectives=lambda: _per_family("objective")))
    t.add_argument("--schedule", help=_FromRegistries("{names} (default loglinear)",
                                                      names=_names_of("dlm.schedules", "SCHEDULES")))
    t.add_argument("--data", help="built-in corpus (shakespeare), file, folder, wikitext-103 | openwebtext | lm1b | text8, or hf:REPO[:CONFIG]")
    t.add_argument("--tokenizer", help=_FromRegistries("{names} (default bpe)",
                                                       names=_names_of("dlm.data.tokenizers", "TOKENIZERS")))
    t.add_argument("--vocab-size", type=int, help="bpe vocabulary size")
    t.add_argument("--size", help=_FromRegistries("{names} (default tiny)", names=_names_of("dlm.backbones.sizes", "SIZES")))
    t.add_argument("--seq-len", type=int, help="tokens per training sequence (data.seq_len, default 128)")
    t.add_argument("--batch-size", type=int, help="sequences per micro-batch and rank (train.batch_size, default 32)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step (train.grad_accum, default 1)")
    t.add_argument("--steps", type=int, help="optimiser steps (train.steps, default 500; 0: a run of "
                   "the initial model, e.g. a pretrained one as it is)")
    t.add_argument("--lr", type=float, help="peak learning rate (train.lr, default 1e-3)")
    t.add_argument("--seed", type=int, help="seed of the weights, the data order and the noise (train.seed, default 0)")
    t.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N | mps")
    t.add_argument("--time-budget", type=float, help="stop after this many seconds (LR schedule follows time)")
    t.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help="under torchrun: ddp (default) or fsdp (FSDP2: weights, gradients, optimiser and EMA sharded)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the transformer blocks, head and loss (default: on CUDA only; compile time "
                        "reported apart; --resume may switch it)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.add_argument("--init-from", help="fine-tune: start from this run's weights, config and tokenizer (fresh optimiser)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=3e-4")
    t.set_defaults(func=cmd_train)


def _add_eval_parser(sub) -> None:
    """``dlm eval``: likelihood, ``--samples`` (Gen PPL, entropy) and ``--answers`` (pairs runs)."""
    e = sub.add_parser("eval", help="likelihood (NLL, PPL, bits per token and per byte) of a run, and sample quality")
    e.add_argument("run", help="a run folder")
    e.add_argument("--data", help="evaluate on this data (tokenised with the run's tokenizer)")
    e.add_argument("--split", choices=["val", "train"], default="val", help="the split to evaluate (default val)")
    e.add_argument("--mc-samples", type=int, help="diffusion: Monte Carlo time samples per sequence")
    e.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens (0: all)")
    e.add_argument("--batch-size", type=int, help="sequences per network call (default: the run's eval.batch_size)")
    e.add_argument("--time-stride", type=int, help="d3pm: the bound of the n-step model that sampler.steps=n "
                   "samples, n = T/K rounded (every K-th step where K divides T; default: the run's eval.time_stride)")
    e.add_argument("--carry", type=float, help="usdm: bound the model whose x_θ = (1 − λ)·softmax + λ·e_{x_t} "
                   "(λ in [0, 1); default 0, the network's own x_θ; docs/uniform.md)")
    e.add_argument("--log-t-share", type=float, help="usdm, mdlm with time conditioning: the share of Monte Carlo "
                   "times drawn log-uniformly on [1e-5, 1], importance-weighted (in [0, 1); default: the run's "
                   "eval.log_t_share, else the family's: usdm 0.25, mdlm 0)")
    e.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo draws and samples (default 0)")
    e.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N | mps")
    e.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.add_argument("--samples", type=int, help="also draw this many unconditional samples and report their Gen PPL and entropy")
    e.add_argument("--steps", type=int, help="diffusion steps for --samples and --answers (default: the run's sampler.steps; ignored by ar)")
    e.add_argument("--judge", help="judge for Gen PPL: smollm2-135m (default) or a local Hugging Face causal-LM folder")
    e.add_argument("--sample-batch", type=int, default=16, help="samples (or answers) drawn per batch (default 16)")
    e.add_argument("--temperature", type=float, help="sampling temperature (0: greedy; default: the run's, "
                   "and 0 for --answers)")
    e.add_argument("--top-k", type=int, help="keep the K likeliest tokens (0: all; default: the run's)")
    e.add_argument("--top-p", type=float, help="nucleus sampling: keep the likeliest tokens up to this mass "
                   "(1: all; default: the run's)")
    e.add_argument("--answers", type=int, help="pairs runs: answer the first N prompts of --split (greedy unless "
                   "--temperature) and report exact match and token accuracy against the responses")
    e.add_argument("--no-likelihood", action="store_true", help="with --samples or --answers: skip the likelihood evaluation")
    e.add_argument("--sampler", help=_sampler_help("for --samples / --answers; default: the run's"))
    e.add_argument("overrides", nargs="*", help="sampler settings for --samples / --answers, e.g. sampler.top_p=0.9")
    e.set_defaults(func=cmd_eval)


def _add_sample_parser(sub) -> None:
    """``dlm sample``: unconditional, ``--prompt`` or ``--infill`` samples."""
    s = sub.add_parser("sample", help="generate text from a run")
    s.add_argument("run", help="a run folder")
    s.add_argument("--num", type=int, default=4, help="how many samples (default 4)")
    s.add_argument("--steps", type=int, help="diffusion steps (ignored by ar: one step per token)")
    s.add_argument("--length", type=int, help="tokens per sample (default: the training seq_len)")
    s.add_argument("--prompt", help="text the samples start with (kept fixed); each answer stops at end-of-text")
    s.add_argument("--infill", help="a template whose [MASK*N] holes (N tokens each) are filled, the text around them kept")
    s.add_argument("--temperature", type=float, help="sampling temperature (0: greedy, every sample the same; "
                   "default: the run's sampler.temperature)")
    s.add_argument("--top-k", type=int, help="keep the K likeliest tokens (0: all; default: the run's sampler.top_k)")
    s.add_argument("--top-p", type=float, help="nucleus sampling: keep the likeliest tokens up to this mass "
                   "(1: all; default: the run's sampler.top_p)")
    s.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    s.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N | mps")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    s.add_argument("--json", action="store_true", help="print the samples and their timing as one JSON object")
    s.add_argument("--sampler", help=_sampler_help("default: the run's sampler.name"))
    s.add_argument("--trace", help="write the sampling trajectory, every step, to FILE.html (a page with a slider) "
                   "or FILE.gif (an animation)")
    s.add_argument("overrides", nargs="*", help="sampler settings, e.g. sampler.steps=64")
    s.set_defaults(func=cmd_sample)


def _add_quickstart_parser(sub) -> None:
    """``dlm quickstart``: train, evaluate and sample the small shipped config."""
    q = sub.add_parser("quickstart", help="train, evaluate and sample a small MDLM on the built-in corpus")
    q.add_argument("--out", help="run folder (default: runs/quickstart, or the next free runs/quickstart-N)")
    q.add_argument("--family", help=_FromRegistries("{families} (default mdlm)", families=_family_names))
    q.add_argument("--steps", type=int, help="optimiser steps (default: the quickstart config's)")
    q.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N | mps")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.add_argument("overrides", nargs="*", help="key=value config overrides")
    q.set_defaults(func=cmd_quickstart)


def _add_lm_eval_parser(sub) -> None:
    """``dlm lm-eval``: lm-evaluation-harness tasks on a run."""
    le = sub.add_parser("lm-eval", help="run EleutherAI lm-evaluation-harness tasks on a run (pip install 'dlm[lm-eval]')")
    le.add_argument("run", help="a run folder")
    le.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    le.add_argument("--include-path", help="a folder of task YAMLs (local tasks)")
    le.add_argument("--limit", type=int, help="at most this many documents per task")
    le.add_argument("--mc-samples", type=int, help="diffusion: Monte Carlo samples per log-likelihood (default: the run's eval.mc_samples)")
    le.add_argument("--batch-size", type=int, help="rows per network call (default: the run's eval.batch_size)")
    le.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo draws (default 0)")
    le.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N | mps")
    le.add_argument("--json", action="store_true", help="print lm-eval's result dict as JSON")
    le.set_defaults(func=cmd_lm_eval)


def _add_bench_parser(sub) -> None:
    """``dlm bench compare``: the comparison of every family over seeds."""
    b = sub.add_parser("bench", help="benchmarks: compare (AR against every diffusion family, over seeds)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bc = bsub.add_parser("compare", help="train every model of a compare config over N seeds, evaluate them the "
                         "same way, and write report.md, results.json and plots")
    bc.add_argument("--config", help="compare config file or shipped name (default: compare; also compare-char, "
                    "compare-thesis, compare-data-constrained)")
    bc.add_argument("--out", default="runs/compare", help="comparison folder (default runs/compare); rerun to resume")
    bc.add_argument("--models", help="comma-separated subset of the config's models")
    bc.add_argument("--seeds", help="a count N (seeds 0..N-1) or a comma-separated list")
    bc.add_argument("--unique-tokens", type=int, help="data-constrained: train on the first N training tokens only")
    bc.add_argument("--epochs", type=float, help="data-constrained: epochs over those tokens (train.steps follows)")
    bc.add_argument("--quiet", action="store_true", help="no training progress bars")
    bc.add_argument("overrides", nargs="*", help="key=value: run-config keys for every model (train.steps=200), "
                    "compare.KEY for the comparison (compare.samples=8)")
    bc.set_defaults(func=cmd_bench_compare)


def cmd_distill(args) -> int:
    from dlm.service.distillation import distill

    flags = {"distill.rounds": args.rounds, "distill.steps_per_round": args.steps_per_round,
             "distill.start_steps": args.start_steps, "distill.divergence": args.divergence, "data.data": args.data,
             "train.batch_size": args.batch_size, "train.lr": args.lr, "train.device": args.device}
    flags = {k: v for k, v in flags.items() if v is not None}
    result, cfg = distill(Path(args.run), Path(args.out), args.config, args.overrides, flags, args.resume,
                          progress=not args.quiet)
    if not _is_main_rank():
        return 0  # under torchrun, rank 0 reports
    d = cfg.distill
    summary = {"run": args.out, "teacher": d.teacher, "student_steps": d.student_steps, "rounds": d.rounds,
               "step": result.step, "divergence": d.divergence, "loss": result.loss,
               "elapsed_s": round(result.elapsed_s, 1)}
    print(json.dumps(summary) if args.json else f"distilled {args.run} into {args.out}: {d.rounds} rounds, "
          f"{d.student_steps} steps, step {result.step}, {d.divergence} {result.loss:.4f}, {result.elapsed_s:.0f} s")
    if result.interrupted:
        print(f"stopped by {result.interrupted}; the checkpoint is saved: continue with "
              f"`dlm distill {args.run} --out {args.out} --resume`", file=sys.stderr)
        return 130 if result.interrupted == "SIGINT" else 143
    return 0


def _add_distill_parser(sub) -> None:
    """``dlm distill RUN --out DIR``: a few-step student (mdlm: SDTT, usdm: Duo's DCD)."""
    d = sub.add_parser("distill", help="distil a diffusion run into a few-step student (mdlm: SDTT, usdm: DCD)")
    d.add_argument("run", help="the teacher run folder")
    d.add_argument("--out", required=True, help="the student's run folder (or the one to continue with --resume)")
    d.add_argument("--config", help="YAML config with distill: (and train:) settings")
    d.add_argument("--resume", action="store_true", help="continue the distillation in --out")
    d.add_argument("--rounds", type=int, help="rounds, each halving the steps (distill.rounds)")
    d.add_argument("--steps-per-round", type=int, help="optimiser steps per round (distill.steps_per_round)")
    d.add_argument("--start-steps", type=int, help="the teacher's steps in the first round (distill.start_steps)")
    d.add_argument("--divergence", help="kl-bwd | kl-fwd | mse | tvd (distill.divergence)")
    d.add_argument("--data", help="corpus to distil on (default: the teacher's training data)")
    d.add_argument("--batch-size", type=int)
    d.add_argument("--lr", type=float)
    d.add_argument("--device")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--json", action="store_true")
    d.add_argument("overrides", nargs="*", help="key=value settings, e.g. distill.divergence=tvd train.lr=1e-4")
    d.set_defaults(func=cmd_distill)


def cmd_export(args) -> int:
    """``dlm export RUN OUT``: the run as a Hugging Face model folder (dlm.export)."""
    from dlm.export import export_run

    result = export_run(Path(args.run), Path(args.out), use_ema=not args.no_ema)
    print(json.dumps(result) if args.json else f"exported {args.run} (step {result['step']}) to {args.out}: "
          f"{', '.join(result['files'])}")
    return 0


def _add_export_parser(sub) -> None:
    """``dlm export RUN OUT``."""
    x = sub.add_parser("export", help="write a run as a Hugging Face model folder (transformers loads it with "
                       "trust_remote_code=True; dlm eval / sample read it back)")
    x.add_argument("run")
    x.add_argument("out", help="the folder to create (new, or empty)")
    x.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_export)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:  # `key=value` overrides may stand before, between or after the flags
        args, extra = parser.parse_known_args(argv)
        bad = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if bad:
            prog = " ".join(["dlm", *(n for n in (args.command, getattr(args, "bench", None)) if n)])
            raise _UsageError(f"{prog}: unrecognized arguments: {' '.join(bad)} (see `{prog} --help`)")
    except _UsageError as e:
        return _error(str(e))
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv  # the command as typed, for reports (None: sys.argv)
    try:
        return args.func(args)
    except DlmError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        print("dlm: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise  # a bug: its traceback must reach us
        return _error(f"out of memory: {_allocation(e)} (lower --batch-size / --num / train.batch_size)")


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation the device refused (torch.OutOfMemoryError, the CPU
    allocator's RuntimeError, numpy's MemoryError): too large a batch, not a bug."""
    # torch.OutOfMemoryError from torch 2.5; the CUDA one before it says "out of memory"
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", ())
    return isinstance(e, (MemoryError, oom)) or any(s in str(e) for s in ("can't allocate memory", "out of memory"))


def _allocation(e: BaseException) -> str:
    """What could not be allocated, e.g. "tried to allocate 49.1 GiB", from the error's message."""
    text = str(e)
    if m := re.search(r"allocate (\d+) bytes", text):  # the CPU allocator counts bytes
        return f"tried to allocate {int(m.group(1)) / 2**30:.1f} GiB"
    if m := re.search(r"allocate ([\d.]+ [KMGT]?i?B)", text):  # CUDA, MPS and numpy give a size
        return f"tried to allocate {m.group(1)}"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
