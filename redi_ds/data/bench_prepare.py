"""Throughput and memory of ``redi_ds.data.prepare`` on a generated OpenR1-Math-Raw-shaped input.

    python -m redi_ds.data.bench_prepare [--problems 100000] [--gens 4] [--chars 4000] [--num-proc 2]

Writes a JSONL input of ``--problems`` rows, each with ``--gens`` generations of about ``--chars`` characters
(math-flavoured text from a fixed vocabulary, seeded), the raw ``correctness`` struct of lists, ~8% invalid
problems and ~10% cn_k12 rows; then runs the full paper recipe (decontamination, tokenizer, limits) and prints
problems/s, input MB/s and the peak memory of the whole process tree (sampled every 0.5 s). Not a test.
Use ``--sizes 10000,100000`` to run several sizes in one go and see that memory stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import threading
import time

WORDS = (
    "we need to find the value of x such that the equation holds . let me compute step by step : first , "
    "note that the sum of the roots is equal to so therefore wait , let me check again . "
    "\\frac{a}{b} \\sqrt{2} x^2 + 3x - 4 = 0 ( x + 4 ) ( x - 1 ) hmm , that gives 12 , 7 , 3.5 and "
    "since the triangle is isosceles , the angles at the base are equal , which means "
).split()
SOURCES = ["olympiads", "amc_aime", "aops_forum", "inequalities", "number_theory", "cn_contest", "cn_k12"]


def _text(rng: random.Random, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def generate(path: str, problems: int, gens: int, chars: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    pool = [_text(rng, chars) for _ in range(256)]  # long texts are reused (with a unique prefix): fast to make
    with open(path, "w", encoding="utf-8") as f:
        for i in range(problems):
            llama = [rng.random() < 0.6 for _ in range(gens)]
            mv = [rng.random() < 0.7 for _ in range(gens)]
            row = {
                "problem": f"Problem {i}. " + _text(rng, 300),
                "answer": str(rng.randint(1, 999)),
                "source": rng.choice(SOURCES) if rng.random() < 0.7 else SOURCES[i % 6],
                "problem_is_valid": "no" if rng.random() < 0.08 else "yes",
                "generations": [f"<think>{i}.{g} " + rng.choice(pool) + f" \\boxed{{{g}}}" for g in range(gens)],
                "correctness": {"llama_verification": llama, "math_verify_answer": mv,
                                "math_verify_reparsed_answer": mv},
                "finish_reasons": ["stop"] * gens,
            }
            f.write(json.dumps(row) + "\n")
    return os.path.getsize(path)


def _pss_anon(pid: int) -> int:
    """Proportional anonymous memory (the heap; pages shared with forked workers split between them), from
    /proc/PID/smaps_rollup; 0 where the kernel does not report it."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS:
    """Peak memory of this process plus its children, sampled in a thread: the summed RSS (counts pages that
    forked workers share with the parent once per process), the summed PSS (shared pages split; includes the
    page cache of memory-mapped Arrow files that were read) and the summed anonymous PSS (the heap only)."""

    def __init__(self, every: float = 0.5):
        import psutil

        self.proc, self.every, self._stop = psutil.Process(), every, threading.Event()
        self.peak = self.peak_pss = self.peak_anon = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            rss = pss = anon = 0
            for p in [self.proc] + self.proc.children(recursive=True):
                try:
                    info = p.memory_full_info()
                    rss, pss, anon = rss + info.rss, pss + getattr(info, "pss", info.rss), anon + _pss_anon(p.pid)
                except psutil.Error:
                    pass
            self.peak, self.peak_pss, self.peak_anon = max(self.peak, rss), max(self.peak_pss, pss), max(
                self.peak_anon, anon)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_one(problems: int, gens: int, chars: int, num_proc: int, work: str) -> dict:
    from redi_ds.data.prepare import PrepareOptions, prepare

    src = os.path.join(work, f"bench-{problems}.jsonl")
    t0 = time.time()
    nbytes = generate(src, problems, gens, chars)
    gen_s = time.time() - t0
    out = os.path.join(work, f"out-{problems}")
    with PeakRSS() as mem:
        t0 = time.time()
        stats = prepare(PrepareOptions(source=src, out=out, num_proc=num_proc, quiet=True))
        wall = time.time() - t0
    os.remove(src)
    shutil.rmtree(out, ignore_errors=True)
    c = stats["counts"]
    return {
        "problems": problems, "generations_per_problem": gens, "chars_per_generation": chars,
        "input_mb": round(nbytes / 1e6, 1), "generate_s": round(gen_s, 1), "num_proc": num_proc,
        "wall_s": round(wall, 1), "problems_per_s": round(problems / wall, 1),
        "input_mb_per_s": round(nbytes / 1e6 / wall, 2), "peak_rss_mb": round(mem.peak / 2**20),
        "peak_pss_mb": round(mem.peak_pss / 2**20),
        "peak_anon_pss_mb": round(mem.peak_anon / 2**20),
        "sft_rows": c["sft_rows"], "pairs": c["pairs"], "contaminated": c["contaminated"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", type=int, default=100_000)
    p.add_argument("--sizes", default=None, help="comma-separated problem counts (overrides --problems)")
    p.add_argument("--gens", type=int, default=4)
    p.add_argument("--chars", type=int, default=4000)
    p.add_argument("--num-proc", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--work-dir", default=None, help="where the input and output go (default: a temp folder)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.problems]
    work = tempfile.mkdtemp(prefix="bench-prepare-", dir=args.work_dir)
    try:
        for n in sizes:
            print(json.dumps(run_one(n, args.gens, args.chars, args.num_proc, work)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
