"""``dlm train | eval | sample | quickstart``: the command line.

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
import sys
import time
from pathlib import Path
from typing import Any

from dlm.errors import DlmError

# Keys a resumed run may change; everything else must stay as the run was started.
RESUMABLE = {"train.steps", "train.time_budget_s", "train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.device"}


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
    }


def _resume_config(out: Path, args):
    """The saved config, with only the RESUMABLE keys changed by the command line."""
    from dlm.checkpoint import read_run_config
    from dlm.config import apply_dict, build_config, from_dict, load_yaml, nest, parse_override, resolve_config_path

    saved = read_run_config(out)
    asked: dict[str, Any] = {}
    if args.config:
        asked.update(_flatten(load_yaml(resolve_config_path(args.config))))
    for text in args.overrides:
        key, value = parse_override(text)
        asked[key] = value
    asked.update({k: v for k, v in _train_flags(args).items() if v is not None})
    build_config(None, [], asked)  # validates the keys and types
    cfg = from_dict(copy.deepcopy(saved.to_dict()))
    before = _flatten(saved.to_dict())
    for key, value in asked.items():
        apply_dict(cfg, nest(key, value))
    after = _flatten(cfg.to_dict())
    changed = [k for k in after if after[k] != before[k] and k not in RESUMABLE]
    if changed:
        k = changed[0]
        raise DlmError(
            f"--resume keeps the run's settings: {k} is {before[k]!r} in {out} but {after[k]!r} here "
            f"(only {', '.join(sorted(RESUMABLE))} may change)"
        )
    return cfg


def cmd_train(args) -> int:
    from dlm.config import build_config
    from dlm.train import train

    out = Path(args.out)
    if args.resume:
        cfg = _resume_config(out, args)
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
    }
    print(json.dumps(summary) if args.json else f"trained {out}: step {result.step}, loss {result.loss:.4f}, "
          f"{result.tokens_per_s:,.0f} tokens/s, {result.elapsed_s:.0f} s")
    if result.interrupted:
        print(f"stopped by {result.interrupted}; the checkpoint is saved: continue with "
              f"`dlm train --out {out} --resume`", file=sys.stderr)
        return 130 if result.interrupted == "SIGINT" else 143
    return 0


def _evaluate_run(run, data: str | None, split: str, mc_samples: int | None, max_tokens: int | None,
                  batch_size: int | None, seed: int) -> dict:
    from dlm.data import prepare_data
    from dlm.device import generator
    from dlm.evaluate import evaluate_likelihood, select_blocks

    cfg = run.cfg
    own = prepare_data(cfg.data, run.tokenizer)
    target = prepare_data(dataclasses.replace(cfg.data, data=data), run.tokenizer) if data else own
    stream = target.val if split == "val" else target.train
    L = cfg.data.seq_len
    blocks = select_blocks(stream, L, cfg.eval.max_tokens if max_tokens is None else max_tokens)
    result = evaluate_likelihood(
        run.family, run.model, blocks, run.tokenizer, generator(run.device, seed),
        mc_samples=mc_samples or cfg.eval.mc_samples,
        batch_size=batch_size or cfg.eval.batch_size,
        train_stream=own.train,
    )
    result.update({"run": str(run.path), "step": run.step, "family": cfg.family, "data": data or cfg.data.data, "split": split})
    return result


def _sample_quality(run, judge_name: str | None, num: int, steps: int | None, batch: int,
                    temperature: float | None, top_k: int | None, top_p: float | None, seed: int) -> dict:
    """Gen PPL under a judge and the entropy of ``num`` unconditional samples, drawn ``batch`` at a time."""
    from dlm.evaluate import generative_perplexity, sample_documents, sample_entropy
    from dlm.judge import load_judge

    cfg = run.cfg
    if num < 1:
        raise DlmError(f"--samples must be ≥ 1, got {num}")
    if batch < 1:
        raise DlmError(f"--sample-batch must be ≥ 1, got {batch}")
    steps = _sampling_steps(cfg, steps)
    opts = _sampling_options(cfg, temperature, top_k, top_p)
    judge = load_judge(judge_name, run.device)  # before sampling: a bad judge fails at once
    length = cfg.data.seq_len
    tokens, nfe, seconds = _generate(run, num, length, None, steps, opts, seed, batch)
    tokens = tokens.numpy()  # (num, length)
    result = {
        "samples": num,
        "sample_length": length,
        "sample_steps": steps if run.family.name != "ar" else length,
        "sample_nfe": nfe,
        "sample_seconds": seconds,
        "sample_tokens_per_s": num * length / seconds,
        "temperature": opts.temperature,
        "top_k": opts.top_k,
        "top_p": opts.top_p,
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


def cmd_eval(args) -> int:
    from dlm.runs import load_run

    if args.samples is None and args.no_likelihood:
        raise DlmError("--no-likelihood leaves nothing to evaluate: add --samples N")
    if args.samples is not None and args.samples < 1:
        raise DlmError(f"--samples must be ≥ 1, got {args.samples}")
    if args.steps is not None and args.steps < 1:
        raise DlmError(f"--steps must be ≥ 1, got {args.steps}")
    run = load_run(Path(args.run), args.device, use_ema=not args.no_ema)
    if args.no_likelihood:
        result = {"run": str(run.path), "step": run.step, "family": run.cfg.family}
    else:
        result = _evaluate_run(run, args.data, args.split, args.mc_samples, args.max_tokens, args.batch_size, args.seed)
    if args.samples is not None:
        result.update(_sample_quality(run, args.judge, args.samples, args.steps, args.sample_batch,
                                      args.temperature, args.top_k, args.top_p, args.seed))
    print(json.dumps(result) if args.json else _format_eval(result))
    return 0


def _sampling_options(cfg, temperature: float | None, top_k: int | None, top_p: float | None):
    """The run's ``sample`` config with the command line's values on top, checked."""
    from dlm.samplers import SamplingOptions

    opts = SamplingOptions(
        temperature=cfg.sample.temperature if temperature is None else temperature,
        top_k=cfg.sample.top_k if top_k is None else top_k,
        top_p=cfg.sample.top_p if top_p is None else top_p,
    )
    opts.check()
    return opts


def _sampling_steps(cfg, steps: int | None) -> int:
    """``--steps``, or the run's ``sample.steps``, checked."""
    steps = steps or cfg.sample.steps
    if steps < 1:
        raise DlmError(f"--steps must be ≥ 1, got {steps}")
    return steps


def _generate(run, num: int, length: int, prompt_ids, steps: int, opts, seed: int, batch: int | None = None):
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
            tokens, nfe = run.family.sample(run.model, min(batch, num - start), length, prompt_ids, gen, steps, opts)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        rows.append(tokens.cpu())
    return torch.cat(rows), nfe, seconds


def _sample_run(run, num: int, steps: int | None, length: int | None, prompt: str | None,
                temperature: float | None, top_k: int | None, top_p: float | None, seed: int) -> dict:
    import torch

    cfg = run.cfg
    if num < 1:
        raise DlmError(f"--num must be ≥ 1, got {num}")
    length = length or cfg.data.seq_len
    if not 1 <= length <= cfg.data.seq_len:
        raise DlmError(f"--length must be in [1, {cfg.data.seq_len}] (the sequence length this model was trained on), got {length}")
    steps = _sampling_steps(cfg, steps)
    opts = _sampling_options(cfg, temperature, top_k, top_p)
    prompt_ids = None
    if prompt:
        prompt_ids = torch.as_tensor(run.tokenizer.encode(prompt), dtype=torch.long)
        if len(prompt_ids) >= length:
            raise DlmError(f"the prompt is {len(prompt_ids)} tokens, it must be shorter than --length {length}")
    tokens, nfe, seconds = _generate(run, num, length, prompt_ids, steps, opts, seed)
    texts = [run.tokenizer.decode(row.tolist()) for row in tokens]
    return {
        "samples": texts,
        "seconds": seconds,
        "tokens_per_s": num * length / seconds,
        "nfe": nfe,
        "steps": steps if run.family.name != "ar" else length,
        "length": length,
        "family": cfg.family,
        "step": run.step,
    }


def cmd_sample(args) -> int:
    from dlm.runs import load_run

    run = load_run(Path(args.run), args.device, use_ema=not args.no_ema)
    result = _sample_run(run, args.num, args.steps, args.length, args.prompt, args.temperature, args.top_k, args.top_p, args.seed)
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
    if args.family and not any(o.startswith("objective=") for o in args.overrides):
        cfg.objective = None  # the shipped objective is MDLM's: another family takes its own default
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlm", description="Diffusion language models and their autoregressive baseline.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    t.add_argument("--config", help="YAML config file, or the name of a shipped config (e.g. quickstart)")
    t.add_argument("--family", help="mdlm | usdm | ar")
    t.add_argument("--objective", help="the family's objective (mdlm: nelbo | nelbo-count | llada; "
                   "usdm: nelbo | naive | sddlm | sddlm-v1 | sddlm-v2; ar: ce)")
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
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
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
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    e.add_argument("--json", action="store_true")
    e.add_argument("--samples", type=int, help="also draw this many unconditional samples and report their Gen PPL and entropy")
    e.add_argument("--steps", type=int, help="diffusion steps for --samples (default: the run's sample.steps; ignored by ar)")
    e.add_argument("--judge", help="judge for Gen PPL: smollm2-135m (default) or a local Hugging Face causal-LM folder")
    e.add_argument("--sample-batch", type=int, default=16, help="samples drawn per batch (default 16)")
    e.add_argument("--temperature", type=float)
    e.add_argument("--top-k", type=int)
    e.add_argument("--top-p", type=float)
    e.add_argument("--no-likelihood", action="store_true", help="with --samples: skip the likelihood evaluation")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="generate text from a run")
    s.add_argument("run")
    s.add_argument("--num", type=int, default=4)
    s.add_argument("--steps", type=int, help="diffusion steps (ignored by ar: one step per token)")
    s.add_argument("--length", type=int, help="tokens per sample (default: the training seq_len)")
    s.add_argument("--prompt", help="text the samples start with (kept fixed)")
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--no-ema", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sample)

    q = sub.add_parser("quickstart", help="train, evaluate and sample a small MDLM on the built-in corpus")
    q.add_argument("--out", help="run folder (default: runs/quickstart, or the next free runs/quickstart-N)")
    q.add_argument("--family", help="mdlm (default) or ar")
    q.add_argument("--steps", type=int)
    q.add_argument("--device")
    q.add_argument("--quiet", action="store_true")
    q.add_argument("overrides", nargs="*", help="key=value config overrides")
    q.set_defaults(func=cmd_quickstart)
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
    try:
        return args.func(args)
    except DlmError as e:
        print(f"dlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
