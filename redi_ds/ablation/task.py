"""The CPU-scale task of the ablation: arithmetic, traced by a real teacher.

A problem is a sum of 3-4 signed terms over operands in [1, max_operand] (e.g. ``12+7-5+20=?``); its answer is
the value. A trace adds the terms one line at a time, in any order whose first term is positive and whose
running value stays in [0, max_value]:

    12-5=7
    7+20=27
    27+7=34          (the same problem, another valid order:  12+20=32 / 32+7=39 / 39-5=34)
    \\boxed{34}

Every problem has at least ``min_orders`` valid orders, all with the same number of lines (length within a few
characters), so no length normalisation can prefer one kind of trace. The gold traces pick an order at random.

The paper's data, at toy scale (redi_ds.ablation.harness):

    teacher   a larger model, trained on gold traces of its own problems (``teacher`` split)
    samples   the teacher, sampled at temperature 1 on the student's problems and graded: its right and wrong
              traces come from one natural error distribution, as R1's traces graded by math-verify
    sft       the student's stage 1: a correct teacher trace per ``sft`` problem
    stage2    the problems with a right and a wrong teacher trace: pairs (REDI, DPO, SimPO) and their positives
              (continued SFT)
    val/test  held-out problems (``python -m redi_ds.eval --bench`` format): hyperparameters / the report

Splits are disjoint expressions; everything is a function of the seed. The tokenizer is character-level
(``build_tokenizer``; shipped as ``redi_ds/assets/tokenizer/arith``, ``model.tokenizer: arith``).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from redi_ds.errors import ConfigError

SPECIALS = ["<|endoftext|>", "<|im_end|>", "[UNK]"]
CHARS = list("0123456789+-=?:QA\n\\boxed{} ")
# a minimal chat template with the same anatomy as Qwen's: user turn, assistant turn closed by <|im_end|>
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] + '\\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'Q:' + m['content'] + '\\n' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ 'A:' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'A:' }}{%- endif -%}"
)
SPLITS = ("teacher", "sft", "stage2", "val", "test")


@dataclass
class TaskConfig:
    teacher_problems: int = 6000  # the teacher's own training problems (gold traces)
    sft_problems: int = 3000
    stage2_problems: int = 2000
    val_problems: int = 500
    test_problems: int = 1000
    min_terms: int = 3
    max_terms: int = 4
    max_operand: int = 30
    max_value: int = 99
    min_orders: int = 2  # valid orders a problem must have
    procedures: str = "any"  # any: every valid order | two: as written, or additions first (see orders)
    seed: int = 1234


Term = tuple[str, int]  # ("+", 12)


# ----------------------------------------------------------------------------- problems and traces


def orders(terms: list[Term], max_value: int, procedures: str = "any") -> list[tuple[Term, ...]]:
    """The valid orders of the terms: a positive first term, every running value in [0, max_value]. ``procedures``:
    any (every permutation) | two (as written, or every addition before the subtractions: two procedures a
    small model can learn, chosen by the teacher at random)."""
    if procedures == "two":
        candidates = [tuple(terms), tuple([t for t in terms if t[0] == "+"] + [t for t in terms if t[0] == "-"])]
    else:
        candidates = list(itertools.permutations(terms))
    out = []
    for perm in dict.fromkeys(candidates):
        if perm[0][0] != "+":
            continue
        v, ok = perm[0][1], True
        for op, b in perm[1:]:
            v = v + b if op == "+" else v - b
            ok = ok and 0 <= v <= max_value
        if ok:
            out.append(perm)
    return out


def expression(terms: list[Term]) -> str:
    return str(terms[0][1]) + "".join(f"{op}{b}" for op, b in terms[1:])


def value(terms) -> int:
    return sum(b if op == "+" else -b for op, b in terms)


def trace(order) -> str:
    lines, v = [], order[0][1]
    for op, b in order[1:]:
        new = v + b if op == "+" else v - b
        lines.append(f"{v}{op}{b}={new}")
        v = new
    return "\n".join(lines) + f"\n\\boxed{{{v}}}"


def _problem(rng: random.Random, cfg: TaskConfig) -> tuple[list[Term], list]:
    while True:
        n = rng.randint(cfg.min_terms, cfg.max_terms)
        terms = [("+", rng.randint(1, cfg.max_operand))] + \
            [(rng.choice("+-"), rng.randint(1, cfg.max_operand)) for _ in range(n - 1)]
        valid = orders(terms, cfg.max_value, cfg.procedures)
        if terms[0] in [o[0] for o in valid] and tuple(terms) in valid and len(valid) >= cfg.min_orders:
            return terms, valid


def generate(cfg: TaskConfig) -> dict[str, list[dict]]:
    """Rows per split: id, problem, answer, level (terms), orders (how many valid), response (a gold trace in a
    random valid order). All problems are drawn first, then dealt to the splits at random, so that every split
    has the same distribution (drawing split by split would let the first exhaust the small spaces)."""
    rng = random.Random(cfg.seed)
    total = sum(getattr(cfg, f"{split}_problems") for split in SPLITS)
    pool: dict[str, tuple] = {}
    misses = 0
    while len(pool) < total:
        terms, valid = _problem(rng, cfg)
        expr = expression(terms)
        if expr in pool:
            misses += 1
            if misses > 100 * total + 10000:
                raise ConfigError(f"task: found only {len(pool)} distinct problems of the {total} asked for "
                                  "(raise max_operand or max_terms, or ask for fewer problems)")
            continue
        pool[expr] = (terms, valid)
    exprs = list(pool)
    rng.shuffle(exprs)
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        n = getattr(cfg, f"{split}_problems")
        chosen, exprs = exprs[:n], exprs[n:]
        out[split] = []
        for expr in chosen:
            terms, valid = pool[expr]
            out[split].append({"id": f"{split}-{len(out[split])}", "problem": f"{expr}=?",
                               "answer": str(value(terms)), "level": len(terms), "orders": len(valid),
                               "response": trace(rng.choice(valid))})
    return out


def write(cfg: TaskConfig, out_dir: Path) -> dict[str, str]:
    """The task's gold files; returns their paths: ``teacher.jsonl`` (the teacher's training data: problem,
    response, answer), ``{sft,stage2}_problems.jsonl`` (id, problem, answer: what the teacher is sampled on) and
    ``val.jsonl``, ``test.jsonl`` (``--bench`` format)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = generate(cfg)
    paths = {}
    fields = {"teacher": ("problem", "response", "answer"), "sft": ("id", "problem", "answer"),
              "stage2": ("id", "problem", "answer"), "val": ("id", "problem", "answer", "level"),
              "test": ("id", "problem", "answer", "level")}
    for split, keep in fields.items():
        name = f"{split}_problems" if split in ("sft", "stage2") else split
        paths[name] = str(write_jsonl(out_dir / f"{name}.jsonl", ({k: r[k] for k in keep} for r in splits[split])))
    return paths


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def is_in_order(problem: str, response: str) -> bool:
    """Whether a trace adds the terms in the order the expression writes them (its trace type in the probe)."""
    return response.split("\n", 1)[0].split("=", 1)[0] == _first_two(problem.rstrip("=?"))


def _first_two(expr: str) -> str:
    cut = [i for i, c in enumerate(expr) if c in "+-" and i > 0]
    return expr[:cut[1]] if len(cut) > 1 else expr


# ----------------------------------------------------------------------------- the tokenizer


def build_tokenizer(out_dir: Path) -> None:
    """Write the character-level tokenizer (loadable with ``AutoTokenizer.from_pretrained(out_dir)``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one character a token
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    config = Path(out_dir) / "tokenizer_config.json"  # loadable by transformers 4.56 too (not only 5.x's name)
    meta = json.loads(config.read_text())
    meta.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    config.write_text(json.dumps(meta, indent=2) + "\n")


def main(argv=None) -> int:
    """Regenerate the shipped tokenizer."""
    from importlib import resources

    build_tokenizer(Path(str(resources.files("redi_ds"))) / "assets" / "tokenizer" / "arith")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
