"""Answer extraction and grading: ``grade(response, gold) -> bool``.

Extraction (:func:`extract_answer`): the content of the *last* ``\\boxed{...}`` / ``\\fbox{...}`` of the
response, with nested braces matched (escaped ``\\{`` ``\\}`` do not count), the brace-less form
``\\boxed 5`` (up to the next space or ``$``), and an unclosed ``\\boxed{`` ignored (the last *closed*
box wins). It runs in linear time on any input.

Equivalence: both sides are cleaned (outer ``$...$``, ``\\(...\\)``, ``\\dfrac``, ``4.5e33``, ...) and
compared, first as canonical strings (leading zeros as in AIME's ``025``, trailing ``.0`` as in AMC's
``27.0``, spacing and ``\\left``/``\\right``), then with math-verify (LaTeX, fractions, decimals, intervals,
sets, tuples, degrees, units and text answers). A gold that is a list (redi_rllm minerva / olympiad
answers) is a set of accepted variants: any variant counts.

math-verify never runs in the calling process: each calling thread owns a small long-lived worker
*subprocess* (``redi_ds.eval._grade_worker``) that does the parse/verify, and the caller waits for the
answer with a deadline (``select`` on a pipe). A pathological input therefore cannot hang the caller,
whether it is the main thread, another thread or a (daemonic) multiprocessing worker: past the deadline
the worker is killed, replaced on the next call, and the grade is ``False``. Inside the worker
math-verify's own signal-based timeouts are also on (it runs in that process's main thread), so slow
pure-Python cases usually recover without a restart. math-verify is imported only in the worker.
Answers longer than :data:`MAX_ANSWER_CHARS` are compared as strings only.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from redi_ds.eval.errors import EvalError

log = logging.getLogger(__name__)

Gold = Union[str, int, float, Sequence[Union[str, int, float]]]

DEFAULT_TIMEOUT = float(os.environ.get("REDI_GRADE_TIMEOUT", "10"))  # seconds per grade (math-verify part)
STARTUP_TIMEOUT = float(os.environ.get("REDI_GRADE_STARTUP_TIMEOUT", "120"))  # worker import of math-verify
MAX_ANSWER_CHARS = 1000  # longer extracted answers are compared as strings only (never parsed)

# Counters for this process (read them to report timeouts); incremented under _STATS_LOCK.
STATS = {"graded": 0, "fast_path": 0, "timeouts": 0, "worker_starts": 0}  # timeouts include worker deaths
_STATS_LOCK = threading.Lock()
_warned_timeout = False


class GradeError(EvalError):
    """The grader worker cannot run at all (math-verify missing or the interpreter cannot start)."""


# ----------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_STOP_BARE = re.compile(r"[\s$]")


def _match_brace(s: str, open_pos: int, limit: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_pos``, searching before ``limit``; -1 if unclosed."""
    depth = 0
    i = open_pos
    while i < limit:
        c = s[i]
        if c == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def extract_answer(response: object) -> Optional[str]:
    """The content of the last closed ``\\boxed{...}``/``\\fbox{...}`` (or ``\\boxed 5``) of ``response``.

    Returns ``None`` when there is no (closed) box. Linear time: when a box starting at ``p`` is
    unclosed, every earlier box still open at ``p`` is unclosed too, so earlier candidates are only
    scanned up to ``p``.
    """
    if not isinstance(response, str) or "\\" not in response:
        return None
    s = response
    starts = [m.end() for m in _BOX_RE.finditer(s)]
    limit = len(s)
    for end in reversed(starts):
        j = end
        while j < len(s) and s[j] in " \t":
            j += 1
        if j < len(s) and s[j] == "{":
            if j >= limit:
                continue
            close = _match_brace(s, j, limit)
            if close >= 0:
                return s[j + 1 : close].strip()
            limit = end  # unclosed: earlier candidates cannot close past here
            continue
        if j > end or (j < len(s) and s[j] not in "{\\"):
            # brace-less form: "\boxed 5", up to the next whitespace or "$"
            m = _STOP_BARE.search(s, j)
            bare = s[j : m.start() if m else len(s)].rstrip(".,;:")
            if bare:
                return bare
    return None


