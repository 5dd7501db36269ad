"""``dlm train | eval | sample | quickstart | lm-eval | bench compare``: the command line.

Common options are flags; everything else comes from a YAML config (``--config``) and
``key=value`` overrides (``train.lr=3e-4 model.n_layer=6``). Bad input ends in one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from dlm.errors import DlmError

# Keys a resumed run may change; everything else must stay as the run was started.
# train.batch_size and train.parallel may change so that a run can move to another number of
# processes: keep batch_size × processes constant to follow the same global batch.
# train.compile changes how the steps run, not what they compute (checkpoints are the same either way).
RESUMABLE = {"train.steps", "train.time_budget_s", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
             "train.device", "train.batch_size", "train.parallel", "train.compile"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    # (``--init-from`` is not a config flag: it picks the base config, see _init_from_config)


def _asked(args) -> dict[str, Any]:
    """The settings this command line asks for, as flat ``key: value`` (config file, overrides, flags)."""
    from dlm.config import load_yaml, migrate, parse_override, resolve_config_path

    asked: dict[str, Any] = {}
    if args.config:
        asked.update(_flatten(migrate(load_yaml(resolve_config_path(args.config)))))
    for text in args.overrides:
        key, value = parse_override(text)
        asked[key] = value
    asked.update({k: v for k, v in _train_flags(args).items() if v is not None})
    return asked


def _resume_config(out: Path, args):
    """The saved config, with only the RESUMABLE keys changed by the command line."""
    from dlm.checkpoint import read_run_config
    from dlm.config import apply_dict, finalize, from_dict, migrate, nest

    saved = read_run_config(out)
    cfg = from_dict(copy.deepcopy(saved.to_dict()))
    before = _flatten(saved.to_dict())
    for key, value in _asked(args).items():
        apply_dict(cfg, migrate(nest(key, value)))
    finalize(cfg)
    after = _flatten(cfg.to_dict())
    changed = [k for k in {**before, **after} if after.get(k) != before.get(k) and k not in RESUMABLE]
    if changed:
        k = changed[0]
        raise DlmError(
            f"--resume keeps the run's settings: {k} is {before.get(k)!r} in {out} but {after.get(k)!r} here "
            f"(only {', '.join(sorted(RESUMABLE))} may change)"
        )
    return cfg


def _init_from_config(args):
    """Fine-tuning: the source run's config (family, objective, model shape, tokenizer) with
    the command line on top; the source's weights are loaded by the trainer, its optimiser is not."""
    from dlm.checkpoint import latest_checkpoint, read_run_config
    from dlm.config import apply_dict, finalize, from_dict, migrate, nest

    source = Path(args.init_from)
    src = read_run_config(source)
    latest_checkpoint(source)  # a run with no checkpoint has no weights to start from
    if args.family and args.family != src.family:
        raise DlmError(f"--init-from {source} is a '{src.family}' run, not '{args.family}': fine-tuning keeps "
                       f"the run's family and model (drop --family)")
    if args.tokenizer and args.tokenizer != src.data.tokenizer:
        raise DlmError(f"--init-from {source} was trained with the '{src.data.tokenizer}' tokenizer, not "
                       f"'{args.tokenizer}': fine-tuning keeps the run's tokenizer (drop --tokenizer)")
    cfg = from_dict(src.to_dict())
    asked = _asked(args)
    if asked.get("objective", cfg.objective.name) != cfg.objective.name:
        cfg.objective = type(cfg.objective)()  # another objective: the source's settings were its own
    for key, value in asked.items():
        apply_dict(cfg, migrate(nest(key, value)))
    cfg.train.init_from = str(source)
    return finalize(cfg)


