"""The CPU-scale task of the ablation: arithmetic with a teacher that mixes two valid kinds of trace.

A problem is an expression of 2-3 additions and subtractions over operands in [1, 99] whose running value stays
in [0, 199]; its answer is the value. The teacher answers every problem correctly, in one of two styles:

    steps:   "12+34=46\\n46-5=41\\n\\boxed{41}"       one operation a line, then the boxed answer
    direct:  "\\boxed{41}"                            the answer at once

Both are valid, and the positives say nothing about which one a small student can carry out: the steps are
easy to learn, the direct answers are not (a 3-layer model does not learn 3-term mental arithmetic from a few
thousand examples). A student trained on the mixture writes direct answers for part of the problems and gets
many of them wrong; its own wrong samples carry what the positives lack, which style fails *for it*. That is
the regime where the negative term of REDI can add information (docs/ablation.md gives the measurements behind
the choice; the pilot without it, one style and planted slips, found continued SFT as good or better).

The teacher also makes mistakes, which are the classic REDI negatives: a slip of +-1, +-2 or +-10 in one step
carried through to a wrong boxed answer (steps style), or a wrong boxed answer (direct style), in the same
style mix. These carry no information about the student.

Splits (disjoint expressions): ``sft`` (stage 1), ``stage2`` (the problems every stage-2 branch trains on:
continued SFT on their teacher traces, or pairs), ``val`` (choosing hyperparameters) and ``test`` (the held-out
set of the report, in ``python -m redi_ds.eval --bench`` format). Everything is a function of the seed.

The tokenizer is character-level (a WordLevel model over single characters, built with ``tokenizers``; see
``build_tokenizer``) and ships as ``redi_ds/assets/tokenizer/arith`` (``model.tokenizer: arith``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
STYLES = ("steps", "direct")


@dataclass
class TaskConfig:
    sft_problems: int = 4000
    stage2_problems: int = 2000
    val_problems: int = 1000
    test_problems: int = 2000
    min_ops: int = 2
    max_ops: int = 3
    max_operand: int = 99
    max_value: int = 199
    direct_fraction: float = 0.5  # teacher traces in the direct style
    seed: int = 1234


# ----------------------------------------------------------------------------- problems and traces


def _problem(rng: random.Random, cfg: TaskConfig) -> tuple[list[int], list[str]]:
    while True:
        n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
        nums = [rng.randint(1, cfg.max_operand) for _ in range(n_ops + 1)]
        ops = [rng.choice("+-") for _ in range(n_ops)]
        values = _running(nums, ops)
        if all(0 <= v <= cfg.max_value for v in values):
            return nums, ops


def _running(nums: list[int], ops: list[str]) -> list[int]:
    out, v = [], nums[0]
    for op, b in zip(ops, nums[1:]):
        v = v + b if op == "+" else v - b
        out.append(v)
    return out


def expression(nums: list[int], ops: list[str]) -> str:
    return str(nums[0]) + "".join(f"{op}{b}" for op, b in zip(ops, nums[1:]))


def trace(nums: list[int], ops: list[str], style: str, slip: Optional[tuple[int, int]] = None) -> str:
    """The teacher's trace; ``slip=(step, delta)`` adds delta to that step's result and carries it through."""
    if style == "direct":
        value = _running(nums, ops)[-1] + (slip[1] if slip else 0)
        return f"\\boxed{{{value}}}"
    lines, v = [], nums[0]
    for i, (op, b) in enumerate(zip(ops, nums[1:])):
        new = (v + b if op == "+" else v - b) + (slip[1] if slip and slip[0] == i else 0)
        lines.append(f"{v}{op}{b}={new}")
        v = new
    return "\n".join(lines) + f"\n\\boxed{{{v}}}"


def _slip(rng: random.Random, n_ops: int) -> tuple[int, int]:
    return rng.randrange(n_ops), rng.choice([-10, -2, -1, 1, 2, 10])


def generate(cfg: TaskConfig) -> dict[str, list[dict]]:
    """Rows per split: id, problem, answer, level (operations), style, response, rejected (a teacher mistake)."""
    rng = random.Random(cfg.seed)
    sizes = {"sft": cfg.sft_problems, "stage2": cfg.stage2_problems, "val": cfg.val_problems,
             "test": cfg.test_problems}
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        rows = []
        while len(rows) < n:
            nums, ops = _problem(rng, cfg)
            expr = expression(nums, ops)
            if expr in seen:
                continue
            seen.add(expr)
            style = "direct" if rng.random() < cfg.direct_fraction else "steps"
            bad_style = "direct" if rng.random() < cfg.direct_fraction else "steps"
            rows.append({
                "id": f"{split}-{len(rows)}", "problem": f"{expr}=?", "answer": str(_running(nums, ops)[-1]),
                "level": len(ops), "style": style, "response": trace(nums, ops, style),
                "rejected": trace(nums, ops, bad_style, _slip(rng, len(ops))), "rejected_style": bad_style,
            })
        out[split] = rows
    return out


def write(cfg: TaskConfig, out_dir: Path) -> dict[str, str]:
    """The task's files; returns their paths:

    sft.jsonl            stage 1: problem, response, answer
    stage2.jsonl         continued SFT on the stage-2 problems: problem, response, answer
    teacher_pairs.jsonl  stage-2 pairs with the teacher's mistakes: prompt, chosen, rejected, answer
    val.jsonl, test.jsonl  held-out sets (id, problem, answer, level), ``--bench`` format
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = generate(cfg)
    paths = {}

    def dump(name: str, rows) -> None:
        path = out_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        paths[name] = str(path)

    for split in ("sft", "stage2"):
        dump(split, ({"problem": r["problem"], "response": r["response"], "answer": r["answer"], "style": r["style"]}
                     for r in splits[split]))
    dump("teacher_pairs", ({"prompt": r["problem"], "chosen": r["response"], "rejected": r["rejected"],
                            "answer": r["answer"]} for r in splits["stage2"]))
    for split in ("val", "test"):
        dump(split, ({"id": r["id"], "problem": r["problem"], "answer": r["answer"], "level": r["level"]}
                     for r in splits[split]))
    return paths


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