# ----------------------------------------------------------------------------- normalisation

_SCI_RE = re.compile(r"([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*[eE]\s*([-+]?\d+)")
_NUM_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\left|\\right|\\[,;:! ]|\\quad|\\qquad|\\displaystyle|\s+")


def clean_answer(ans: object) -> str:
    """Strip presentation wrappers that the bundled sets and models use around an answer."""
    s = str(ans).strip()
    for _ in range(3):  # nested wrappers like "$\( x \)$"
        before = s
        if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
            s = s.strip("$").strip()
        for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(a) and s.endswith(b):
                s = s[len(a) : -len(b)].strip()
        s = s.rstrip(".").strip() if not s.endswith("..") else s
        if s == before:
            break
    # inner math delimiters ("221,$8" in OlympiadBench, "+$ $" in Minerva) and currency signs carry no value
    s = s.replace("\\$", "").replace("$", "").strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\!", "")
    m = _SCI_RE.fullmatch(s)
    if m:  # "4.5e33" (minerva golds) reads as 4.5 * e * 33 in LaTeX
        s = f"{m.group(1)} \\times 10^{{{m.group(2)}}}"
    return s


def canonical(ans: object) -> str:
    """A string key: equal keys mean equal answers (the fast path; unequal keys decide nothing)."""
    s = clean_answer(ans)
    s = _SPACING_RE.sub("", s)
    for _ in range(2):
        m = _WRAP_RE.fullmatch(s)
        if m:
            s = m.group(1).strip()
    if _NUM_RE.fullmatch(s):
        s = _canonical_number(s)
    return s


def _canonical_number(s: str) -> str:
    """Exact decimal canonical form: "025" -> "25", "27.0" -> "27", "-0.50" -> "-0.5", ".5" -> "0.5"."""
    sign = "-" if s.startswith("-") else ""
    whole, _, frac = s.lstrip("+-").partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    return "0" if out == "0" else sign + out


def gold_variants(gold: object) -> list[str]:
    """A gold answer as its list of accepted variants (a str gold is one variant)."""
    if gold is None:
        return []
    if isinstance(gold, (list, tuple)):
        items = list(gold)
    else:
        items = [gold]
    out = []
    for g in items:
        if g is None or isinstance(g, (list, tuple, dict)):
            continue
        g = str(g).strip()
        if "\\boxed" in g or "\\fbox" in g:  # a gold written as a boxed solution
            g = extract_answer(g) or g
        g = clean_answer(g)
        if g:
            out.append(g)
    return out


# ----------------------------------------------------------------------------- the worker process


def _pkg_root() -> str:
    return str(Path(__file__).resolve().parents[2])


_ALL_WORKERS: "weakref.WeakSet[_Worker]" = weakref.WeakSet()


class _Worker:
    """One math-verify subprocess, owned by one thread of one process; JSON lines over pipes."""

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        env = dict(os.environ)
        env["PYTHONPATH"] = _pkg_root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "redi_ds.eval._grade_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        except OSError as e:
            raise GradeError(f"cannot start the grader worker ({sys.executable}): {e}") from None
        self._buf = b""
        with _STATS_LOCK:
            STATS["worker_starts"] += 1
        msg = self._read(STARTUP_TIMEOUT)
        if not msg or not msg.get("ready"):
            self.kill()
            why = (msg or {}).get("error") or "no answer within the startup timeout or it exited"
            raise GradeError(f"grader worker failed to start: {why}")
        _ALL_WORKERS.add(self)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _read(self, timeout: float) -> Optional[dict]:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                ready, _, _ = select.select([fd], [], [], remaining)
            except (OSError, ValueError):
                return None
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None  # EOF: the worker died
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return None

    def verify(self, golds: list[str], pred: str, timeout: float) -> Optional[bool]:
        """math-verify's verdict, or None when the worker timed out or died (it is then killed)."""
        req = json.dumps({"g": golds, "p": pred, "t": timeout}) + "\n"
        try:
            self.proc.stdin.write(req.encode("utf-8"))
            self.proc.stdin.flush()
        except (OSError, ValueError):
            self.kill()
            return None
        msg = self._read(timeout)
        if msg is None:
            self.kill()
            return None
        return bool(msg.get("ok"))

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except Exception:
                pass

    def abandon(self) -> None:
        """In a forked child: drop the inherited pipes without touching the parent's worker."""
        proc, self.proc = self.proc, None
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except Exception:
                    pass
            proc.returncode = 0  # keep Popen.__del__ quiet; the parent owns that process

    def close(self) -> None:
        if self.proc is None:
            return
        if os.getpid() != self.owner_pid:
            self.abandon()
            return
        try:
            self.proc.stdin.close()  # the worker exits on EOF
            self.proc.wait(timeout=2)
        except Exception:
            pass
        self.kill()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