def cmd_train(args) -> int:
    from dlm.config import build_config
    from dlm.train import train

    out = Path(args.out)
    if args.resume:
        cfg = _resume_config(out, args)
    elif args.init_from:
        cfg = _init_from_config(args)
    else:
        flags = {k: v for k, v in _train_flags(args).items() if v is not None}
        cfg = build_config(args.config, args.overrides, flags)
    result = train(cfg, out, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    summary = {
        "run": str(out),
        "step": result.step,
        "loss": result.loss,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "elapsed_s": round(result.elapsed_s, 1),
        "params": result.params,
        **({"compile_s": round(result.compile_s, 1)} if cfg.train.compile else {}),
    }
    compiled = f"; compiling {result.compile_s:.0f} s (inductor's start-up and the first step)" if cfg.train.compile else ""
    print(json.dumps(summary) if args.json else f"trained {out}: step {result.step}, loss {result.loss:.4f}, "
          f"{result.tokens_per_s:,.0f} tokens/s, {result.elapsed_s:.0f} s{compiled}")
    if result.interrupted:
        print(f"stopped by {result.interrupted}; the checkpoint is saved: continue with "
              f"`dlm train --out {out} --resume`", file=sys.stderr)
        return 130 if result.interrupted == "SIGINT" else 143
    return 0


def _evaluate_run(run, data: str | None, split: str, mc_samples: int | None, max_tokens: int | None,
                  batch_size: int | None, seed: int) -> dict:
    from dlm.data import prepare_data
    from dlm.device import generator
    from dlm.evaluate import evaluate_likelihood, select_rows

    cfg = run.cfg
    own = prepare_data(cfg.data, run.tokenizer)
    target = prepare_data(dataclasses.replace(cfg.data, data=data), run.tokenizer) if data else own
    rows, clean = target.rows(split, cfg.data.seq_len)
    keep = select_rows(rows, cfg.eval.max_tokens if max_tokens is None else max_tokens)
    result = evaluate_likelihood(
        run.family, run.model, rows[keep], run.tokenizer, generator(run.device, seed),
        mc_samples=cfg.eval.mc_samples if mc_samples is None else mc_samples,
        batch_size=cfg.eval.batch_size if batch_size is None else batch_size,
        train_stream=own.train,
        clean=None if clean is None else clean[keep],
    )
    result.update({"run": str(run.path), "step": run.step, "family": cfg.family, "data": data or cfg.data.data, "split": split})
    return result


def _sample_quality(run, judge_name: str | None, num: int, settings, batch: int, seed: int) -> dict:
    """Gen PPL under a judge and the entropy of ``num`` unconditional samples, drawn ``batch`` at a time."""
    from dlm.evaluate import generative_perplexity, sample_documents, sample_entropy
    from dlm.judge import load_judge

    cfg = run.cfg
    if num < 1:
        raise DlmError(f"--samples must be ≥ 1, got {num}")
    if batch < 1:
        raise DlmError(f"--sample-batch must be ≥ 1, got {batch}")
    judge = load_judge(judge_name, run.device)  # before sampling: a bad judge fails at once
    length = cfg.data.seq_len
    tokens, nfe, seconds = _generate(run, num, length, None, settings, seed, batch)
    tokens = tokens.numpy()  # (num, length)
    result = {
        "samples": num,
        "sample_length": length,
        "sample_steps": run.family.network_steps(settings, length),
        "sample_nfe": nfe,
        "sample_seconds": seconds,
        "sample_tokens_per_s": num * length / seconds,
        "sampler": cfg.sampler.name,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
    }
    result.update(generative_perplexity(judge, sample_documents(tokens, run.tokenizer)))
    result.update(sample_entropy(tokens, run.tokenizer.eos_id))
    return result


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
    kind = "upper bound (NELBO, %d MC samples)" % r["mc_samples"] if r["bound"] else "exact"
    if "bound_steps" in r:  # discrete time: which model's bound (every step, or a stride of them)
        kind += f", {r['bound_steps']}-step model (T = {r['process_steps']}, stride {r['time_stride']})"
    if r.get("log_t_share"):  # importance sampling of small t
        kind += f", {r['log_t_share']:.0%} of t log-uniform"
    if r.get("carry"):  # usdm: the bound of another x_θ than the network's softmax (docs/uniform.md)
        kind += f", x_θ = {r['x_theta']}"
    lines = [
        f"{r['family']} run {r['run']} at step {r['step']}, {r['data']} [{r['split']}], "
        f"{r['tokens']:,} tokens in {r['sequences']} sequences of {r['seq_len']} — {kind}",
        f"  nll            {r['nll']:.4f} ± {r['stderr']:.4f} nats/token",
        f"  perplexity     {r['ppl']:.2f}",
        f"  bits/token     {r['bits_per_token']:.4f}",
        f"  bits/byte      {r['bits_per_byte']:.4f} ± {r['stderr_bits_per_byte']:.4f}",
    ]
    if "unigram_bits_per_byte" in r:
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


def cmd_eval(args) -> int:
    from dlm.runs import load_run

    _check_seed(args.seed)
    if args.samples is None and args.answers is None and args.no_likelihood:
        raise DlmError("--no-likelihood leaves nothing to evaluate: add --samples N or --answers N")
    if args.samples is not None and args.samples < 1:
        raise DlmError(f"--samples must be ≥ 1, got {args.samples}")
    if args.answers is not None and args.answers < 1:
        raise DlmError(f"--answers must be ≥ 1, got {args.answers}")
    for flag, value in (("--mc-samples", args.mc_samples), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise DlmError(f"{flag} must be ≥ 1, got {value}")
    if args.max_tokens is not None and args.max_tokens < 0:
        raise DlmError(f"--max-tokens must be ≥ 0 (0: all), got {args.max_tokens}")
    if args.time_stride is not None and args.time_stride < 1:
        raise DlmError(f"--time-stride must be ≥ 1, got {args.time_stride}")
    if args.log_t_share is not None and not 0.0 <= args.log_t_share < 1.0:  # NaN too
        raise DlmError(f"--log-t-share must be in [0, 1), got {args.log_t_share}")
    run = load_run(Path(args.run), args.device, use_ema=not args.no_ema)
    if args.log_t_share is not None:
        if not run.family.bound_draws_time(run.cfg):
            raise DlmError(f"--log-t-share is for bounds integrated over a random time (usdm, mdlm with time "
                           f"conditioning); {args.run}'s {run.family.bound_kind(run.cfg)}")
        run.cfg.eval.log_t_share = args.log_t_share
    if args.time_stride is not None:
        if not run.family.discrete_time:
            raise DlmError(f"--time-stride is for discrete-time runs (d3pm); {args.run} is a '{run.cfg.family}' run")
        run.cfg.eval.time_stride = args.time_stride
    if args.carry is not None:
        if not hasattr(run.family, "set_carry"):
            raise DlmError(f"--carry is for uniform-state runs (usdm); {args.run} is a '{run.cfg.family}' run")
        run.family.set_carry(args.carry)
    settings = _sampler_settings(run, args.steps, args.temperature, args.top_k, args.top_p, args.sampler, args.overrides)
    answer_rows = _answer_rows(run, args.data, args.split, args.answers) if args.answers is not None else None
    if args.no_likelihood:
        result = {"run": str(run.path), "step": run.step, "family": run.cfg.family}
    else:
        result = _evaluate_run(run, args.data, args.split, args.mc_samples, args.max_tokens, args.batch_size, args.seed)
    if args.samples is not None:
        result.update(_sample_quality(run, args.judge, args.samples, settings, args.sample_batch, args.seed))
    if answer_rows is not None:  # greedy unless --temperature is given
        greedy = _sampler_settings(run, args.steps, 0.0 if args.temperature is None else args.temperature,
                                   args.top_k, args.top_p, args.sampler, args.overrides)
        result.update(_answer_quality(run, answer_rows, greedy, args.sample_batch, args.seed))
    if args.json:
        print(json.dumps(result))
    else:
        text = [_format_eval(result)] if "nll" in result or "gen_ppl" in result else [
            f"{result['family']} run {result['run']} at step {result['step']}"]
        print("\n".join(text + ([_format_answers(result)] if answer_rows is not None else [])))
    return 0


def _answer_rows(run, data: str | None, split: str, num: int):
    """The first ``num`` prompt/response rows of ``split`` and their clean (prompt) masks."""
    from dlm.data import is_pairs_data, prepare_data

    spec = data or run.cfg.data.data
    if not is_pairs_data(spec):
        raise DlmError(f"--answers needs a run fine-tuned on prompt/response pairs (or --data pairs); "
                       f"'{spec}' is plain text")
    rows, clean = prepare_data(dataclasses.replace(run.cfg.data, data=spec), run.tokenizer).rows(split, run.cfg.data.seq_len)
    return rows[:num], clean[:num]


def _answer_quality(run, answer_rows, settings, batch: int, seed: int) -> dict:
    """Exact match and token accuracy of the answers generated after each prompt."""
    from dlm.device import generator
    from dlm.evaluate import answer_accuracy

    if batch < 1:
        raise DlmError(f"--sample-batch must be ≥ 1, got {batch}")
    rows, clean = answer_rows
    result = answer_accuracy(run.family, run.model, rows, clean, run.tokenizer, generator(run.device, seed),
                             settings, batch_size=batch)
    result.update({"answer_temperature": settings.temperature, "answer_steps": run.family.network_steps(settings, rows.shape[1])})
    return result


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


def _sampler_settings(run, steps: int | None = None, temperature: float | None = None,
                      top_k: int | None = None, top_p: float | None = None, name: str | None = None,
                      overrides: list[str] | tuple = ()):
    """Choose the run's sampler (or ``--sampler NAME``) with the run's ``sampler`` settings,
    then ``sampler.KEY=VALUE`` overrides and the flags on top, checked in one place."""
    from dlm.config import ComponentConfig, parse_override

    own = run.cfg.sampler
    settings = dict(own.settings)
    if name is not None and name != own.name:  # another sampler: keep only the settings it shares
        fields = {f.name for f in dataclasses.fields(run.family.samplers.get(name).Settings)}
        settings = {k: v for k, v in settings.items() if k in fields}
    for text in overrides:
        key, value = parse_override(text)
        if not key.startswith("sampler.") or key == "sampler.name":
            raise DlmError(f"only sampler settings can be given here (sampler.KEY=VALUE), got '{key}'")
        settings[key[len("sampler."):]] = value
    flags = {"steps": steps, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    settings.update({k: v for k, v in flags.items() if v is not None})
    try:
        return run.family.choose_sampler(ComponentConfig(name or own.name, settings))
    except DlmError as e:  # name the flag the user typed, not the config key
        message = str(e)
        for key, value in flags.items():
            if value is not None:
                message = message.replace(f"config key 'sampler.{key}'", "--" + key.replace("_", "-"))
        raise DlmError(message) from None


def _generate(run, num: int, length: int, prompt_ids, settings, seed: int, batch: int | None = None):
    """(tokens (num, length) on the CPU, network calls per batch, sampling seconds), drawn
    ``batch`` samples at a time (default: all at once) from one seeded generator."""
    import torch

    from dlm.device import generator

    gen = generator(run.device, seed)
    batch = batch or num
    rows, nfe, seconds = [], 0, 0.0
    for start in range(0, num, batch):
        t0 = time.perf_counter()
        with torch.no_grad():
            tokens, nfe = run.family.generate(run.model, min(batch, num - start), length, prompt_ids, gen, settings)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        rows.append(tokens.cpu())
    return torch.cat(rows), nfe, seconds


def _answer_text(tokenizer, prompt: str, row, n_prompt: int) -> str:
    """The prompt as typed, then the generated tokens up to the first end-of-text."""
    generated = [int(i) for i in row[n_prompt:]]
    if tokenizer.eos_id in generated:
        generated = generated[: generated.index(tokenizer.eos_id)]
    return prompt + tokenizer.decode(generated)


def _infill(run, template: str, num: int, settings, seed: int) -> tuple[list[str], int, float, int]:
    """Samples of ``template`` with every ``[MASK*N]`` hole filled (text outside kept byte for byte)."""
    import torch

    from dlm.device import generator
    from dlm.infill import parse_template

    tmpl = parse_template(template, run.tokenizer, run.cfg.data.seq_len)
    given = torch.as_tensor(tmpl.ids, dtype=torch.long, device=run.device)[None].expand(num, -1).clone()
    clean = torch.as_tensor(tmpl.clean, dtype=torch.bool, device=run.device)[None].expand(num, -1).clone()
    t0 = time.perf_counter()
    with torch.no_grad():
        tokens, nfe = run.family.sample(run.model, given, clean, generator(run.device, seed), settings)
    seconds = time.perf_counter() - t0
    return [tmpl.fill(run.tokenizer, row.tolist()) for row in tokens.cpu()], nfe, seconds, len(tmpl.ids)


def _sample_run(run, num: int, steps: int | None, length: int | None, prompt: str | None,
                temperature: float | None, top_k: int | None, top_p: float | None, seed: int,
                infill: str | None = None, sampler: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    import torch

    cfg = run.cfg
    if num < 1:
        raise DlmError(f"--num must be ≥ 1, got {num}")
    if length is not None and not 1 <= length <= cfg.data.seq_len:
        raise DlmError(f"--length must be in [1, {cfg.data.seq_len}] (the sequence length this model was trained on), got {length}")
    settings = _sampler_settings(run, steps, temperature, top_k, top_p, sampler, overrides)
    if infill is not None:
        if prompt is not None or length is not None:
            raise DlmError("--infill gives the whole sequence: drop --prompt and --length")
        texts, nfe, seconds, length = _infill(run, infill, num, settings, seed)
    else:
        length = cfg.data.seq_len if length is None else length
        prompt_ids = None
        if prompt:
            prompt_ids = torch.as_tensor(run.tokenizer.encode(prompt), dtype=torch.long)
            if len(prompt_ids) >= length:
                raise DlmError(f"the prompt is {len(prompt_ids)} tokens, it must be shorter than --length {length}")
        tokens, nfe, seconds = _generate(run, num, length, prompt_ids, settings, seed)
        if prompt_ids is None:
            texts = [run.tokenizer.decode(row.tolist()) for row in tokens]
        else:  # an answer to the prompt: it stops at end-of-text
            texts = [_answer_text(run.tokenizer, prompt, row, len(prompt_ids)) for row in tokens]
    return {
        "samples": texts,
        "seconds": seconds,
        "tokens_per_s": num * length / seconds,
        "nfe": nfe,
        "steps": run.family.network_steps(settings, length),
        "length": length,
        "family": cfg.family,
        "step": run.step,
    }


def cmd_sample(args) -> int:
    from dlm.runs import load_run

    _check_seed(args.seed)
    run = load_run(Path(args.run), args.device, use_ema=not args.no_ema)
    result = _sample_run(run, args.num, args.steps, args.length, args.prompt, args.temperature, args.top_k, args.top_p,
                         args.seed, args.infill, args.sampler, args.overrides)
    if args.json:
        print(json.dumps(result))
    else:
        for i, text in enumerate(result["samples"]):
            print(f"──── sample {i + 1} ────\n{text}\n")
        print(f"{len(result['samples'])} samples of {result['length']} tokens in {result['seconds']:.2f} s "
              f"({result['nfe']} network calls)")
    return 0


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
    ev = _evaluate_run(run, None, "val", None, None, None, cfg.train.seed)
    samples = _sample_run(run, 4, None, None, None, None, None, None, cfg.train.seed)
    atomic_write_text(out / "eval.json", json.dumps(ev, indent=1))
    atomic_write_text(out / "samples.txt", "\n\n".join(f"──── sample {i + 1} ────\n{t}" for i, t in enumerate(samples["samples"])) + "\n")
    total = time.perf_counter() - t0
    summary = {"run": str(out), "train": result.__dict__, "eval": ev, "samples": samples, "wall_s": total}
    atomic_write_text(out / "quickstart.json", json.dumps(summary, indent=1))
    for i, text in enumerate(samples["samples"]):
        print(f"──── sample {i + 1} ────\n{text}\n")
    print(_format_eval(ev))
    print(f"\n{result.step} steps at {result.tokens_per_s:,.0f} tokens/s; quickstart took {total / 60:.1f} min. "
          f"Run folder: {out} (dlm eval {out} · dlm sample {out} --prompt 'ROMEO.')")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlm", description="Diffusion language models and their autoregressive baseline.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    t.add_argument("--config", help="YAML config file, or the name of a shipped config (e.g. quickstart)")
    t.add_argument("--family", help="mdlm | usdm | d3pm | ar")
    t.add_argument("--objective", help="the family's objective (mdlm: nelbo | nelbo-count | llada; "
                   "usdm: nelbo | naive | sddlm | sddlm-v1 | sddlm-v2; d3pm: hybrid; ar: ce)")
    t.add_argument("--schedule", help="loglinear | linear | cosine | geometric")
    t.add_argument("--data", help="built-in corpus (shakespeare), file, folder, wikitext-103 | openwebtext | lm1b | text8, or hf:REPO[:CONFIG]")
    t.add_argument("--tokenizer", help="char | byte | bpe | gpt2")
    t.add_argument("--vocab-size", type=int, help="bpe vocabulary size")
    t.add_argument("--size", help="tiny | mini | micro | small | medium")
    t.add_argument("--seq-len", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--steps", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--device")
    t.add_argument("--time-budget", type=float, help="stop after this many seconds (LR schedule follows time)")
    t.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help="under torchrun: ddp (default) or fsdp (FSDP2: weights, gradients, optimiser and EMA sharded)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the transformer blocks (compile time reported apart; --resume may switch it)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.add_argument("--init-from", help="fine-tune: start from this run's weights, config and tokenizer (fresh optimiser)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=3e-4")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="likelihood (NLL, PPL, bits per token and per byte) of a run, and sample quality")
    e.add_argument("run")
    e.add_argument("--data", help="evaluate on this data (tokenised with the run's tokenizer)")
    e.add_argument("--split", choices=["val", "train"], default="val")
    e.add_argument("--mc-samples", type=int, help="diffusion: Monte Carlo time samples per sequence")
    e.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens (0: all)")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--time-stride", type=int, help="d3pm: the bound of the T/K-step model (every K-th step term; "
                   "default: the run's eval.time_stride)")
    e.add_argument("--carry", type=float, help="usdm: bound the model whose x_θ = (1 − λ)·softmax + λ·e_{x_t} "
                   "(λ in [0, 1); default 0, the network's own x_θ; docs/uniform.md)")
    e.add_argument("--log-t-share", type=float, help="usdm, mdlm with time conditioning: the share of Monte Carlo "
                   "times drawn log-uniformly on [1e-5, 1], importance-weighted (in [0, 1); default: the run's "
                   "eval.log_t_share, else the family's: usdm 0.25, mdlm 0)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    e.add_argument("--json", action="store_true")
    e.add_argument("--samples", type=int, help="also draw this many unconditional samples and report their Gen PPL and entropy")
    e.add_argument("--steps", type=int, help="diffusion steps for --samples and --answers (default: the run's sampler.steps; ignored by ar)")
    e.add_argument("--judge", help="judge for Gen PPL: smollm2-135m (default) or a local Hugging Face causal-LM folder")
    e.add_argument("--sample-batch", type=int, default=16, help="samples (or answers) drawn per batch (default 16)")
    e.add_argument("--temperature", type=float)
    e.add_argument("--top-k", type=int)
    e.add_argument("--top-p", type=float)
    e.add_argument("--answers", type=int, help="pairs runs: answer the first N prompts of --split (greedy unless "
                   "--temperature) and report exact match and token accuracy against the responses")
    e.add_argument("--no-likelihood", action="store_true", help="with --samples or --answers: skip the likelihood evaluation")
    e.add_argument("--sampler", help="the family's sampler for --samples / --answers (default: the run's)")
    e.add_argument("overrides", nargs="*", help="sampler settings for --samples / --answers, e.g. sampler.top_p=0.9")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="generate text from a run")
    s.add_argument("run")
    s.add_argument("--num", type=int, default=4)
    s.add_argument("--steps", type=int, help="diffusion steps (ignored by ar: one step per token)")
    s.add_argument("--length", type=int, help="tokens per sample (default: the training seq_len)")
    s.add_argument("--prompt", help="text the samples start with (kept fixed); each answer stops at end-of-text")
    s.add_argument("--infill", help="a template whose [MASK*N] holes (N tokens each) are filled, the text around them kept")
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--no-ema", action="store_true")
    s.add_argument("--json", action="store_true")
    s.add_argument("--sampler", help="the family's sampler to use (default: the run's sampler.name)")
    s.add_argument("overrides", nargs="*", help="sampler settings, e.g. sampler.steps=64")
    s.set_defaults(func=cmd_sample)

    q = sub.add_parser("quickstart", help="train, evaluate and sample a small MDLM on the built-in corpus")
    q.add_argument("--out", help="run folder (default: runs/quickstart, or the next free runs/quickstart-N)")
    q.add_argument("--family", help="mdlm (default) or ar")
    q.add_argument("--steps", type=int)
    q.add_argument("--device")
    q.add_argument("--quiet", action="store_true")
    q.add_argument("overrides", nargs="*", help="key=value config overrides")
    q.set_defaults(func=cmd_quickstart)

    le = sub.add_parser("lm-eval", help="run EleutherAI lm-evaluation-harness tasks on a run (pip install 'dlm[lm-eval]')")
    le.add_argument("run")
    le.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    le.add_argument("--include-path", help="a folder of task YAMLs (local tasks)")
    le.add_argument("--limit", type=int, help="at most this many documents per task")
    le.add_argument("--mc-samples", type=int, help="diffusion: Monte Carlo samples per log-likelihood (default: the run's eval.mc_samples)")
    le.add_argument("--batch-size", type=int, help="rows per network call (default: the run's eval.batch_size)")
    le.add_argument("--seed", type=int, default=0)
    le.add_argument("--device", default="auto")
    le.add_argument("--json", action="store_true", help="print lm-eval's result dict as JSON")
    le.set_defaults(func=cmd_lm_eval)

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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may stand before, between or after the flags
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv  # the command as typed, for reports (None: sys.argv)
    try:
        return args.func(args)
    except DlmError as e:
        print(f"dlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlm: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise  # a bug: its traceback must reach us
        print(f"dlm: error: out of memory: {_allocation(e)} (lower --batch-size / --num / train.batch_size)",
              file=sys.stderr)
        return 2


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
