"""The grader worker process: ``python -m redi_ds.eval._grade_worker``.

Reads one JSON request per line on stdin (``{"g": [gold variants], "p": answer, "t": seconds}``) and
writes ``{"ok": bool}`` per line on stdout. The first line it writes is ``{"ready": true}`` (or
``{"error": ...}`` when math-verify cannot be imported). It exits at EOF on stdin, i.e. when its parent
closes the pipe or dies. math-verify runs in this process's main thread, so its signal-based timeouts
work here; the parent additionally enforces a hard deadline and kills this process past it.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _setup():
    import logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL + 1)
    latex = LatexExtractionConfig(boxed_match_priority=0)
    configs = [latex, ExprExtractionConfig()]

    cache: dict[str, tuple] = {}  # successful parses only (a timed-out parse is retried next time)

    def _parse(text: str, seconds: int) -> tuple:
        hit = cache.get(text)
        if hit is not None:
            return hit
        result = tuple(parse(text, extraction_config=configs, parsing_timeout=seconds))
        if result:
            if len(cache) >= 16384:
                cache.clear()
            cache[text] = result
        return result

    def parse_answer(answer: str, seconds: int) -> list:
        # gold and prediction are parsed alike (so an answer equal to its gold is parsed once, cached)
        return list(_parse("\\boxed{" + answer + "}", seconds) or _parse("$" + answer + "$", seconds))

    def check(golds: list[str], pred: str, seconds: int) -> bool:
        parsed_pred = parse_answer(pred, seconds)
        if not parsed_pred:
            return False
        for g in golds:
            parsed_gold = parse_answer(g, seconds)
            if parsed_gold and verify(parsed_gold, parsed_pred, timeout_seconds=seconds):
                return True
        return False

    return check


_proto = sys.stdout


def _send(obj: dict) -> None:
    _proto.write(json.dumps(obj) + "\n")
    _proto.flush()


def main() -> int:
    global _proto
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    # keep the protocol on a private copy of stdout; anything a library prints goes to stderr instead
    _proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        check = _setup()
    except Exception as e:
        _send({"error": f"cannot import math-verify: {type(e).__name__}: {e}"})
        return 1
    _send({"ready": True})
    for line in sys.stdin:
        ok = False
        try:
            req = json.loads(line)
            seconds = max(1, int(float(req.get("t") or 10) / 3))
            golds = [str(g) for g in req.get("g") or []]
            ok = bool(check(golds, str(req.get("p", "")), seconds))
        except BaseException:  # math-verify's TimeoutException is a BaseException; sympy errors; bad JSON
            ok = False
        _send({"ok": ok})
    return 0


if __name__ == "__main__":
    sys.exit(main())