_local = threading.local()


def _worker() -> _Worker:
    w = getattr(_local, "worker", None)
    if w is not None and (w.owner_pid != os.getpid() or not w.alive()):
        if w.owner_pid != os.getpid():
            w.abandon()
        else:
            w.kill()
        w = None
    if w is None:
        w = _Worker()
        _local.worker = w
    return w


def shutdown_workers() -> None:
    """Stop this process's grader workers (they are also stopped at exit and when their thread ends)."""
    for w in list(_ALL_WORKERS):
        w.close()
    _local.__dict__.pop("worker", None)


atexit.register(shutdown_workers)


# ----------------------------------------------------------------------------- grading


def _count(key: str) -> None:
    with _STATS_LOCK:
        STATS[key] += 1


def grade_answer(answer: object, gold: Gold, *, timeout: Optional[float] = None, fast_path: bool = True) -> bool:
    """Grade an already-extracted answer against ``gold`` (a string or a list of accepted variants).

    ``fast_path=False`` skips the canonical-string comparison and always asks math-verify (for tests
    and debugging; the verdicts agree, the fast path only saves time).
    """
    global _warned_timeout
    try:
        _count("graded")
        if answer is None:
            return False
        golds = gold_variants(gold)
        pred = clean_answer(answer)
        if not golds or not pred:
            return False
        key = canonical(pred)
        if fast_path and any(canonical(g) == key for g in golds):
            _count("fast_path")
            return True
        if len(pred) > MAX_ANSWER_CHARS:
            return False
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        verdict = _worker().verify(golds, pred, timeout)
        if verdict is None:
            _count("timeouts")
            if not _warned_timeout:
                _warned_timeout = True
                log.warning("grading timed out after %.1fs (answer %.60r...): counted as wrong", timeout, pred)
            return False
        return verdict
    except GradeError:
        raise
    except Exception as e:  # never raise on garbage
        log.debug("grade failed: %r", e)
        return False


def grade(response: object, gold: Gold, *, timeout: Optional[float] = None, fast_path: bool = True) -> bool:
    """True when the last ``\\boxed{}`` answer of ``response`` is equivalent to ``gold``.

    ``gold`` is a string (``"025"``, ``"27.0"``, ``"$\\frac{1}{2}$"``) or a list of accepted variants.
    Never raises on bad input and never blocks longer than about ``timeout`` seconds (default
    :data:`DEFAULT_TIMEOUT`, env ``REDI_GRADE_TIMEOUT``) plus the one-time start of this thread's
    grader worker. Safe in threads and in (daemonic) worker processes. Raises :class:`GradeError` only
    when the grader cannot run at all (math-verify not installed).
    """
    return grade_answer(extract_answer(response), gold, timeout=timeout, fast_path=fast_path)


def grade_many(
    responses: Iterable[object],
    golds: Iterable[Gold],
    *,
    workers: Optional[int] = None,
    timeout: Optional[float] = None,
    fast_path: bool = True,
) -> list[bool]:
    """``[grade(r, g) for r, g in zip(responses, golds)]`` on ``workers`` threads (each with its own
    grader subprocess; default: the number of CPUs, at most 8)."""
    pairs = list(zip(responses, golds))
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    workers = max(1, min(int(workers), len(pairs) or 1))
    if workers == 1:
        return [grade(r, g, timeout=timeout, fast_path=fast_path) for r, g in pairs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="redi-grade") as pool:
        return list(pool.map(lambda p: grade(p[0], p[1], timeout=timeout, fast_path=fast_path), pairs))
