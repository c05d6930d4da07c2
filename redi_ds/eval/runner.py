"""``run_eval``: generate, grade, summarise, plot and log an evaluation (the CLI wraps it).

Output in ``out_dir``:

- ``samples.jsonl``: one row per sample: ``benchmark``, ``problem_id``, ``sample_index``, ``response``,
  ``extracted_answer`` (None without a box), ``gold``, ``correct``, ``num_tokens`` (generated tokens,
  including the stop token), ``finish_reason`` (``stop`` | ``length``).
- ``summary.json``: the settings, and per benchmark pass@1 averaged over the k samples with its standard
  error, pass@k, mean response length, truncated / no-answer fractions, and ``by_subject`` /
  ``by_level`` breakdowns where the set has them (MATH-500); see :mod:`redi_ds.eval.metrics` for the
  exact definitions. ``average`` is the unweighted mean of the benchmarks' pass@1.
- ``accuracy_by_level.png``: pass@1 by level (benchmarks with levels only).

Data parallel: with ``world_size`` > 1 (the CLI takes them from torchrun's ``RANK`` / ``WORLD_SIZE``;
the Python API only when passed, so a trainer calling it on rank 0 alone just works) every rank must
call ``run_eval`` with the same arguments and ``out_dir``; rank r generates problems ``r::world_size``
and writes ``out_dir/shards/rank*.jsonl`` plus a ``.done`` marker carrying a signature of the launch
(settings, model file mtimes, torchrun run id/port), so stale shards of an earlier run in the same
folder are never merged; rank 0 waits for every shard (``REDI_EVAL_GATHER_TIMEOUT`` seconds, default
24 h), merges them and does the rest. Other ranks return ``{}``.

MLflow: when ``mlflow_run_id`` or ``tracking_uri`` is given, metrics (``eval/<bench>/pass_at_1``, ...)
and the files go to that run (a new run in ``mlflow_experiment`` without a run id). The tracking URI
is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``. If MLflow fails (unreachable server, ...) one
warning is logged; the files are written regardless.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from redi_ds.eval.benchmarks import BENCHMARKS, get_spec, load_benchmark, resolve_benchmarks
from redi_ds.errors import ConfigError
from redi_ds.eval.errors import EvalError
from redi_ds.textio import writable_dir
from redi_ds.eval.grading import STATS, extract_answer, grade_many
from redi_ds.eval.metrics import summarize_benchmark
from redi_ds.eval.options import EvalOptions
from redi_ds.eval.prompting import build_prompt

log = logging.getLogger(__name__)

GATHER_TIMEOUT = float(os.environ.get("REDI_EVAL_GATHER_TIMEOUT", str(24 * 3600)))
PLOT_NAME = "accuracy_by_level.png"


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's ``RANK`` / ``WORLD_SIZE`` (0, 1 without them)."""
    from redi_ds import ranks

    try:
        return ranks.rank(), ranks.world_size()
    except ValueError:
        raise EvalError("RANK and WORLD_SIZE must be integers") from None


def _check_ranks(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    r, w = int(rank or 0), int(world_size or 1)
    if w < 1 or not 0 <= r < w:
        raise EvalError(f"bad rank/world size: rank={r} world_size={w}")
    return r, w


def _output_folder(out_dir, model, world: int) -> tuple[Path, bool]:
    """(the output folder, whether this run created it): checked (a file, under a file, read-only: one line) before
    any generation, then made."""
    if out_dir is None:
        if world > 1:
            raise EvalError(f"pass out_dir (--out) when running on several ranks (WORLD_SIZE={world})")
        out_dir = _default_out_dir(model)
    out = Path(out_dir).expanduser()
    created = not out.exists()
    try:
        writable_dir(str(out), "--out")
    except ConfigError as e:
        raise EvalError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    return out, created


def _default_out_dir(model: Any) -> Path:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(getattr(model, "name_or_path", model))).name or "model")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path.cwd() / f"eval-{base}-{stamp}"
    i = 1
    while out.exists():
        i += 1
        out = Path.cwd() / f"eval-{base}-{stamp}-{i}"
    return out


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _run_signature(model: Any, settings: dict) -> str:
    """Identifies one evaluation launch, so that rank 0 never merges stale shards of an earlier run in the
    same folder: the settings, the model files' mtimes, and the torchrun launch (run id, port, restart)."""
    import hashlib

    parts: dict[str, Any] = {"settings": settings, "model": str(getattr(model, "name_or_path", model))}
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(os.path.expanduser(str(model))):
        folder = Path(os.path.expanduser(str(model)))
        parts["mtimes"] = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    for var in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        parts[var] = os.environ.get(var)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shard_done(shard_dir: Path, r: int, signature: str) -> bool:
    try:
        return json.loads((shard_dir / f"rank{r:05d}.done").read_text()).get("signature") == signature
    except (OSError, ValueError):
        return False


