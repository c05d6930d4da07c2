"""Generation backends behind one interface, found by name in ``BACKENDS`` (no if/elif chains).

- ``hf``: transformers ``generate``, batched with left padding; CPU or one GPU.
- ``vllm``: vLLM's offline ``LLM`` (the paper's setting); registered always, usable when vLLM is
  installed and CUDA is available.
- ``auto``: the first available of ``AUTO_ORDER`` (vllm, then hf).

A backend takes ``(model, *, tokenizer, chat_template, dtype, seed, batch_size, **options)``, exposes
``.tokenizer`` (used to build prompts) and ``generate(prompts, n=, temperature=, top_p=, max_new_tokens=,
progress=)`` returning, per prompt, ``n`` :class:`Completion` (text, token count including the stop
token, finish reason ``stop`` or ``length``). ``progress(k)`` is called as k more prompts finish.
Heavy imports (torch, transformers, vllm) happen inside the methods.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

from redi_ds.eval.errors import EvalError
from redi_ds.eval.prompting import _first_line, load_tokenizer, resolve_tokenizer


@dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_new_tokens reached)


class Generator:
    name: ClassVar[str]
    default_batch_size: ClassVar[int] = 16

    @classmethod
    def available(cls) -> bool:
        return True

    def __init__(self, model: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def generate(
        self,
        prompts: list[str],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        progress: Optional[Callable[[int], None]] = None,
    ) -> list[list[Completion]]:
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (GPU memory) once generation is done."""


BACKENDS: dict[str, type[Generator]] = {}
AUTO_ORDER = ["vllm", "hf"]


def register_backend(cls: type[Generator]) -> type[Generator]:
    BACKENDS[cls.name] = cls
    return cls


def check_backend_name(name: str) -> None:
    """A one-line EvalError for a backend name that is neither ``auto`` nor registered."""
    if name != "auto" and name not in BACKENDS:
        raise EvalError(f"unknown backend {name!r} (known: auto, {', '.join(sorted(BACKENDS))})")


def build_generator(name: str, model: Any, **kwargs: Any) -> Generator:
    """Instantiate backend ``name`` (``auto``: the first available in ``AUTO_ORDER``)."""
    check_backend_name(name)
    if name == "auto":
        name = next((n for n in AUTO_ORDER if n in BACKENDS and BACKENDS[n].available()), "hf")
    cls = BACKENDS[name]
    if not cls.available():
        raise EvalError(f"backend {name!r} is not available here (vllm needs `pip install vllm` and a CUDA GPU)")
    return cls(model, **kwargs)


def check_model_path(model: Any) -> None:
    """A one-line :class:`EvalError` for a local model path that does not exist or is not an HF folder."""
    if not isinstance(model, (str, os.PathLike)):
        return
    s = os.path.expanduser(str(model))
    if os.path.isdir(s):
        if not os.path.isfile(os.path.join(s, "config.json")):
            raise EvalError(f"model folder {str(model)!r} has no config.json (not a Hugging Face model folder)")
        return
    # anything else that is not a hub name ("org/name" or "name") is a local path that is missing
    looks_local = s.startswith(("/", "./", "../", "~", ".")) or s.count("/") > 1 or s.endswith(os.sep) \
        or os.path.exists(s)
    if looks_local:
        raise EvalError(f"model path not found: {str(model)!r}")


# ----------------------------------------------------------------------------- HF transformers


def _stop_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in eos if isinstance(eos, (list, tuple)) else [eos]:
        if v is not None:
            ids.add(int(v))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for t in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)


