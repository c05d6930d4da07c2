"""N-gram decontamination against the bundled evaluation sets.

Text is normalised before n-grams are taken: lower case, LaTeX spacing commands (``\\,``, ``\\;``, ``\\!``,
``\\quad``, ``\\left``/``\\right``, ``~``, ``$``) and braces removed, ``\\dfrac``/``\\tfrac`` read as ``\\frac``, and the
text split into LaTeX commands, words, digit runs and single symbols, so whitespace and LaTeX spacing do not
matter. A training problem is contaminated by an evaluation problem when it contains at least ``threshold`` of
that evaluation problem's distinct n-grams (at least one when ``threshold`` is 0). An evaluation problem shorter
than ``n`` tokens is one n-gram: its whole token sequence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources

# name -> bundled file (used until redi_ds.eval.benchmarks.load_benchmark exists)
EVAL_FILES = {
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
    "amc": "redi_rllm/amc.jsonl",
    "minerva": "minerva_math.jsonl",
    "olympiadbench": "olympiadbench.jsonl",
}
DEFAULT_SETS = ("math500", "aime24", "amc23", "amc", "minerva", "olympiadbench")

_NOISE = re.compile(
    r"\\(?:left|right|big|Big|bigg|Bigg|displaystyle|textstyle|quad|qquad)(?![a-zA-Z])|\\[,;:! ]|[~${}]"
)
_FRAC = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_TOKEN = re.compile(r"\\[a-z]+|[a-z]+|\d+|[^\s\w]", re.IGNORECASE)


def tokens(text: str) -> list:
    text = _FRAC.sub(r"\\frac", text)
    text = _NOISE.sub(" ", text)
    return _TOKEN.findall(text.lower())


def ngrams(toks: list, n: int) -> set:
    if len(toks) < n:
        return {" ".join(toks)} if toks else set()
    return {" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def load_eval_problems(names) -> list:
    """[(eval_id, problem)] for the named sets: ``redi_ds.eval.benchmarks.load_benchmark`` when it is
    importable (any name it knows), else the bundled files in :data:`EVAL_FILES`."""
    try:
        from redi_ds.eval.benchmarks import load_benchmark
    except ImportError:
        load_benchmark = None
    out = []
    for name in names:
        if load_benchmark is not None:
            try:
                rows = load_benchmark(name)
            except Exception as e:  # noqa: BLE001 - an unknown name or a broken file: one line
                raise ValueError(f"evaluation set {name!r}: {' '.join(str(e).split())[:300]}") from None
        elif name in EVAL_FILES:
            path = resources.files("redi_ds") / "assets" / "eval" / EVAL_FILES[name]
            with path.open("r", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        else:
            raise ValueError(f"unknown evaluation set {name!r} (known: {', '.join(EVAL_FILES)})")
        out.extend((f"{name}:{r['id']}", r["problem"]) for r in rows)
    return out


@dataclass
class NgramIndex:
    n: int = 13
    threshold: float = 0.5
    grams: dict = field(default_factory=dict)  # n-gram -> tuple of eval ids
    short: dict = field(default_factory=dict)  # " joined tokens " of an eval problem under n tokens -> eval ids
    totals: dict = field(default_factory=dict)  # eval id -> number of distinct n-grams
    sets: dict = field(default_factory=dict)  # set name -> problems indexed

    @classmethod
    def build(cls, problems, n: int = 13, threshold: float = 0.5) -> "NgramIndex":
        idx = cls(n=n, threshold=threshold)
        grams, short = {}, {}
        for eid, text in problems:
            toks = tokens(text)
            if not toks:
                continue
            idx.sets[eid.split(":", 1)[0]] = idx.sets.get(eid.split(":", 1)[0], 0) + 1
            if len(toks) < n:
                short.setdefault(" " + " ".join(toks) + " ", []).append(eid)
                idx.totals[eid] = 1
                continue
            gs = ngrams(toks, n)
            idx.totals[eid] = len(gs)
            for g in gs:
                grams.setdefault(g, []).append(eid)
        idx.grams = {g: tuple(v) for g, v in grams.items()}
        idx.short = {g: tuple(v) for g, v in short.items()}
        return idx

    def match(self, text: str) -> list:
        """Sorted eval ids whose overlap with ``text`` passes the threshold."""
        toks = tokens(text)
        hits: dict = {}
        for g in ngrams(toks, self.n) if len(toks) >= self.n else ():
            for eid in self.grams.get(g, ()):
                hits[eid] = hits.get(eid, 0) + 1
        if self.short:
            joined = " " + " ".join(toks) + " "
            for g, eids in self.short.items():
                if g in joined:  # the whole (short) eval problem occurs, token-aligned
                    for eid in eids:
                        hits[eid] = 1
        return sorted(e for e, h in hits.items() if h >= max(1.0, self.threshold * self.totals[e]))