def _gather_shards(out_dir: Path, world: int, timeout: float, signature: str) -> list[dict]:
    shard_dir = out_dir / "shards"
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in range(world) if not _shard_done(shard_dir, r, signature)]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise EvalError(f"ranks {missing} did not write their results to {shard_dir} within {timeout:.0f}s")
        time.sleep(1.0)
    rows: list[dict] = []
    for r in range(world):
        rows.extend(_read_jsonl(shard_dir / f"rank{r:05d}.jsonl"))
    return rows


def _load_problems(names: list[str], limit: int) -> dict[str, list[dict]]:
    """{benchmark name: its rows (the first ``limit``; all when 0)}."""
    problems = {}
    for n in names:
        rows = load_benchmark(n)
        problems[get_spec(n).name] = rows[:limit] if limit else rows
    if len(problems) != len(names):
        raise EvalError("two benchmarks have the same name; rename one of the files")
    return problems


def _graded_records(mine: list, completions: list, opts: EvalOptions) -> list[dict]:
    """One samples.jsonl row per (problem, sample) of this rank, graded."""
    flat = [(b, row, j, c) for (b, row), comps in zip(mine, completions) for j, c in enumerate(comps)]
    verdicts = grade_many([c.text for *_, c in flat], [row["answer"] for _, row, _, _ in flat],
                          workers=opts.grade_workers, timeout=opts.grade_timeout)
    return [
        {
            "benchmark": b,
            "problem_id": row["id"],
            "sample_index": j,
            "response": c.text,
            "extracted_answer": extract_answer(c.text),
            "gold": row["answer"],
            "correct": bool(ok),
            "num_tokens": int(c.num_tokens),
            "finish_reason": c.finish_reason,
        }
        for (b, row, j, c), ok in zip(flat, verdicts)
    ]


def _summary(model: Any, backend_name: str, opts: EvalOptions, problems: dict, records: list[dict], *,
             world: int, gen_seconds: float, mine: int, grading: dict) -> dict[str, Any]:
    """summary.json's content (without the plot, timings and MLflow entries run_eval adds)."""
    summary: dict[str, Any] = {
        "model": str(getattr(model, "name_or_path", model)),
        "backend": backend_name,
        "benchmarks": {},
        "average": {},
        "samples": int(opts.samples),
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "max_new_tokens": int(opts.max_new_tokens),
        "limit": int(opts.limit),
        "seed": opts.seed,
        "system_prompt": opts.system_prompt,
        "user_template": opts.user_template,
        "chat_template": opts.chat_template,
        "force_think": opts.force_think,
        "world_size": world,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generation_seconds": round(gen_seconds, 3),
        "problems_per_second_rank0": round(mine / gen_seconds, 4) if gen_seconds > 0 else None,
        "grading": grading,
        "files": {"samples": "samples.jsonl", "summary": "summary.json"},
    }
    for b, rows in problems.items():
        summary["benchmarks"][b] = {
            "description": BENCHMARKS[b].description if b in BENCHMARKS else b,
            **summarize_benchmark(rows, [s for s in records if s["benchmark"] == b]),
        }
    scores = [v["pass@1"] for v in summary["benchmarks"].values()]
    summary["average"] = {"pass@1": sum(scores) / len(scores), "num_benchmarks": len(scores)}
    return summary


def _generate(gen: Any, opts: EvalOptions, problems: list, progress: bool, desc: str) -> tuple[list, float]:
    """``opts.samples`` completions of each problem from a built generator, which is closed after:
    ``(completions, generation seconds)``."""
    prompts = [build_prompt(gen.tokenizer, p, system_prompt=opts.system_prompt, user_template=opts.user_template,
                            force_think=opts.force_think) for p in problems]
    t_gen = time.time()
    bar = _progress_bar(len(problems), enabled=progress, desc=desc)
    try:
        completions = gen.generate(prompts, n=int(opts.samples), temperature=opts.temperature, top_p=opts.top_p,
                                   max_new_tokens=int(opts.max_new_tokens), progress=bar.update) if problems else []
    finally:
        bar.close()
        gen.close()
    return completions, time.time() - t_gen


