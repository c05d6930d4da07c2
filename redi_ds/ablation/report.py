"""The ablation's outputs: results.json, summary.md (table and one sentence per claim, worded from the
numbers by redi_ds.ablation.stats) and two plots (accuracy per branch; held-out log-prob curves)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from redi_ds.ablation import stats

CLAIMS = {
    "1": "SFT then REDI (alpha 0.8) beats SFT alone continued for the same steps.",
    "2": "Symmetric REDI (alpha 1.0) is unstable: the chosen log-prob collapses with the rejected one; 0.8 is "
         "steady (compared at equal learning rates).",
    "3": "DPO and SimPO degrade, or need a much smaller learning rate than REDI.",
}


def _matrix(records, split: str, ids: list[str]) -> list[list[float]]:
    return [[r.scores[split].correct[i] for i in ids] for r in records]


def curves(records) -> dict:
    """Mean over seeds of the held-out chosen / rejected log-prob per token, by probe step."""
    from redi_ds.stage import StageDir

    by_step: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        for row in StageDir(r.stage_dir).heldout_rows():
            by_step.setdefault(row["step"], []).append((row["logp_chosen"], row["logp_rejected"]))
    steps = sorted(s for s, v in by_step.items() if len(v) == len(records))
    return {"chosen": [(s, stats._mean(c for c, _ in by_step[s])) for s in steps],
            "rejected": [(s, stats._mean(r for _, r in by_step[s])) for s in steps]}


def by_lr(sweep_runs: dict, runs: dict, lrs: dict) -> dict:
    """{lr: {branch: curves}}: the sweep's first-seed runs at each LR, and each branch's runs at its LR."""
    out: dict[str, dict] = {}
    for name, recs in sweep_runs.items():
        for lr, rec in recs.items():
            out.setdefault(lr, {})[name] = curves([rec])
    for name, recs in runs.items():
        out.setdefault(f"{lrs[name]:g}", {}).setdefault(name, curves(recs))  # (the sweep: seed 0 vs seed 0)
    return out


def results(ab, base, runs: dict, sweep: dict, sweep_runs: dict, lrs: dict, paths) -> dict:
    ids = sorted(base.scores["test"].correct)
    b = [[base.scores["test"].correct[i] for i in ids]]
    out = {
        "config": ab.name, "size": ab.size, "command": ab.command, "seeds": ab.cfg.seeds,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": _machine(),
        "heldout": paths.test, "validation": paths.val, "problems": len(ids),
        "reproduce": ab.reproduce(paths.test),
        "base": {"accuracy": base.scores["test"].accuracy, "se": stats.accuracy(b).se, "export": base.export,
                 "val_accuracy": base.scores["val"].accuracy, "curve": curves([base])},
        "branches": {},
    }
    mats, deltas = {}, {}
    for name, recs in runs.items():
        m = _matrix(recs, "test", ids)
        mats[name] = m
        acc, d = stats.accuracy(m), stats.paired(m, b)
        deltas[name] = d
        out["branches"][name] = {
            "lr": lrs[name], "accuracy": acc.value, "se": acc.se, "delta": d.value, "delta_se": d.se,
            "seeds": [{"seed": r.seed, "accuracy": r.scores["test"].accuracy, "export": r.export,
                       "delta": ds, "delta_se": dse} for r, (ds, dse) in zip(recs, d.per_seed)],
            "sweep": sweep.get(name, {}), "curves": curves(recs),
            "stage": ab.cfg.branch(name).stage, "data": ab.cfg.branch(name).data,
            "overrides": ab.cfg.branch(name).overrides,
        }
    if "redi-0.8" in mats:  # every branch against REDI at the paper's alpha, paired
        for name, m in mats.items():
            if name != "redi-0.8":
                d = stats.paired(mats["redi-0.8"], m)
                out["branches"][name]["redi_minus"] = {"value": d.value, "se": d.se,
                                                       "per_seed": [v for v, _ in d.per_seed]}
    claims = {}
    ref = ab.cfg.reference
    if "redi-0.8" in mats and ref in mats:
        diff = stats.paired(mats["redi-0.8"], mats[ref])
        verdict, text = stats.claim_beats("redi-0.8", ref, diff)
        claims["1"] = {"claim": CLAIMS["1"], "verdict": verdict, "text": text, "difference": diff.value,
                       "se": diff.se}
        for other in (n for n in mats if n.startswith("redi") and n not in ("redi-0.8", "redi-1.0")):
            d2 = stats.paired(mats[other], mats[ref])
            v2, t2 = stats.claim_beats(other, ref, d2)
            claims[f"1/{other}"] = {"claim": f"{other} beats {ref}.", "verdict": v2, "text": t2,
                                    "difference": d2.value, "se": d2.se}
    stability = {lr: {n: c for n, c in curves_at.items() if n in ("redi-1.0", "redi-0.8")}
                 for lr, curves_at in by_lr(sweep_runs, runs, lrs).items()}
    out["stability"] = {lr: c for lr, c in stability.items() if len(c) == 2}  # both alphas at one LR
    verdict, text = stats.claim_stability(out["stability"])
    claims["2"] = {"claim": CLAIMS["2"], "verdict": verdict, "text": text}
    verdict, text = stats.claim_baselines(deltas, lrs if sweep else {})
    claims["3"] = {"claim": CLAIMS["3"], "verdict": verdict, "text": text}
    for other in (n for n in ("dpo", "simpo") if n in mats and "redi-0.8" in mats):  # the paper's Table 2
        diff = stats.paired(mats["redi-0.8"], mats[other])
        v, t = stats.claim_beats("redi-0.8", other, diff)
        claims[f"3/{other}"] = {"claim": f"redi-0.8 beats {other}, each at its own validated LR.", "verdict": v,
                                "text": t, "difference": diff.value, "se": diff.se}
    out["claims"] = claims
    return out


def parent_metrics(res: dict) -> dict:
    m = {"base_accuracy": res["base"]["accuracy"]}
    for name, b in res["branches"].items():
        m[f"{name}/accuracy"] = b["accuracy"]
        m[f"{name}/delta"] = b["delta"]
    return m


def write(out: Path, res: dict) -> list[Path]:
    files = [out / "results.json", out / "summary.md"]
    files[0].write_text(json.dumps(res, indent=2) + "\n")
    files[1].write_text(summary_md(res))
    files += plot_accuracy(res, out / "accuracy.png") + plot_curves(res, out / "logprobs.png")
    files += plot_stability(res, out / "stability.png")
    return files


def summary_md(res: dict) -> str:
    lines = [f"# Ablation `{res['config']}` ({res['size']})", "",
             f"{res['date']}, {res['machine']}; {res['problems']} held-out problems, {res['seeds']} seed(s), "
             "greedy decoding.", "", f"Command: `{res['command']}`", "",
             f"Re-score any export: `{res['reproduce']}`", "",
             "| branch | LR | accuracy per seed (%) | accuracy (%) | vs base (points) |",
             "|---|---:|---|---:|---:|",
             f"| base (SFT) | | | {100 * res['base']['accuracy']:.1f} ± {100 * res['base']['se']:.1f} | |"]
    for name, b in res["branches"].items():
        seeds = ", ".join(f"{100 * s['accuracy']:.1f}" for s in b["seeds"])
        lines.append(f"| {name} | {b['lr']:g} | {seeds} | {100 * b['accuracy']:.1f} ± {100 * b['se']:.1f} | "
                     f"{stats.pct(b['delta'])} ± {100 * b['delta_se']:.1f} |")
    lines += ["", "± is one standard error (held-out problems and seeds combined, paired against the base).", ""]
    paired = [(n, b["redi_minus"]) for n, b in res["branches"].items() if "redi_minus" in b]
    if paired:
        lines += ["| redi-0.8 minus | points | SE | per seed |", "|---|---:|---:|---|"]
        lines += [f"| {n} | {stats.pct(d['value'])} | {100 * d['se']:.1f} | "
                  + ", ".join(stats.pct(v) for v in d["per_seed"]) + " |" for n, d in paired]
        lines.append("")
    chosen = res["base"].get("curve", {}).get("chosen", [])
    if len(chosen) >= 3:  # has the base plateaued? its held-out chosen log-prob over stage 1
        last = chosen[-1][0]
        late = next((v for s, v in chosen if s >= 0.8 * last), chosen[-2][1])
        lines += [f"Base (stage 1): held-out chosen log-prob per token {chosen[0][1]:.3f} at step 0, {late:.3f} at 80% "
                  f"of training, {chosen[-1][1]:.3f} at the end (step {last}).", ""]
    if any(b["sweep"] for b in res["branches"].values()):
        lines += ["Learning rates were chosen on the validation set with the first seed (accuracy %):", ""]
        for name, b in res["branches"].items():
            if b["sweep"]:
                lines.append(f"- {name}: " + ", ".join(f"{lr}: {100 * v:.1f}" for lr, v in b["sweep"].items()))
        lines.append("")
    lines += ["## The claims", ""]
    for key, c in res["claims"].items():
        lines.append(f"- **Claim {key}** ({c['claim']}) **{c['verdict']}**: {c['text']}")
    lines += ["", f"Timings (s, summed over the invocations on this output folder): "
              f"{json.dumps(res.get('timings_s', {}), sort_keys=True)}", ""]
    return "\n".join(lines)


def _figure(w=7.0, h=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(res: dict, path: Path) -> list[Path]:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    names = ["base"] + list(res["branches"])
    accs = [res["base"]["accuracy"]] + [b["accuracy"] for b in res["branches"].values()]
    errs = [res["base"]["se"]] + [b["se"] for b in res["branches"].values()]
    ax.bar(range(len(names)), [100 * a for a in accs], yerr=[100 * e for e in errs], capsize=4,
           color=["#888888"] + ["#4477aa"] * (len(names) - 1))
    for k, b in enumerate(res["branches"].values(), start=1):
        ax.scatter([k] * len(b["seeds"]), [100 * s["accuracy"] for s in b["seeds"]], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(names)), labels=names, rotation=20)
    ax.set_ylabel("held-out accuracy (%), greedy")
    ax.set_title(f"{res['config']} ({res['size']}): mean ± SE, dots = seeds")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    return [path]


def plot_curves(res: dict, path: Path) -> list[Path]:
    branches = {n: b["curves"] for n, b in res["branches"].items() if b["curves"]["chosen"]}
    if not branches:
        return []
    fig = _figure(10, 4)
    for k, which in enumerate(("chosen", "rejected")):
        ax = fig.add_subplot(1, 2, k + 1)
        for name, c in branches.items():
            ax.plot([s for s, _ in c[which]], [v for _, v in c[which]], label=name)
        ax.set_xlabel("stage-2 step")
        ax.set_ylabel(f"held-out {which} log-prob / token")
        ax.set_title(which)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    return [path]


def plot_stability(res: dict, path: Path) -> list[Path]:
    """The paper's stability figure: alpha 1.0 against 0.8 at the same LR, chosen (solid) and rejected (dashed)."""
    by_lr = res.get("stability") or {}
    if not by_lr:
        return []
    fig = _figure(3.2 * len(by_lr) + 1, 3.6)
    for k, (lr, branches) in enumerate(by_lr.items()):
        ax = fig.add_subplot(1, len(by_lr), k + 1)
        for name, color in (("redi-1.0", "#cc3311"), ("redi-0.8", "#0077bb")):
            c = branches[name]
            ax.plot([s for s, _ in c["chosen"]], [v for _, v in c["chosen"]], color=color, label=f"{name} chosen")
            ax.plot([s for s, _ in c["rejected"]], [v for _, v in c["rejected"]], color=color, ls="--",
                    label=f"{name} rejected")
        ax.set_title(f"LR {lr}")
        ax.set_xlabel("stage-2 step")
        if k == 0:
            ax.set_ylabel("held-out log-prob / token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return [path]


def _machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
