"""Prompts: the model's chat template with the paper's instruction, and an optional forced ``<think>``.

By default a problem becomes ``[system: PAPER_INSTRUCTION, user: problem]`` rendered with the
tokenizer's chat template and its generation prompt (Qwen2.5-Math's evaluation setting, which the REDI
templates also use as their default system turn). ``system_prompt=None`` leaves the system turn to the
template; ``user_template`` (with a ``{problem}`` placeholder) puts text around the problem, e.g. the
instruction in the user turn for R1-style models. ``force_think`` ends the prompt with ``<think>\\n``
(REDI's ``..._redi_force_think`` template does the same); the recorded response excludes it.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from typing import Any, Optional

from redi_ds.eval.errors import EvalError

log = logging.getLogger(__name__)

PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
THINK_OPEN = "<think>\n"

# Named chat templates bundled with the Qwen2.5 tokenizer (REDI's own templates, see assets/tokenizer).
CHAT_TEMPLATES = {
    "qwen2.5-math": "chat_template_qwen2.5_math.jinja",
    "qwen2.5-math-force-think": "chat_template_qwen2.5_math_redi_force_think.jinja",
}
BUNDLED_TOKENIZERS = {"qwen2.5": "qwen2.5", "arith": "arith"}  # name -> assets/tokenizer/<folder>


def resolve_tokenizer(source):
    """A bundled tokenizer's folder for its name (``qwen2.5``, ``arith``); anything else as given."""
    if isinstance(source, str) and source in BUNDLED_TOKENIZERS:
        return _asset(BUNDLED_TOKENIZERS[source])
    return source

_warned_no_template = False


def _asset(*parts: str) -> str:
    return str(resources.files("redi_ds").joinpath("assets", "tokenizer", *parts))


def resolve_chat_template(chat_template: Optional[str]) -> Optional[str]:
    """None (keep the tokenizer's), a bundled name (``qwen2.5-math``, ``qwen2.5-math-force-think``), a
    path to a ``.jinja`` file, or a literal Jinja template -> the template text (or None)."""
    if chat_template is None:
        return None
    if chat_template in CHAT_TEMPLATES:
        with open(_asset("qwen2.5", CHAT_TEMPLATES[chat_template]), encoding="utf-8") as f:
            return f.read()
    if "{%" in chat_template or "{{" in chat_template:
        return chat_template
    path = os.path.expanduser(chat_template)
    if not os.path.isfile(path):
        known = ", ".join(CHAT_TEMPLATES)
        raise EvalError(f"chat template not found: {chat_template!r} (a .jinja path or one of: {known})")
    with open(path, encoding="utf-8") as f:
        return f.read()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(model: Any, tokenizer: Optional[str] = None, chat_template: Optional[str] = None):
    """The HF tokenizer for ``model`` (or ``tokenizer``: a path, hub name or ``qwen2.5`` for the bundled
    one), left-padded, with ``chat_template`` applied. Errors become :class:`EvalError`."""
    from redi_ds.hf_tokenizer import auto_tokenizer

    source = resolve_tokenizer(tokenizer if tokenizer is not None else model)
    if not isinstance(source, (str, os.PathLike)):
        raise EvalError("pass tokenizer= (a path or hub name) when the model is an in-memory object")
    folder = os.path.expanduser(str(source))
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise EvalError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); pass "
                        "--tokenizer (a folder, a hub name or qwen2.5)")
    try:
        tok = auto_tokenizer(str(source))
    except Exception as e:
        raise EvalError(f"cannot load the tokenizer from {str(source)!r}: {_first_line(e)}") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    template = resolve_chat_template(chat_template)
    if template is not None:
        tok.chat_template = template
    return tok


def build_prompt(
    tokenizer,
    problem: str,
    *,
    system_prompt: Optional[str] = PAPER_INSTRUCTION,
    user_template: str = "{problem}",
    force_think: bool = False,
) -> str:
    """The text given to the model for one problem (see the module docstring)."""
    global _warned_no_template
    user = user_template.replace("{problem}", problem) if "{problem}" in user_template else f"{user_template}{problem}"
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}
    ]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        if not _warned_no_template:
            _warned_no_template = True
            log.warning("the tokenizer has no chat template: using a plain-text prompt (pass --chat-template)")
        text = (f"{system_prompt}\n\n" if system_prompt else "") + user + "\n"
    if force_think and not text.rstrip(" ").endswith("<think>\n") and not text.endswith("<think>"):
        text += THINK_OPEN
    return text


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".strip()