def run_eval(
    model: Any,
    benchmarks: Union[str, Sequence[str]],
    options: Optional[EvalOptions] = None,
    *,
    out_dir: Optional[Union[str, os.PathLike]] = None,
    mlflow_run_id: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    mlflow_experiment: str = "redi-ds-eval",
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    progress: bool = True,
    print_table: bool = True,
) -> dict:
    """Evaluate ``model`` (an HF folder, hub name, or in-memory ``PreTrainedModel`` with
    ``EvalOptions(tokenizer=...)`` for the hf backend) on ``benchmarks`` (names, aliases, suites like ``paper``,
    or JSONL paths; a list or a comma-separated string) with the settings in ``options`` (default
    ``EvalOptions()``, see :class:`redi_ds.eval.options.EvalOptions`) and return the summary (``{}`` on ranks
    other than 0).

    The keyword arguments are the run's context: ``out_dir`` (default: a new ``eval-<model>-<time>`` folder),
    MLflow (see the module docstring), ``rank`` / ``world_size`` for data-parallel generation (default: one
    process), the progress bar and the printed table. Raises :class:`EvalError` for out-of-range settings, a
    bad model path, an unknown benchmark or a malformed data file.
    """
    t_start = time.time()
    opts = EvalOptions() if options is None else options
    if not isinstance(opts, EvalOptions):
        raise EvalError(f"options must be an EvalOptions, got {type(opts).__name__}")
    opts.check()
    names = resolve_benchmarks(benchmarks)
    problems = _load_problems(names, int(opts.limit))
    from redi_ds.eval.backends import build_generator, check_model_path

    check_model_path(model)
    r, world = _check_ranks(rank, world_size)
    out, created = _output_folder(out_dir, model, world)
    signature = _run_signature(model, {
        "benchmarks": names, "samples": int(opts.samples), "temperature": opts.temperature, "top_p": opts.top_p,
        "max_new_tokens": int(opts.max_new_tokens), "limit": int(opts.limit), "seed": opts.seed,
        "system_prompt": opts.system_prompt, "user_template": opts.user_template, "force_think": opts.force_think,
        "chat_template": opts.chat_template, "tokenizer": opts.tokenizer, "backend": opts.backend,
        "dtype": opts.dtype, "world_size": world,
    }) if world > 1 else ""

    # -- generate this rank's share
    items = [(b, row) for b, rows in problems.items() for row in rows]
    mine = items[r::world]
    try:
        gen = build_generator(opts.backend, model, tokenizer=opts.tokenizer, chat_template=opts.chat_template,
                              dtype=opts.dtype, seed=opts.seed + r, batch_size=opts.batch_size,
                              **(opts.backend_options or {}))
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a model that cannot load leaves no empty output folder behind
        raise
    backend_name = gen.name
    completions, gen_seconds = _generate(gen, opts, [row["problem"] for _, row in mine],
                                         progress=progress and r == 0, desc=f"eval {','.join(problems)}")

    # -- grade
    stats_before = dict(STATS)
    records = _graded_records(mine, completions, opts)
    if world > 1:
        shard_dir = out / "shards"
        shard_dir.mkdir(exist_ok=True)
        _write_jsonl(shard_dir / f"rank{r:05d}.jsonl", records)
        (shard_dir / f"rank{r:05d}.done").write_text(json.dumps({"rows": len(records), "signature": signature}))
        if r != 0:
            return {}
        records = _gather_shards(out, world, GATHER_TIMEOUT, signature)
    position = {(b, str(row["id"])): i for i, (b, row) in enumerate(items)}
    records.sort(key=lambda s: (position[(s["benchmark"], str(s["problem_id"]))], s["sample_index"]))
    _write_jsonl(out / "samples.jsonl", records)

    # -- summarise
    summary = _summary(model, backend_name, opts, problems, records, world=world, gen_seconds=gen_seconds,
                       mine=len(mine), grading={k: STATS[k] - stats_before[k] for k in STATS})  # rank 0's grading
    if _plot_levels(summary, out / PLOT_NAME):
        summary["files"]["plot"] = PLOT_NAME
    summary["elapsed_seconds"] = round(time.time() - t_start, 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if print_table:
        print(format_table(summary), flush=True)
    if mlflow_run_id or tracking_uri:
        info = log_to_mlflow(summary, out, run_id=mlflow_run_id, tracking_uri=tracking_uri,
                             experiment=mlflow_experiment)
        if info:
            summary["mlflow"] = info
            (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    summary["out_dir"] = str(out)
    return summary


# ----------------------------------------------------------------------------- progress, table, plot


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, *, enabled: bool, desc: str):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="problem", desc=desc, dynamic_ncols=True, file=sys.stderr, mininterval=1.0)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def format_table(summary: dict) -> str:
    """A plain-text table: pass@1 (%) +- standard error, pass@k, mean tokens, truncated (%)."""
    k = summary.get("samples", 1)
    head = ["benchmark", "problems", f"pass@1 (k={k})", f"pass@{k}", "mean tokens", "truncated %"]
    lines = []
    for name, b in summary["benchmarks"].items():
        rows = [(name, b)]
        rows += [(f"  level {lv}", s) for lv, s in b.get("by_level", {}).items()]
        rows += [(f"  {sub}", s) for sub, s in b.get("by_subject", {}).items()]
        for label, s in rows:
            se = s.get("pass@1_stderr")
            p1 = _pct(s["pass@1"]) + (f" ± {_pct(se)}" if se is not None else "")
            lines.append([label, str(s["num_problems"]), p1, _pct(s["pass@k"].get(str(k))),
                          f"{s.get('mean_response_tokens', 0):.0f}",
                          _pct(s["truncated_fraction"]) if "truncated_fraction" in s else ""])
    lines.append(["average", "", _pct(summary["average"]["pass@1"]), "", "", ""])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join("{:<%d}" % w if i == 0 else "{:>%d}" % w for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*ln) for ln in lines])


