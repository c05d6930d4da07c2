import json

import pytest
import torch

from redi_ds.config import ModelConfig
from redi_ds.data import DataError
from redi_ds.data import synthetic
from redi_ds.data.collate import collate, token_counts
from redi_ds.data.layout import PAIRS, SFT_ROWS
from redi_ds.data.sources import load_source
from redi_ds.data.tokenize import ChatEncoder, encode_dataset
from redi_ds.model import load_tokenizer

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(tokenizer="qwen2.5", chat_template="qwen2.5-math"), "tiny")


@pytest.fixture(scope="module")
def enc(tok):
    return ChatEncoder(tok, SYSTEM)


def test_prompt_and_response_tokens(tok, enc):
    p = enc.prompt_ids("What is 2+3?")
    assert tok.decode(p) == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                             "<|im_start|>assistant\n")
    r = enc.response_ids("It is $\\boxed{5}$.")
    assert r[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # the end-of-turn token is a target
    assert tok.decode(r) == "It is $\\boxed{5}$.<|im_end|>"


def test_labels_only_on_response(tok):
    ex = {"prompt_ids": [1, 2, 3], "response_ids": [4, 5]}
    b = collate([ex], SFT_ROWS, pad_id=0)
    # position t predicts token t+1: positions 2 (->4) and 3 (->5) are targets; the last position has none
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["targets"].tolist() == [[-100, -100, 4, 5, -100]]


def test_pair_collation_padded_and_packed():
    exs = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
           {"prompt_ids": [7], "chosen_ids": [8, 9], "rejected_ids": [10]}]
    b = collate(exs, PAIRS, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0, 0], [7, 8, 9, 0, 0], [1, 2, 4, 5, 6], [7, 10, 0, 0, 0]]
    assert b["targets"].tolist() == [[-100, 3, -100, -100, -100], [8, 9, -100, -100, -100],
                                     [-100, 4, 5, 6, -100], [10, -100, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert token_counts(b).tolist() == [1, 2, 3, 1]
    p = collate(exs, PAIRS, pad_id=0, padding_free=True)
    assert p["input_ids"].tolist() == [[1, 2, 3, 7, 8, 9, 1, 2, 4, 5, 6, 7, 10]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert p["seq_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3]]
    assert p["targets"].tolist() == [[-100, 3, -100, 8, 9, -100, -100, 4, 5, 6, -100, 10, -100]]
    assert p["attention_mask"] is None and p["num_seqs"] == 4
    assert token_counts(p).tolist() == [1, 2, 3, 1]


def test_padding_free_logprobs_equal_padded(tok, enc):
    import transformers

    from redi_ds.losses import loss_config
    from redi_ds.kernels import FusedHeadOptions
    from redi_ds.losses import build_loss
    from redi_ds.model import PolicyModel

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    hf = transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float64)
    model = PolicyModel(hf, build_loss(loss_config("redi")), FusedHeadOptions(impl="reference")).eval()
    rows = synthetic.pair_rows(synthetic.generate(3, seed=1))
    exs = [{"prompt_ids": enc.prompt_ids(r["prompt"]), "chosen_ids": enc.response_ids(r["chosen"]),
            "rejected_ids": enc.response_ids(r["rejected"])} for r in rows]
    with torch.no_grad():
        _, padded, n1 = model.sequence_logprobs(collate(exs, PAIRS, tok.pad_token_id))
        _, packed, n2 = model.sequence_logprobs(collate(exs, PAIRS, tok.pad_token_id, padding_free=True))
    assert n1.tolist() == n2.tolist() and len(n1) == 6
    torch.testing.assert_close(packed, padded, rtol=1e-9, atol=1e-9)
    # and packing without position-aware masking would differ: the check can fail
    with torch.no_grad():
        b = collate(exs, PAIRS, tok.pad_token_id, padding_free=True)
        b["position_ids"] = torch.arange(b["input_ids"].shape[1])[None]
        _, leaked, _ = model.sequence_logprobs(b)
    assert not torch.allclose(leaked, padded)


def test_collate_counts_are_the_response_tokens():
    exs = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
           {"prompt_ids": [7], "chosen_ids": [8, 9], "rejected_ids": [10]}]
    for packed in (False, True):
        b = collate(exs, PAIRS, pad_id=0, padding_free=packed)
        assert b["counts"].tolist() == [1, 2, 3, 1] == token_counts(b).tolist()


def test_length_limits_skip_and_count(tok, enc):
    import datasets

    ds = datasets.Dataset.from_list([
        {"prompt": "short", "response": "ok"},
        {"prompt": "word " * 300, "response": "ok"},
        {"prompt": "short", "response": "word " * 300},
    ])
    kept, report = encode_dataset(ds, SFT_ROWS, enc, max_prompt_length=100, max_length=200)
    assert len(kept) == 1 and report.total == 3 and report.kept == 1
    assert report.reasons == {"prompt_too_long": 1, "sequence_too_long": 1}
    assert "1/3 examples kept" in report.line()
    assert kept[0]["num_targets"] == len(kept[0]["response_ids"]) == len(enc.response_ids("ok"))


def test_limits_are_exact_at_the_boundary(tok, enc):
    """A response of exactly the allowed length is kept, one token more is skipped (bounded encoding is exact)."""
    import datasets

    text = "x " * 40
    n = len(enc.response_ids(text))
    p = len(enc.prompt_ids("short"))
    ds = datasets.Dataset.from_list([{"prompt": "short", "response": text}])
    assert len(encode_dataset(ds, SFT_ROWS, enc, max_prompt_length=p, max_length=p + n)[0]) == 1
    assert len(encode_dataset(ds, SFT_ROWS, enc, max_prompt_length=p, max_length=p + n - 1)[0]) == 0
    assert len(encode_dataset(ds, SFT_ROWS, enc, max_prompt_length=p - 1, max_length=p + n)[0]) == 0


def test_a_huge_row_is_skipped_without_tokenizing_it_all(tok, enc, monkeypatch):
    """A 20 MB response is decided from a bounded prefix: the tokenizer never sees more than ~8 chars per
    allowed token (the pilot found 60 s and 4.2 GB for a 50 MB row tokenized in full)."""
    import datasets

    seen = []
    real = enc._encode

    def spy(text):
        seen.append(len(text))
        return real(text)

    monkeypatch.setattr(enc, "_encode", spy)
    huge = "word " * 4_000_000  # 20 MB
    ds = datasets.Dataset.from_list([{"prompt": "short", "response": huge}, {"prompt": "short", "response": "ok"}])
    kept, report = encode_dataset(ds, SFT_ROWS, enc, max_prompt_length=100, max_length=512)
    assert report.reasons == {"sequence_too_long": 1} and len(kept) == 1
    assert max(seen) < 512 * 8 + 2048


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    f = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    f.write_bytes(good + b"\n" + good.replace(b'"a"', b'"caf\xe9"') + b"\n")
    with pytest.raises(DataError, match=rf"^{f}:2: not UTF-8 \(byte 0xe9 at column \d+\)$"):
        load_source(str(f), PAIRS)


def test_unsupported_and_corrupt_files_are_one_line_errors(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\np,a,b\n")
    with pytest.raises(DataError, match=r"pairs.csv: unsupported file type '.csv'"):
        load_source(str(csv), PAIRS)
    bad = tmp_path / "pairs.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match=r"pairs.parquet: cannot read as Parquet") as e:
        load_source(str(bad), PAIRS)
    assert "\n" not in str(e.value)


def test_jsonl_errors_name_file_line_field(tmp_path):
    f = tmp_path / "pairs.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    f.write_text("\n".join([json.dumps(good), json.dumps(good), "{not json", json.dumps(good)]) + "\n")
    with pytest.raises(DataError, match=rf"^{f}:3: invalid JSON"):
        load_source(str(f), PAIRS)
    f.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=rf"^{f}:2: missing field 'rejected'"):
        load_source(str(f), PAIRS)
    f.write_text(json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=rf"^{f}:1: field 'chosen' is empty"):
        load_source(str(f), PAIRS)
    f.write_text(json.dumps({"problem": "p", "response": 3}) + "\n")
    with pytest.raises(DataError, match=rf"^{f}:1: field 'response' must be a string"):
        load_source(str(f), SFT_ROWS)
    f.write_text(json.dumps({"problem": "p", "response": "r"}) + "\n")
    assert load_source(str(f), SFT_ROWS)[0] == {"prompt": "p", "response": "r"}


def test_disk_and_prepared_sources(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"problem": "p", "response": "r", "answer": "1"}]).save_to_disk(str(tmp_path / "sft"))
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}]).save_to_disk(str(tmp_path / "pairs"))
    assert load_source(str(tmp_path), SFT_ROWS)[0] == {"prompt": "p", "response": "r"}
    assert load_source(str(tmp_path), PAIRS)[0] == {"prompt": "p", "chosen": "c", "rejected": "r"}
    datasets.Dataset.from_list([{"prompt": "p", "chosen": None, "rejected": "r"}]).save_to_disk(str(tmp_path / "x"))
    with pytest.raises(DataError, match="x row 0: field 'chosen' must be a string"):
        load_source(str(tmp_path / "x"), PAIRS)
    with pytest.raises(DataError, match="no such file"):
        load_source(str(tmp_path / "missing" / "file.jsonl"), PAIRS)