@register_backend
class HFGenerator(Generator):
    """transformers ``generate``: prompts x n samples in batches of ``batch_size`` sequences."""

    name = "hf"
    default_batch_size = 16

    def __init__(self, model: Any, *, tokenizer: Optional[str] = None, chat_template: Optional[str] = None,
                 dtype: str = "auto", seed: int = 0, batch_size: Optional[int] = None, device: Optional[str] = None,
                 attn_implementation: Optional[str] = None, **_: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, PreTrainedModel

        if device is None:  # one GPU per data-parallel rank (torchrun sets LOCAL_RANK)
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.seed = seed
        self.batch_size = int(batch_size or self.default_batch_size)
        if isinstance(model, PreTrainedModel):
            self.model, self._owns_model = model, False
            if tokenizer is None:
                tokenizer = getattr(model, "name_or_path", None) or None
        else:
            check_model_path(model)
            torch_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                           "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
            if torch_dtype is None:
                raise EvalError(f"unknown dtype {dtype!r} (auto, bfloat16, float16, float32)")
            kwargs: dict[str, Any] = {"dtype": torch_dtype}
            if attn_implementation:
                kwargs["attn_implementation"] = attn_implementation
            try:
                self.model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(str(model)), **kwargs)
            except Exception as e:
                raise EvalError(f"cannot load model {str(model)!r}: {_first_line(e)}") from None
            self.model.to(self.device)
            self._owns_model = True
        self.tokenizer = load_tokenizer(model, tokenizer, chat_template)
        self.model.eval()
        self.stop_ids = _stop_ids(self.model, self.tokenizer)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, progress=None):
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        # longest prompts first (less padding); samples of one prompt stay together
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        jobs = [(i, j) for i in order for j in range(n)]
        results: list[list[Optional[Completion]]] = [[None] * n for _ in prompts]
        sampling = temperature > 0
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0]
        stop = set(self.stop_ids)
        torch.manual_seed(self.seed)
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            ids = [encoded[i] for i, _ in batch]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            attention = torch.zeros((len(ids), width), dtype=torch.long)
            for r, x in enumerate(ids):  # left padding
                if x:
                    input_ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
                    attention[r, width - len(x) :] = 1
            budget = max_new_tokens
            if self.max_positions:
                budget = max(1, min(budget, int(self.max_positions) - width))
            gen_cfg = GenerationConfig(
                do_sample=sampling,
                temperature=temperature if sampling else None,
                top_p=top_p if sampling else None,
                top_k=0 if sampling else None,
                max_new_tokens=budget,
                eos_token_id=self.stop_ids,
                pad_token_id=pad,
                use_cache=True,  # whatever the saved generation config says (training turns the cache off)
            )
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    generation_config=gen_cfg,
                )
            gen = out[:, width:].tolist()
            for (i, j), row in zip(batch, gen):
                cut = next((t for t, tid in enumerate(row) if tid in stop), None)
                if cut is None:
                    tokens, reason = row, "length"
                else:
                    tokens, reason = row[: cut + 1], "stop"
                text_ids = tokens if cut is None else tokens[:-1]
                results[i][j] = Completion(tok.decode(text_ids, skip_special_tokens=True), len(tokens), reason)
            if progress is not None:
                done = sum(1 for i, j in batch if j == n - 1)
                if done:
                    progress(done)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if self._owns_model:
            self.model = None
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:
                pass


# ----------------------------------------------------------------------------- vLLM


def _tokenizer_path(tokenizer: Optional[str]) -> Optional[str]:
    if tokenizer is None:
        return None
    return os.path.expanduser(str(resolve_tokenizer(tokenizer)))


@register_backend
class VLLMGenerator(Generator):
    """vLLM offline inference (GPU). ``batch_size`` is the number of prompts submitted per call
    (progress granularity); vLLM schedules sequences itself. Options: ``tensor_parallel_size``,
    ``gpu_memory_utilization``, ``max_model_len``."""

    name = "vllm"
    default_batch_size = 512

    @classmethod
    def available(cls) -> bool:
        if importlib.util.find_spec("vllm") is None:
            return False
        try:
            import torch

            return torch.cuda.is_available()
        except Exception:
            return False

    def __init__(self, model: Any, *, tokenizer: Optional[str] = None, chat_template: Optional[str] = None,
                 dtype: str = "auto", seed: int = 0, batch_size: Optional[int] = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: Optional[int] = None, **_: Any) -> None:
        if not isinstance(model, (str, os.PathLike)):
            raise EvalError("the vllm backend needs a model path or hub name, not an in-memory model")
        check_model_path(model)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = os.environ.get("LOCAL_RANK")
        if world > 1 and local_rank is not None and tensor_parallel_size == 1 \
                and "CUDA_VISIBLE_DEVICES" not in os.environ:
            os.environ["CUDA_VISIBLE_DEVICES"] = local_rank  # one GPU per data-parallel rank
        try:
            from vllm import LLM
        except ImportError as e:
            raise EvalError(f"the vllm backend needs vllm installed: {_first_line(e)}") from None
        self.tokenizer = load_tokenizer(model, tokenizer, chat_template)
        self.batch_size = int(batch_size or self.default_batch_size)
        self.seed = seed
        try:
            self.llm = LLM(
                model=os.path.expanduser(str(model)),
                tokenizer=_tokenizer_path(tokenizer),
                dtype="bfloat16" if dtype == "auto" else dtype,
                seed=seed,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
            )
        except Exception as e:
            raise EvalError(f"vllm cannot load model {str(model)!r}: {_first_line(e)}") from None

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, progress=None):
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens,
            skip_special_tokens=True,
        )
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            # token ids from our tokenizer: the chat template is applied exactly once, no extra BOS
            inputs = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]} for p in chunk]
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
            for out in outputs:
                results.append([
                    Completion(c.text, len(c.token_ids), "length" if c.finish_reason == "length" else "stop")
                    for c in out.outputs
                ])
            if progress is not None:
                progress(len(chunk))
        return results

    def close(self) -> None:
        self.llm = None
        try:
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass
