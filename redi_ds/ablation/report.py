"""The ablation's outputs: results.json, summary.md and plots. Every verdict is worded by the preregistered rules
(redi_ds.ablation.stats, the config's ``rules`` and ``claims``), never by hand; results.json records the commit
that last changed the config file, and whether the file run was that commit's."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path

from redi_ds.ablation import stats
from redi_ds.ablation.harness import curve_words, score_key, teacher_words

METRIC_WORDS = {"greedy": "greedy accuracy", "sampled": "sampled pass@1"}


def _matrix(records, key: str, ids: list[str], bases: int) -> list[list[list[float]]]:
    """[base][seed][problem] scores of a branch's runs."""
    out: list[list[list[float]]] = [[] for _ in range(bases)]
    for r in sorted(records, key=lambda r: (r.base, r.seed)):
        out[r.base].append([r.scores[key].correct[i] for i in ids])
    return out


def curves(stage_dirs: list[str]) -> dict:
    """Mean over runs of the held-out chosen / rejected log-prob per token by probe step, for all pairs ("all")
    and per kind of pair."""
    from redi_ds.stage import StageDir

    rows = [StageDir(d).heldout_rows() for d in stage_dirs]
    rows = [r for r in rows if r]
    if not rows:
        return {}
    kinds = ["all"] + sorted({k.split("/", 1)[1] for r in rows for k in r[0] if k.startswith("logp_chosen/")})
    out = {}
    for kind in kinds:
        suffix = "" if kind == "all" else f"/{kind}"
        by_step: dict[int, list[tuple[float, float]]] = {}
        for run in rows:
            for row in run:
                by_step.setdefault(row["step"], []).append((row[f"logp_chosen{suffix}"],
                                                            row[f"logp_rejected{suffix}"]))
        steps = sorted(s for s, v in by_step.items() if len(v) == len(rows))
        out[kind] = {"chosen": [(s, stats.mean(c for c, _ in by_step[s])) for s in steps],
                     "rejected": [(s, stats.mean(r for _, r in by_step[s])) for s in steps]}
    return out


def stability_curves(out: Path, cfg, names=("redi-1.0", "redi-0.8")) -> dict:
    """{lr: {branch: curves}} from the validation sweep's runs (base 0, ``sweep_seed``): both alphas at one LR."""
    by_lr: dict[str, dict] = {}
    for name in names:
        for heldout in sorted(Path(out, "runs", name, "base0").glob(f"lr*/seed{cfg.sweep_seed}/*/heldout.jsonl")):
            lr = heldout.parents[2].name[2:]
            by_lr.setdefault(lr, {})[name] = curves([str(heldout.parent)])
    return {lr: c for lr, c in by_lr.items() if len(c) == len(names)}


def preregistration(config: str) -> dict:
    """The config file's sha256, the commit that last changed it, and whether the file run is that commit's."""
    from importlib import resources

    path = Path(config) if Path(config).is_file() else Path(str(resources.files("redi_ds.configs"))) / f"{config}.yaml"
    out = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "commit": "unknown",
           "committed": "", "clean": False}

    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=path.resolve().parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    log = git("log", "-1", "--format=%H %cI", "--", path.name)
    if log:
        out["commit"], out["committed"] = log.split()
        out["clean"] = git("status", "--porcelain", "--", path.name) == ""
    return out


def results(ab, bases, runs: dict, choices: dict, paths) -> dict:
    cfg = ab.cfg
    rules = stats.Rules(cfg.rules.alpha, cfg.rules.margin, cfg.rules.collapse_nats)
    ids = sorted(bases[0].scores["test"].correct)
    base_rows = {m: [[[b.scores[score_key("test", m)].correct[i] for i in ids]] for b in bases] for m in ("greedy", "sampled")}
    out = {
        "config": ab.name, "size": ab.size, "command": ab.command, "preregistration": preregistration(ab.source),
        "rules": cfg.rules.__dict__, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": _machine(),
        "bases_n": cfg.bases, "seeds": cfg.seeds, "heldout": paths.test, "validation": paths.val, "problems": len(ids),
        "reproduce": {m: ab.reproduce(paths.test, m) for m in ("greedy", "sampled")},
        "teacher": ab.info.get("teacher", {}), "student": ab.info.get("student", {}),
        "bases": [{"base": b.base, "export": b.export, "curve": ab.info.get("base_curves", {}).get(b.base, []),
                   **{score_key("test", m): b.scores[score_key("test", m)].accuracy for m in ("greedy", "sampled")},
                   "val": b.scores["val" if ab.primary() == "greedy" else "val-sampled"].accuracy} for b in bases],
        "base_probe": curves([b.stage_dir for b in bases]),
        "branches": {},
    }
    mats = {m: {n: _matrix(recs, score_key("test", m), ids, cfg.bases) for n, recs in runs.items()}
            for m in ("greedy", "sampled")}
    for m in ("greedy", "sampled"):
        out[f"base_{m}"] = _est(stats.estimate(base_rows[m]))
    for name, recs in runs.items():
        b, c = cfg.branch(name), choices[name]
        out["branches"][name] = {
            "section": b.section, "stage": b.stage, "data": b.data, "overrides": b.overrides,
            "lr": c.lr, "variant": b.grid[c.variant] if b.grid else {}, "bracketed": c.bracketed,
            "sweep": c.table, "lr_from": b.lr_from,
            "runs": [{"base": r.base, "seed": r.seed, "export": r.export,
                      **{m: r.scores[score_key("test", m)].accuracy for m in ("greedy", "sampled")}} for r in recs],
            "curves": curves([r.stage_dir for r in recs]),
            **{m: {"accuracy": _est(stats.estimate(mats[m][name])),
                   "vs_base": _est(stats.paired(mats[m][name], base_rows[m]))} for m in ("greedy", "sampled")},
        }
    out["stability"] = stability_curves(ab.out, cfg)
    out["claims"] = {key: claim(c, mats, out["stability"], rules, cfg.rules.metric) for key, c in cfg.claims.items()}
    return out


def claim(c, mats: dict, stability: dict, rules: stats.Rules, metric: str) -> dict:
    """A preregistered claim's verdict (primary metric) and, for the record, the other metric's."""
    row = {"text": c.text, "source": c.source, "kind": c.kind, "section": c.section, "metric": metric}
    if c.kind == "stability":
        row["verdict"], row["words"] = stats.stability(stability, rules)
        return row
    for m in ("greedy", "sampled"):
        parts = {}
        for other in c.b:
            e = stats.paired(mats[m][c.a], mats[m][other])
            parts[other] = {**_est(e), "verdict": e.verdict(rules), "words": e.words(rules)}
        verdict = stats.combine([p["verdict"] for p in parts.values()])
        row[m] = {"verdict": verdict, "against": parts}
    row["verdict"] = row[metric]["verdict"]
    row["words"] = "; ".join(f"{c.a} minus {o}: {p['verdict']}, {p['words']}" for o, p in row[metric]["against"].items())
    return row


def _est(e: stats.Estimate) -> dict:
    return {"value": e.value, "se": e.se, "df": e.df, "per_base": e.per_base, "per_seed": e.per_seed}


def parent_metrics(res: dict) -> dict:
    m = {}
    for name, b in res["branches"].items():
        for metric in ("greedy", "sampled"):
            m[f"{name}/{metric}"] = b[metric]["accuracy"]["value"]
    return m


# ----------------------------------------------------------------------------- summary.md


def write(out: Path, res: dict) -> list[Path]:
    files = [out / "results.json", out / "summary.md"]
    files[0].write_text(json.dumps(res, indent=2) + "\n")
    files[1].write_text(summary_md(res))
    return files + plot_accuracy(res, out / "accuracy.png") + plot_stability(res, out / "stability.png")


def _pm(e: dict, signed: bool = False) -> str:
    v = stats.pct(e["value"]) if signed else f"{100 * e['value']:.1f}"
    return f"{v} ± {100 * e['se']:.1f}"