# ----------------------------------------------------------------------------- what the models write


def style_of(response: str) -> str:
    """steps (at least one "a+b=c" line before the box) or direct."""
    return "steps" if "=" in response.split("\\boxed", 1)[0] else "direct"


def styles(out: Path) -> list[dict]:
    """Per model of an ablation's output folder: the share of its held-out answers in the steps style, and its
    accuracy in each style (from the scored samples: ``scores/test/samples.jsonl``)."""
    rows = []
    for samples in sorted(Path(out).glob("**/scores/test/samples.jsonl")):
        stage_dir = samples.parents[2]
        name = "base" if stage_dir.parent.name == "base" else \
            f"{stage_dir.parents[2].name} {stage_dir.parents[1].name} {stage_dir.parent.name}"
        by = {"steps": [0, 0], "direct": [0, 0]}
        for line in samples.read_text().splitlines():
            r = json.loads(line)
            k = by[style_of(r["response"])]
            k[0] += 1
            k[1] += int(r["correct"])
        n = sum(v[0] for v in by.values())
        rows.append({"model": name, "steps_share": by["steps"][0] / n,
                     **{f"{s}_accuracy": (c / m if m else float("nan")) for s, (m, c) in by.items()}})
    return rows


def main(argv=None) -> int:
    import argparse
    from importlib import resources

    ap = argparse.ArgumentParser(prog="python -m redi_ds.ablation.task")
    ap.add_argument("--styles", metavar="OUT", help="an ablation's output folder: the style table of its models")
    args = ap.parse_args(argv)
    if args.styles is None:  # regenerate the shipped tokenizer
        build_tokenizer(Path(str(resources.files("redi_ds"))) / "assets" / "tokenizer" / "arith")
        return 0
    print("| model | answers in steps style (%) | accuracy, steps (%) | accuracy, direct (%) |")
    print("|---|---:|---:|---:|")
    for r in styles(Path(args.styles)):
        print(f"| {r['model']} | {100 * r['steps_share']:.1f} | {100 * r['steps_accuracy']:.1f} | "
              f"{100 * r['direct_accuracy']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
