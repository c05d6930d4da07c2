"""One way to load a tokenizer folder, and an export's round trip.

transformers 5 resolves a folder that also holds a ``config.json`` to the model type's own tokenizer class (a Qwen2
body loads ``Qwen2Tokenizer``) and rebuilds it from the vocabulary with that family's pre-tokenizer. A folder whose
``tokenizer.json`` is another tokenizer (the character-level ``arith`` one, a user's own vocabulary on a Qwen2
body) then encodes differently from the tokenizer it was trained with: ``Qwen2Tokenizer`` drops the newlines of
``arith``. ``auto_tokenizer`` keeps ``AutoTokenizer``'s choice unless the folder's own ``tokenizer.json`` encodes a
probe differently; then the ``tokenizer.json`` wins, since it is what was saved from the training tokenizer.
"""

from __future__ import annotations

import os

# digits, operators, newlines, spaces, a non-ASCII character: what a rebuilt tokenizer is likely to lose
PROBE = "12+7=19\n19-5=14\n\\boxed{14} The answer: x^2 = 4, so x = \u00b12.\n\n"


def encode(tok, text: str = PROBE) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def auto_tokenizer(source):
    """``AutoTokenizer.from_pretrained(source)``, or the folder's ``tokenizer.json`` as is when they disagree."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = os.path.expanduser(str(source))
    own_file = os.path.isfile(os.path.join(folder, "tokenizer.json"))
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception:  # the model type's own class cannot read this folder: its tokenizer.json can
        if not own_file:
            raise
        return PreTrainedTokenizerFast.from_pretrained(folder)
    if not own_file:
        return tok
    if type(tok) is PreTrainedTokenizerFast:
        return tok  # already the tokenizer.json as is
    own = PreTrainedTokenizerFast.from_pretrained(folder)
    return own if encode(own) != encode(tok) else tok


def save_tokenizer(tokenizer, out_dir: str) -> None:
    """``tokenizer.save_pretrained(out_dir)``, checked: the folder loads (``auto_tokenizer``) to the same ids and
    chat template, or the export fails here rather than evaluating a different tokenizer later."""
    tokenizer.save_pretrained(out_dir)
    messages = [{"role": "user", "content": "1+2=?"}, {"role": "assistant", "content": PROBE}]

    def fingerprint(tok) -> tuple:
        rendered = tok.apply_chat_template(messages, tokenize=False) if tok.chat_template else ""
        return tuple(encode(tok, PROBE + rendered)), tok.chat_template

    if fingerprint(auto_tokenizer(out_dir)) != fingerprint(tokenizer):
        raise RuntimeError(f"export: the tokenizer saved to {out_dir} does not load back to the training tokenizer")
