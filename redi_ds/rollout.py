"""The distill stage's rollouts: the student samples, the teacher scores every sampled token, the batch carries the
per-token coefficients of redi_ds.losses.distill. One optimizer step:

    for each of this rank's micro batches of prompts:
        completions = sample(student, prompts x rollout.samples)        the student's own forward (ZeRO-3: in step)
        logp_S, logp_T = the fused head's per-token log-probs of both models on the sampled tokens (no logits)
        A_t = logp_T - logp_S                                           the per-token reward, detached
    N = the step's sampled tokens, all ranks (and the mixed loss's totals)
    each micro batch = sampled sequences (+ the prompts' own data with mix), token_coeffs per position

The sampling generator is a function of (run.seed, step, rank, micro batch): a resumed run draws the same samples
from the same weights. Every ``rollout.log_every`` steps rank 0 writes a few samples to ``rollouts.jsonl`` in the
stage directory (and MLflow). The teacher is held once per rank, in eval mode, with its own post-head transform and
its own self-check; its tokenizer must be the student's (cross-tokenizer distillation is refused in one line).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from redi_ds.data.collate import collate_sequences, sequences
from redi_ds.errors import ConfigError
from redi_ds.losses import StepTotals
from redi_ds.losses.distill import kl_coefficients
from redi_ds.passes import to_device

SHOWN = 4  # samples written per logged step


# ----------------------------------------------------------------------------- the teacher


class Teacher:
    """A causal LM that scores tokens through the fused head (its own transform), held once per rank."""

    def __init__(self, hf_model, kernel_options):
        from redi_ds.families import body_and_head, transform_for

        self.model = hf_model.eval().requires_grad_(False)
        self.body, self.head = body_and_head(hf_model)
        self.transform, self.options = transform_for(hf_model.config), kernel_options

    @torch.no_grad()
    def token_logprobs(self, batch: dict) -> torch.Tensor:
        from redi_ds.kernels import fused_token_logprobs

        hidden = self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        return fused_token_logprobs(hidden, self.head.weight, batch["targets"], self.head.bias,
                                    options=self.options, transform=self.transform)


def _teacher_model_config(cfg):
    from redi_ds.config import ModelConfig
    from redi_ds.model import resolve_model_path

    path = resolve_model_path(cfg.teacher.name_or_path, cfg.run.output_dir)
    return path, ModelConfig(name_or_path=path, tokenizer=cfg.model.tokenizer if path == "tiny" else None,
                             chat_template=cfg.model.chat_template, tiny=cfg.model.tiny)


def teacher_tokenizer(cfg, tokenizer) -> None:
    """The teacher's tokenizer must be the student's (one line otherwise, before any compute)."""
    from redi_ds.model import load_tokenizer

    path, mcfg = _teacher_model_config(cfg)
    theirs = load_tokenizer(mcfg, path)
    if theirs.get_vocab() != tokenizer.get_vocab() or \
            sorted(map(str, theirs.all_special_tokens)) != sorted(map(str, tokenizer.all_special_tokens)):
        raise ConfigError(f"teacher.name_or_path = {cfg.teacher.name_or_path!r}: its tokenizer is not the student's "
                          f"({len(theirs)} against {len(tokenizer)} tokens, or other special tokens); on-policy "
                          "distillation scores the student's own tokens, so the teacher must share its tokenizer "
                          "(cross-tokenizer distillation is not supported)")


def load_teacher(cfg, tokenizer, dtype: torch.dtype, device: torch.device) -> Teacher:
    """The teacher of ``cfg.teacher`` (its tokenizer checked by ``teacher_tokenizer``), self-checked."""
    from redi_ds.families import self_check
    from redi_ds.model import build_model
    from redi_ds.ranks import log0

    path, mcfg = _teacher_model_config(cfg)
    model = build_model(mcfg, path, dtype, seed=cfg.teacher.seed, tokenizer=tokenizer)
    log0("teacher: " + self_check(model, tokenizer, cfg.kernel, padding_free=cfg.data.padding_free))
    return Teacher(model.to(device), cfg.kernel)


# ----------------------------------------------------------------------------- sampling


def _draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_hf(policy, prompts: list[list[int]], opts, stop_ids: set, pad_id: int, generator: torch.Generator,
              device: torch.device) -> list[list[int]]:
    """Completions of ``prompts`` from the student's own forward with a KV cache. Every rank decodes the same
    number of steps (ZeRO-3's gathers are collective): a rank stops only when every rank's rows are done."""
    from transformers import DynamicCache

    from redi_ds.distributed import any_rank

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every row's next token comes at the same position
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = policy.next_logits(ids, mask, pos, DynamicCache())
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(opts.max_new_tokens):
        tok = _draw(logits, opts.temperature, opts.top_p, generator).to(device)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(tok[i]))
        done |= torch.tensor([t in stop_ids for t in tok.tolist()], device=device)
        if step == opts.max_new_tokens - 1 or not any_rank(not bool(done.all())):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        logits, cache = policy.next_logits(tok.masked_fill(done, pad_id)[:, None], mask, pos, cache)
    return out


class VLLMSampler:
    """vLLM on the training GPU (colocated, ``rollout.gpu_memory_utilization``), the student's weights synced
    before every step: ZeRO-3 partitions are gathered one module at a time and loaded into vLLM's model."""

    def __init__(self, model_path: str, opts, dtype: str):
        from vllm import LLM

        self.llm = LLM(model=model_path, gpu_memory_utilization=opts.gpu_memory_utilization, dtype=dtype,
                       enable_prefix_caching=True, enforce_eager=True)
        self.opts = opts

    def sync(self, engine) -> None:
        import deepspeed

        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        params = list(engine.module.hf.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            runner.model.load_weights((name.split("hf.", 1)[-1], p.data) for name, p in params)

    def sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=self.opts.temperature, top_p=self.opts.top_p,
                                max_tokens=self.opts.max_new_tokens, seed=seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


# ----------------------------------------------------------------------------- one step's batches


@dataclass
class Rollouts:
    cfg: object
    tokenizer: object
    teacher: Teacher
    loss: object  # DistillLoss
    padding_free: bool
    device: torch.device
    rank: int
    stage_dir: Path
    vllm: Optional[VLLMSampler] = None

    @functools.cached_property
    def stop_ids(self) -> set:
        ids = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        return {i for i in ids if isinstance(i, int) and i >= 0}

    def _seed(self, step: int, micro: int) -> int:
        """The sampling seed of one micro batch: a function of (run.seed, step, rank, micro batch) only."""
        return ((self.cfg.run.seed * 1_000_003 + step) * 10_007 + self.rank * 101 + micro) % 2**31

    def _sample(self, engine, prompts: list[list[int]], step: int, micro: int) -> list[list[int]]:
        k = self.cfg.rollout.samples
        repeated = [p for p in prompts for _ in range(k)]
        if self.vllm is not None:
            return self.vllm.sample(repeated, seed=self._seed(step, micro))
        generator = torch.Generator(device=self.device).manual_seed(self._seed(step, micro))
        return sample_hf(engine.module, repeated, self.cfg.rollout, self.stop_ids, self.tokenizer.pad_token_id,
                         generator, self.device)

    def _score(self, engine, prompts, completions):
        """(sampled sequences, per-token rewards A_t, logp_S, logp_T) of one micro batch."""
        k = self.cfg.rollout.samples
        seqs = [(p + c, [False] * len(p) + [True] * len(c), 0)
                for p, c in zip((p for p in prompts for _ in range(k)), completions)]
        batch = to_device(collate_sequences(seqs, self.tokenizer.pad_token_id, self.padding_free), self.device)
        student = engine.module.token_logprobs(batch)
        teacher = self.teacher.token_logprobs(batch)
        return seqs, batch, student, teacher

    def step_batches(self, engine, micro_examples: list[list[dict]], step: int, global_examples: int
                     ) -> tuple[list[dict], StepTotals, dict]:
        """This rank's micro batches of the step, their StepTotals and the step's rollout metrics."""
        import torch.distributed as dist

        if self.vllm is not None:
            self.vllm.sync(engine)
        engine.eval()
        scored = []
        for m, examples in enumerate(micro_examples):
            prompts = [e["prompt_ids"] for e in examples]
            completions = self._sample(engine, prompts, step, m)
            scored.append((examples, completions, *self._score(engine, prompts, completions)))
        engine.train()
        stats = torch.zeros(6, dtype=torch.float64, device=self.device)  # tokens, sum A, sum S, sum T, n, truncated
        for _, completions, _, batch, s, t in scored:
            picked = batch["targets"] != -100
            stats += torch.tensor([picked.sum(), (t - s)[picked].sum(), s[picked].sum(), t[picked].sum(),
                                   len(completions), sum(len(c) >= self.cfg.rollout.max_new_tokens
                                                         and c[-1] not in self.stop_ids for c in completions)],
                                  dtype=torch.float64, device=self.device)
        data_tokens = torch.tensor([float(sum(e.get("num_targets", 0) for ex, *_ in scored for e in ex))],
                                   dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        dist.all_reduce(data_tokens)
        n = int(stats[0])
        totals = StepTotals(examples=global_examples, tokens=n)
        batches = [self._train_batch(examples, seqs, batch, s, t, n, int(data_tokens), global_examples)
                   for examples, _, seqs, batch, s, t in scored]
        if self.rank == 0 and (step + 1) % self.cfg.rollout.log_every == 0:
            self._log(step + 1, scored[0])
        metrics = {"kl": -float(stats[1]) / max(1, n), "student_logp": float(stats[2]) / max(1, n),
                   "teacher_logp": float(stats[3]) / max(1, n), "sample_tokens": n / max(1.0, float(stats[4])),
                   "truncated": float(stats[5]) / max(1.0, float(stats[4]))}
        return batches, totals, metrics

    def _train_batch(self, examples, seqs, scored_batch, student, teacher, n: int, data_tokens: int,
                     global_examples: int) -> dict:
        """Sampled sequences with -kl_coef A_t / N per token, and with a mix the prompts' own data after them."""
        loss = self.loss
        rewards = (teacher - student).masked_fill(scored_batch["targets"] == -100, 0.0)
        coef = kl_coefficients(rewards, n, loss.kl_coef).cpu()
        values = [_token_values(coef, scored_batch, i, len(s)) for i, (s, _, _) in enumerate(seqs)]
        all_seqs = list(seqs)
        if loss.mix != "none" and loss.mix_coef > 0:
            layout = loss.layout
            data = sequences(examples, layout)
            counts = torch.tensor([sum(m) for _, m, _ in data])
            totals = StepTotals(examples=global_examples, tokens=data_tokens)
            per_seq = loss.mix_coef * loss.mixed().coefficients(counts, totals)
            all_seqs += data
            values += [[float(c)] * len(s) for (s, _, _), c in zip(data, per_seq)]
        batch = collate_sequences(all_seqs, self.tokenizer.pad_token_id, self.padding_free, values)
        batch["token_coeffs"] = batch.pop("token_values")
        return to_device(batch, self.device)

    def _log(self, step: int, scored) -> None:
        examples, completions, _, batch, s, t = scored
        k = self.cfg.rollout.samples
        rows = []
        for i, c in enumerate(completions[:SHOWN]):
            picked = batch["targets"][i] != -100
            rows.append({"step": step, "prompt": self.tokenizer.decode(examples[i // k]["prompt_ids"]),
                         "completion": self.tokenizer.decode(c), "tokens": len(c),
                         "kl": float((s[i] - t[i])[picked].mean()) if picked.any() else 0.0})
        path = self.stage_dir / "rollouts.jsonl"
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


def _token_values(coef: torch.Tensor, batch: dict, row: int, length: int) -> list[float]:
    """Per token of sampled sequence ``row``: the coefficient of the position that predicts it (padded layout:
    position t of row ``row``; packed: the row's span of the single packed row)."""
    if batch["seq_ids"] is None:
        per_position = coef[row, :length]
    else:
        where = (batch["seq_ids"][0] == row).nonzero().flatten()
        per_position = coef[0, where.cpu()]
    return [0.0] + per_position[:-1].tolist()  # token j is predicted at position j - 1


def make_rollouts(cfg, tokenizer, loss_fn, model_path: str, dtype: torch.dtype, device, rank: int) -> Rollouts:
    """The distill stage's teacher and sampler (vLLM when asked for and present on CUDA, else the student's own
    forward)."""
    import importlib.util

    teacher = load_teacher(cfg, tokenizer, dtype, device)
    backend = cfg.rollout.backend
    has_vllm = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None and Path(model_path).is_dir()
    if backend == "vllm" and not has_vllm:
        raise ConfigError("rollout.backend: vllm needs CUDA, the vllm package and a model folder to start from")
    vllm = VLLMSampler(model_path, cfg.rollout, str(dtype).replace("torch.", "")) \
        if backend == "vllm" or (backend == "auto" and has_vllm) else None
    return Rollouts(cfg, tokenizer, teacher, loss_fn, cfg.data.padding_free, device, rank, cfg.stage_dir, vllm)