def _plot_levels(summary: dict, path: Path) -> bool:
    """Bar chart of pass@1 by level with standard-error bars; False (no file) when no set has levels."""
    series = {b: v["by_level"] for b, v in summary["benchmarks"].items() if v.get("by_level")}
    if not series:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for s_i, (bench, levels) in enumerate(series.items()):
        labels = list(levels)
        xs = [i + s_i * width for i in range(len(labels))]
        ys = [100 * levels[lv]["pass@1"] for lv in labels]
        errs = [100 * (levels[lv]["pass@1_stderr"] or 0.0) for lv in labels]
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=bench)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels=labels)
    ax.set_xlabel("level")
    ax.set_ylabel(f"pass@1 (%), k={summary.get('samples')}")
    ax.set_ylim(0, 100)
    ax.set_title(f"Accuracy by level: {Path(str(summary.get('model'))).name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    return True


# ----------------------------------------------------------------------------- MLflow

_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-./ ]+")


def _key(*parts: str) -> str:
    return "/".join(_MLFLOW_KEY.sub("_", str(p)).strip("_") for p in parts)


def summary_metrics(summary: dict, prefix: str = "eval") -> dict[str, float]:
    """Flat MLflow metric names -> values (``@`` is not allowed in MLflow names: ``pass_at_1``)."""
    out: dict[str, float] = {}

    def add(path: tuple, stats: dict) -> None:
        out[_key(prefix, *path, "pass_at_1")] = stats["pass@1"]
        if stats.get("pass@1_stderr") is not None:
            out[_key(prefix, *path, "pass_at_1_stderr")] = stats["pass@1_stderr"]
        for k, v in stats.get("pass@k", {}).items():
            if k != "1":
                out[_key(prefix, *path, f"pass_at_{k}")] = v
        for name in ("mean_response_tokens", "truncated_fraction", "no_answer_fraction"):
            if name in stats:
                out[_key(prefix, *path, name)] = stats[name]

    for b, stats in summary["benchmarks"].items():
        add((b,), stats)
        for lv, s in stats.get("by_level", {}).items():
            add((b, f"level_{lv}"), s)
        for sub, s in stats.get("by_subject", {}).items():
            add((b, "subject_" + sub.lower().replace(" ", "_")), s)
    out[_key(prefix, "average", "pass_at_1")] = summary["average"]["pass@1"]
    return {k: float(v) for k, v in out.items()}


def _probe_http(uri: str, timeout: float = 5.0) -> None:
    import urllib.request

    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
        resp.read(16)


def log_to_mlflow(summary: dict, out_dir: Path, *, run_id: Optional[str], tracking_uri: Optional[str],
                  experiment: str = "redi-ds-eval") -> Optional[dict]:
    """Log the metrics and files to MLflow; on any failure warn once and return None."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    try:
        if uri and uri.startswith(("http://", "https://")):
            _probe_http(uri)  # fail fast instead of MLflow's long retry loop
        import mlflow  # noqa: F401  (lazy: heavy)
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        created = False
        if not run_id:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            run_id = client.create_run(exp_id, run_name=f"eval-{Path(str(summary['model'])).name}").info.run_id
            created = True
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in summary_metrics(summary).items()]
        for i in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[i : i + 500])
        for name in ("samples.jsonl", "summary.json", PLOT_NAME):
            if (out_dir / name).exists():
                client.log_artifact(run_id, str(out_dir / name), artifact_path="eval")
        if created:
            client.set_terminated(run_id)
        return {"run_id": run_id, "tracking_uri": uri}
    except Exception as e:
        log.warning("MLflow logging skipped (%s): %s; the results are in %s",
                    uri or "default tracking URI", str(e).strip().splitlines()[0] if str(e).strip() else
                    type(e).__name__, out_dir)
        return None