def summary_md(res: dict) -> str:
    pre = res["preregistration"]
    metric = res["rules"]["metric"]
    lines = [f"# Ablation `{res['config']}` ({res['size']})", "",
             f"{res['date']}, {res['machine']}; {res['problems']} held-out problems; {res['bases_n']} base(s) x "
             f"{res['seeds']} seed(s) per branch.", "",
             f"Command: `{res['command']}`", "",
             f"Preregistration: `{Path(pre['file']).name}` at commit `{pre['commit']}` ({pre['committed']}); the run's "
             f"file is {'that commit' if pre['clean'] else 'NOT that commit (changed since)'}. Primary metric: "
             f"{METRIC_WORDS[metric]}; alpha {res['rules']['alpha']}, equivalence margin "
             f"{100 * res['rules']['margin']:g} points.", ""]
    lines += _data_lines(res)
    for section, title in (("paper", "The paper's setting: the teacher's pairs"),
                           ("student", "This project's finding: the student's own negatives (not the paper's claim)")):
        names = [n for n, b in res["branches"].items() if b["section"] == section]
        if not names:
            continue
        lines += [f"## {title}", "", "| branch | LR | variant | greedy (%) | vs base | sampled pass@1 (%) | vs base |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        if section == "paper":
            lines.append(f"| base (SFT) | | | {_pm(res['base_greedy'])} | | {_pm(res['base_sampled'])} | |")
        for n in names:
            b = res["branches"][n]
            lr = f"{b['lr']:g}" + ("" if b["bracketed"] or not b["sweep"] else " (edge)")
            lines.append(f"| {n} | {lr} | {json.dumps(b['variant']) if b['variant'] else ''} | "
                         f"{_pm(b['greedy']['accuracy'])} | {_pm(b['greedy']['vs_base'], True)} | "
                         f"{_pm(b['sampled']['accuracy'])} | {_pm(b['sampled']['vs_base'], True)} |")
        lines += ["", "± is one standard error over problems, bases and seeds (redi_ds/ablation/stats.py). "
                  "\"(edge)\": the validated LR is at the end of its (extended) grid.", ""]
        claims = [(k, c) for k, c in res["claims"].items() if c["section"] == section]
        for key, c in claims:
            lines.append(f"- **Claim {key}**: \"{c['text']}\" ({c['source']}) **{c['verdict']}**: "
                         f"{c['words'].rstrip('.')}.")
            other = "greedy" if metric == "sampled" else "sampled"
            if other in c:
                lines.append(f"  - by {METRIC_WORDS[other]} (not the preregistered metric): {c[other]['verdict']}")
        lines.append("")
    lines += _sweep_lines(res)
    lines += [f"Timings (s, summed over the invocations on this output folder): "
              f"{json.dumps(res.get('timings_s', {}), sort_keys=True)}", ""]
    return "\n".join(lines)


def _data_lines(res: dict) -> list[str]:
    t, lines = res.get("teacher") or {}, []
    if t:
        lines += [f"Teacher (sampled, graded): {100 * t['sft']['accuracy']:.1f}% of its samples right on the sft "
                  f"problems, {100 * t['stage2']['accuracy']:.1f}% on the stage-2 problems; {t['sft']['kept']} sft "
                  f"traces, {t['stage2']['pairs']} stage-2 pairs, {t['val']['pairs']} held-out probe pairs "
                  f"({', '.join(f'{k}: {v}' for k, v in t.get('probe_kinds', {}).items())}).", ""]
        if t.get("curve"):
            lines.append("- teacher: " + teacher_words(t["curve"], t.get("target", 0.0)))
    for b in res["bases"]:
        lines.append(f"- base {b['base']}: validation accuracy by epoch {curve_words(b['curve'])}; test greedy "
                     f"{100 * b['test']:.1f}%, sampled {100 * b['test-sampled']:.1f}%")
    for b, s in (res.get("student") or {}).items():
        lines.append(f"- base {b}'s own samples on the stage-2 problems: {100 * s['accuracy']:.1f}% right; "
                     f"{s['student_pairs']} student pairs, {s['rft_rows']} RFT rows")
    return lines + [""]


def _sweep_lines(res: dict) -> list[str]:
    lines = ["## Validation sweep (base 0, the sweep seed; the primary metric, %)", ""]
    for n, b in res["branches"].items():
        if b["sweep"]:
            lines.append(f"- {n}: " + ", ".join(f"{k}: {100 * v:.1f}" for k, v in b["sweep"].items()))
        elif b["lr_from"]:
            lines.append(f"- {n}: the LR of {b['lr_from']}")
    return lines + ["", "(keys are `LR|variant`, the variant an index into the branch's grid)", ""]


# ----------------------------------------------------------------------------- plots


def _figure(w=7.0, h=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(res: dict, path: Path) -> list[Path]:
    metric = res["rules"]["metric"]
    fig = _figure(9, 4)
    ax = fig.add_subplot(1, 1, 1)
    names = ["base"] + list(res["branches"])
    est = [res[f"base_{metric}"]] + [b[metric]["accuracy"] for b in res["branches"].values()]
    ax.bar(range(len(names)), [100 * e["value"] for e in est], yerr=[100 * e["se"] for e in est], capsize=4,
           color=["#888888"] + ["#4477aa" if b["section"] == "paper" else "#ccbb44" for b in res["branches"].values()])
    for k, b in enumerate(res["branches"].values(), start=1):
        ax.scatter([k] * len(b["runs"]), [100 * r[metric] for r in b["runs"]], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(names)), labels=names, rotation=25, fontsize=8)
    ax.set_ylabel(f"held-out {METRIC_WORDS[metric]} (%)")
    ax.set_title(f"{res['config']} ({res['size']}): mean ± SE, dots = runs (bases x seeds)")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    return [path]


def plot_stability(res: dict, path: Path) -> list[Path]:
    """Alpha 1.0 against 0.8 at the same LR, per kind of held-out pair: chosen (solid), rejected (dashed)."""
    by_lr = res.get("stability") or {}
    kinds = sorted({k for c in by_lr.values() for k in c.get("redi-1.0", {})})
    if not by_lr or not kinds:
        return []
    fig = _figure(3.2 * len(by_lr) + 1, 3.0 * len(kinds))
    for i, kind in enumerate(kinds):
        for k, (lr, branches) in enumerate(sorted(by_lr.items(), key=lambda kv: float(kv[0]))):
            ax = fig.add_subplot(len(kinds), len(by_lr), i * len(by_lr) + k + 1)
            for name, color in (("redi-1.0", "#cc3311"), ("redi-0.8", "#0077bb")):
                c = branches[name].get(kind)
                if c:
                    ax.plot([s for s, _ in c["chosen"]], [v for _, v in c["chosen"]], color=color, label=f"{name} chosen")
                    ax.plot([s for s, _ in c["rejected"]], [v for _, v in c["rejected"]], color=color, ls="--",
                            label=f"{name} rejected")
            ax.set_title(f"LR {lr}, {kind}", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return [path]


def _machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
