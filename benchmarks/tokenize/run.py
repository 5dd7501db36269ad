"""Tokenisation throughput (MB/s) into the sharded token cache, with 1 and 2 workers.

    nice -n 5 python benchmarks/tokenize/run.py [--gb 2] [--slice-mb 48] [--tmp /tmp/dlm-tokbench]

Generates a corpus of ``--gb`` GB under ``--tmp`` (a folder of 4 MB text files made of
windows of the built-in Shakespeare with random numbers inserted, so that no two files
are alike; a folder because dlm reads a single plain-text file whole, as one document), then, each in a fresh process so that peak memory is that run's own:

* the throughput matrix on the first ``--slice-mb`` MB of it: char, byte-level BPE (4096,
  trained on the slice's train split, at most its first 200 MB as dlm does) and gpt2,
  each with 1 worker (in-process) and 2 worker processes;
* one tokenisation of the whole multi-GB corpus (char tokenizer, 2 workers), which
  shows the shard layout and that the parent's memory stays flat.

MB/s counts the corpus's UTF-8 bytes (train + val) over the wall time of
``tokenize_cached`` alone (not loading the corpus nor training the BPE). Writes
results.json beside this file and removes everything it generated.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
FILE_MB = 4


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def generate(folder: Path, total_bytes: int, seed: int = 0) -> int:
    """A folder of FILE_MB-MB text files, ``total_bytes`` in all: windows of 200–2,000 lines
    of Shakespeare from random places, each line of a window ending in that window's random
    number (so that no two files are alike)."""
    import numpy as np

    from dlm.data.corpora import BUILTIN

    with gzip.open(BUILTIN["shakespeare"], "rt", encoding="utf-8") as f:
        text = "".join(json.loads(doc)["text"] for doc in f)
    starts = np.flatnonzero(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) == ord("\n")) + 1
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    written, i = 0, 0
    while written < total_bytes:
        out, size = [], 0
        while size < FILE_MB * 1_000_000:
            a = int(rng.integers(len(starts) - 2001))
            b = a + int(rng.integers(200, 2000))
            window = text[starts[a]: starts[b]].replace("\n", f" {int(rng.integers(10**7))}\n")
            out.append(window)
            size += len(window)
        data = "".join(out).encode("utf-8")
        (folder / f"part-{i:05d}.txt").write_bytes(data)
        written += len(data)
        i += 1
    return written


def peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux ≥ 4.0)
    except OSError:
        pass


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(corpus_dir: str, kind: str, workers: int) -> dict:
    """One tokenisation in this (fresh) process; the entry is deleted afterwards."""
    from dlm.data.cache import build_tokenizer, tokenize_cached
    from dlm.data.corpora import load_corpus

    t0 = time.perf_counter()
    corpus = load_corpus(corpus_dir, 0.05)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = build_tokenizer(kind, corpus, 4096, 0.05)
    build_s = time.perf_counter() - t0
    nbytes = sum(p.stat().st_size for p in Path(corpus_dir).iterdir())
    base = vm_hwm_mb()
    peak_rss_reset()
    before = os.times()
    t0 = time.perf_counter()
    folder = tokenize_cached(corpus, tok, 0.05, workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    after = os.times()
    cpu = (after.user - before.user) + (after.system - before.system) + \
          (after.children_user - before.children_user) + (after.children_system - before.children_system)
    meta = json.loads((folder / "meta.json").read_text())
    shutil.rmtree(folder)
    return {
        "tokenizer": kind, "vocab_size": tok.vocab_size, "workers": workers, "bytes": nbytes,
        "seconds": round(seconds, 2), "MB_per_s": round(nbytes / seconds / 1e6, 3),
        "tokens": meta["tokens"], "tokens_per_byte": round(sum(meta["tokens"].values()) / nbytes, 4),
        "cpu_seconds": round(cpu, 1), "cores_busy": round(cpu / seconds, 2),
        "parent_rss_before_mb": round(base, 1), "parent_peak_rss_mb": round(vm_hwm_mb(), 1),
        "largest_worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "shards": {split: [(s["file"], s["tokens"]) for s in meta["shards"][split]] for split in meta["shards"]},
        "dtype": meta["dtype"], "load_corpus_s": round(load_s, 2), "build_tokenizer_s": round(build_s, 2),
        "loadavg_after": loadavg(),
    }


def run_child(corpus_dir: Path, kind: str, workers: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(corpus_dir), kind, str(workers)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{kind:5s} workers={workers} {result['bytes'] / 1e6:8.0f} MB {result['seconds']:8.1f} s "
          f"{result['MB_per_s']:7.2f} MB/s cores {result['cores_busy']:.2f} peak RSS {result['parent_peak_rss_mb']:.0f} MB "
          f"(before {result['parent_rss_before_mb']:.0f}) shards {len(result['shards']['train'])}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--slice-mb", type=int, default=48)
    ap.add_argument("--tmp", default="/tmp/dlm-tokbench")
    ap.add_argument("--full-kind", default="char")
    ap.add_argument("--measure", nargs=3, metavar=("CORPUS", "KIND", "WORKERS"))
    args = ap.parse_args()
    if args.measure:
        corpus_dir, kind, workers = args.measure
        print(json.dumps(measure(corpus_dir, kind, int(workers))))
        return

    tmp = Path(args.tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    env = {**os.environ, "DLM_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    started = time.time()
    results: dict = {
        "command": "nice -n 5 python benchmarks/tokenize/run.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": lscpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": loadavg(),
                    "note": "shared machine: other developers' jobs were running (see the load averages)"},
    }
    try:
        full = tmp / "corpus"
        t0 = time.time()
        total = generate(full, int(args.gb * 1e9))
        results["corpus"] = {"bytes": total, "files": len(list(full.iterdir())), "file_mb": FILE_MB,
                             "generate_s": round(time.time() - t0, 1)}
        print(f"generated {total / 1e9:.2f} GB in {time.time() - t0:.0f} s", flush=True)
        part = tmp / "slice"
        part.mkdir()
        for f in sorted(full.iterdir())[: max(1, args.slice_mb // FILE_MB)]:
            os.link(f, part / f.name)

        matrix = []
        for kind in ("char", "bpe", "gpt2"):
            for workers in (1, 2):
                matrix.append(run_child(part, kind, workers, env))
        results["slice"] = matrix
        results["full"] = run_child(full, args.full_kind, 2, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["loadavg_end"] = loadavg()
    results["wall_s"] = round(time.time() - started, 1)
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {HERE / 'results.json'} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