def test_synthetic_teacher_is_deterministic_and_flawed():
    a, b = synthetic.generate(50, seed=3), synthetic.generate(50, seed=3)
    assert a == b and synthetic.generate(50, seed=4) != a
    for p in a:
        assert p["chosen"].endswith(f"$\\boxed{{{p['answer']}}}$.")
        assert p["rejected_answer"] != p["answer"]
        wrong = [line for line in p["rejected"].splitlines() if line.startswith("Step")
                 and eval(line.split(": ")[1].split(" = ")[0]) != int(line.split(" = ")[1].rstrip("."))]
        assert len(wrong) == 1 and wrong[0].startswith(f"Step {p['slip_step']}:")
        right = [line for line in p["chosen"].splitlines() if line.startswith("Step")
                 and eval(line.split(": ")[1].split(" = ")[0]) != int(line.split(" = ")[1].rstrip("."))]
        assert right == []


def test_cli_malformed_dataset_line_is_one_line_error(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    f = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    f.write_text(f"{good}\n{good}\n" + json.dumps({"prompt": "p", "chosen": "a", "rejected": ["b"]}) + "\n")
    train = Path(__file__).resolve().parent.parent / "launch" / "train.py"
    r = subprocess.run([sys.executable, str(train), "--stage", "redi", "--data.path", str(f),
                        "--model.name_or_path", "tiny", "--run.output_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: {f}:3: field 'rejected' must be a string, got list"
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
