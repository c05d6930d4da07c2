"""The training loop, top to bottom: build, (reference pass), step, log, checkpoint, resume, export.

One optimizer step consumes ``train.global_batch_size`` examples (SFT rows or pairs): every rank takes
``micro_batch_size`` examples per forward, ``accum`` forwards per step, so
``global = micro * accum * world``. The data order is a function of (seed, epoch) only, and step ``s``
always reads the same examples, so a resumed run sees exactly what the uninterrupted one saw.

Stopping early: SIGUSR1 / SIGTERM, or the file named by ``$REDI_DS_STOP_FILE`` appearing, makes every
rank save a checkpoint at the next step boundary and return (``{stage_dir}/preempted`` marks it).
A checkpoint is complete or absent: ``checkpoints/latest`` moves (atomically, by rank 0) only after
every rank has written its shard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import torch

from redi_ds.config import Config, grad_accum_steps, save_config
from redi_ds.data import DataError
from redi_ds.data.collate import collate, token_counts
from redi_ds.losses import build_loss

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def log0(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[redi-ds] {msg}", flush=True)


# ----------------------------------------------------------------------------- pieces


def init_distributed():
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: Config, world: int, accum: int) -> dict:
    """ZeRO/precision from ds_configs/*.json; batch sizes and clipping from our config."""
    name = cfg.deepspeed.config
    path = Path(name) if name.endswith(".json") else DS_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        from redi_ds.config import ConfigError

        raise ConfigError(f"deepspeed.config: {name!r} is neither a file nor one of "
                          f"{', '.join(p.stem for p in DS_CONFIG_DIR.glob('*.json'))}")
    ds = json.loads(path.read_text())
    ds.setdefault("zero_optimization", {}).update(cfg.deepspeed.zero)
    precision = resolve_precision(cfg.deepspeed.precision)
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16", "initial_scale_power": 16}
    ds.update({
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.train.grad_clip,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    })
    if "offload_optimizer" not in ds["zero_optimization"]:
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def make_optimizer(model: torch.nn.Module, cfg: Config, offload: bool):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * (1 - progress)

    return f


def step_indices(n: int, global_batch: int, seed: int, step: int, shuffle: bool) -> list[int]:
    """The ``global_batch`` example indices of optimizer step ``step`` (epochs drop their remainder)."""
    per_epoch = n // global_batch
    epoch, k = divmod(step, per_epoch)
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1000003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    return order[k * global_batch:(k + 1) * global_batch]


class StopRequest:
    """Preemption: a signal, or $REDI_DS_STOP_FILE appearing; agreed on by all ranks at step boundaries."""

    def __init__(self):
        self.flag = False
        self.file = os.environ.get("REDI_DS_STOP_FILE")
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.flag = True

    def agreed(self) -> bool:
        import torch.distributed as dist

        local = self.flag or bool(self.file and os.path.exists(self.file))
        t = torch.tensor([1.0 if local else 0.0], device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- checkpoints


def latest_checkpoint(stage_dir: Path):
    pointer = stage_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (stage_dir / "checkpoints" / tag).is_dir() else None


def save_checkpoint(engine, cfg: Config, step: int, keep: int) -> None:
    import torch.distributed as dist

    root = cfg.stage_dir / "checkpoints"
    tag = f"step_{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()  # every rank has written its shard
    if dist.get_rank() == 0:
        save_config(cfg, root / tag / "config.yaml")
        tmp = root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        done = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def consolidated_state_dict(engine) -> dict:
    """Full weights on rank 0 (collective under ZeRO-3)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config) -> dict:
    import deepspeed
    import torch.distributed as dist
    from tqdm import tqdm

    from redi_ds.data.sources import load_source
    from redi_ds.data.tokenize import ChatEncoder, encode_dataset
    from redi_ds.model import PolicyModel, apply_liger, build_model, export_hf, load_tokenizer, resolve_model_path
    from redi_ds.tracking import Tracker

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # everything a user can get wrong is checked before the process group starts
    accum = grad_accum_steps(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    stage_dir = cfg.stage_dir
    torch.manual_seed(cfg.run.seed)
    loss_fn = build_loss(cfg.loss)
    kind = "pairs" if loss_fn.paired else "sft"

    # data: load, tokenize, drop what exceeds the limits (counted)
    model_path = resolve_model_path(cfg.model.name_or_path, cfg.run.output_dir)
    tokenizer = load_tokenizer(cfg.model, model_path)
    raw = load_source(cfg.data.path, kind, cfg.data.split, synthetic_size=cfg.data.synthetic_size, seed=cfg.run.seed)
    if cfg.data.limit > 0:
        raw = raw.select(range(min(cfg.data.limit, len(raw))))
    encoder = ChatEncoder(tokenizer, cfg.data.system_prompt)
    data, skipped = encode_dataset(raw, kind, encoder, cfg.data.max_prompt_length, cfg.data.max_length)
    log0(f"data {cfg.data.path} ({kind}): {skipped.line()}")
    G = cfg.train.global_batch_size
    if len(data) < G:
        raise DataError(f"{cfg.data.path}: {len(data)} usable examples < train.global_batch_size ({G}); "
                        f"{skipped.line()}")
    total_steps = cfg.train.epochs * (len(data) // G)
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps) if cfg.train.epochs > 0 else cfg.train.max_steps

    rank, world = init_distributed()
    device = _device()

    # model + engine
    precision = resolve_precision(cfg.deepspeed.precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    hf_model = build_model(cfg.model, model_path, torch.float32 if precision == "fp16" else dtype, cfg.run.seed)
    apply_liger(hf_model, cfg.model.liger)
    policy = PolicyModel(hf_model, loss_fn, cfg.kernel)
    ds_cfg = deepspeed_config(cfg, world, accum)
    offload = "offload_optimizer" in ds_cfg["zero_optimization"]
    optimizer = make_optimizer(policy, cfg, offload)
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    schedule = lr_lambda(cfg.train.schedule, warmup, total_steps, cfg.train.min_lr_ratio)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=policy, optimizer=optimizer, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    # reference log-probs (DPO): one pass with the initial weights, before any update
    ref_logps = None
    if loss_fn.needs_reference:
        ref_logps = reference_pass(engine, data, kind, tokenizer.pad_token_id, cfg, rank, world, device)

    # resume
    start_step = 0
    ckpt_root, tag = stage_dir / "checkpoints", None
    if cfg.run.resume == "auto":
        tag = latest_checkpoint(stage_dir)
    elif cfg.run.resume != "never":  # an explicit checkpoint folder
        ckpt_root, tag = Path(cfg.run.resume).parent, Path(cfg.run.resume).name
    if tag is not None:
        _, client = engine.load_checkpoint(str(ckpt_root), tag=tag)
        start_step = int(client["step"])
        log0(f"resumed from {ckpt_root / tag} at step {start_step}")

    # tracking, on global rank 0 only
    tracker = Tracker(cfg.tracking, cfg.run.output_dir, enabled=rank == 0)
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, stage_dir / "config.yaml")
        (stage_dir / "preempted").unlink(missing_ok=True)
        _truncate_metrics(stage_dir / "metrics.jsonl", start_step)  # rows past the checkpoint are redone
        run_id_file = stage_dir / "mlflow_run_id"
        prior = run_id_file.read_text().strip() if run_id_file.exists() and start_step > 0 else None
        params = cfg.flat() | {"world_size": world, "grad_accum": accum, "examples": len(data),
                               "skipped": skipped.total - skipped.kept, "total_steps": total_steps}
        run_id = tracker.start(params, run_id=prior)
        if run_id:
            run_id_file.write_text(run_id)
            tracker.log_artifact(str(stage_dir / "config.yaml"))
    stop = StopRequest()
    metrics_file = stage_dir / "metrics.jsonl"
    bar = tqdm(total=total_steps, initial=start_step, desc=cfg.stage, disable=rank != 0, dynamic_ncols=True)
    engine.train()
    last: dict = {}
    preempted = False
    micro = cfg.train.micro_batch_size
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        idx = step_indices(len(data), G, cfg.run.seed, step, cfg.data.shuffle)
        mine = idx[rank * micro * accum:(rank + 1) * micro * accum]  # this rank's share of the step
        sums = {}
        tokens = 0
        for a in range(accum):
            rows = mine[a * micro:(a + 1) * micro]
            batch = collate([data[i] for i in rows], kind, tokenizer.pad_token_id, cfg.data.padding_free)
            counts = token_counts(batch)
            tokens += int(batch["input_ids"].numel() if batch["attention_mask"] is None
                          else batch["attention_mask"].sum())
            batch = _to_device(batch, device)
            ref = None if ref_logps is None else ref_logps[_pair_index(rows, kind, len(data)).to(device)]
            loss, m = engine(batch, counts.to(device), ref)
            engine.backward(loss)
            engine.step()
            for k, v in {"loss": loss.detach(), **m}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        # reduce metrics over ranks (means), tokens summed
        keys = sorted(sums)
        vec = torch.tensor([sums[k] for k in keys] + [float(tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(vec)
        stats = {k: float(vec[i]) / world for i, k in enumerate(keys)}
        dt = time.perf_counter() - t0
        stats.update(lr=lr, tokens_per_s=float(vec[-1]) / dt, step_time=dt)
        gn = engine.get_global_grad_norm()
        if gn is not None:
            stats["grad_norm"] = float(gn)
        done_steps = step + 1
        last = stats
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": done_steps, **stats}) + "\n")
            if done_steps % cfg.train.log_every == 0 or done_steps == total_steps:
                tracker.log_metrics(stats, step=done_steps)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{stats['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
        if cfg.train.save_every and done_steps % cfg.train.save_every == 0 and done_steps < total_steps:
            save_checkpoint(engine, cfg, done_steps, cfg.train.keep_checkpoints)
        early = cfg.train.stop_after_steps and done_steps == cfg.train.stop_after_steps
        if done_steps < total_steps and (stop.agreed() or early):
            save_checkpoint(engine, cfg, done_steps, cfg.train.keep_checkpoints)
            preempted = True
            break
    bar.close()

    result = {"stage": cfg.stage, "steps": total_steps, "final": last, "run_id": tracker.run_id,
              "tracking_uri": tracker.uri if tracker.enabled else None, "stage_dir": str(stage_dir)}
    if preempted:
        if rank == 0:
            (stage_dir / "preempted").write_text(f"stopped after step {done_steps}\n")
            log0(f"stopped early at step {done_steps}: checkpoint saved; rerun the same command to resume")
        tracker.finish("KILLED")
        result["preempted"] = True
        return result

    if latest_checkpoint(stage_dir) != f"step_{total_steps}":
        save_checkpoint(engine, cfg, total_steps, cfg.train.keep_checkpoints)
    export_dir = stage_dir / "export"
    if cfg.train.export:
        state = consolidated_state_dict(engine)
        if rank == 0:
            export_hf(state, hf_model, tokenizer, str(export_dir))
            save_config(cfg, export_dir / "redi_ds_config.yaml")
        dist.barrier()
        result["export"] = str(export_dir)
    if rank == 0:
        with open(stage_dir / "final_metrics.json", "w") as f:
            json.dump(result, f, indent=2)
        tracker.log_metrics({f"final_{k}": v for k, v in last.items()}, step=total_steps)
        tracker.log_artifact(str(stage_dir / "final_metrics.json"))
        tracker.log_artifact(str(metrics_file))
    if cfg.eval.benchmarks and cfg.train.export:
        engine.destroy()  # free the accelerator for generation
        del engine, optimizer, policy
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result["eval"] = evaluate(cfg, export_dir, tracker, rank, world)
    if rank == 0:
        (stage_dir / "done").write_text("ok\n")
    tracker.finish()
    dist.barrier()
    return result


def _truncate_metrics(path: Path, steps: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= steps]
    if len(kept) != len(rows):
        path.write_text("".join(line + "\n" for line in kept))


def _pair_index(rows, kind, n):  # sequence order within a batch: chosen rows then rejected rows
    t = torch.tensor(rows)
    return torch.cat([t, t + n]) if kind == "pairs" else t


def reference_pass(engine, data, kind, pad_id, cfg: Config, rank: int, world: int, device) -> torch.Tensor:
    """Per-sequence log-prob sums of the initial model for every example ([chosen (n), rejected (n)])."""
    import torch.distributed as dist

    n = len(data)
    out = torch.zeros(2 * n if kind == "pairs" else n, dtype=torch.float64, device=device)
    engine.eval()
    mine = list(range(rank, n, world))
    micro = cfg.train.micro_batch_size
    steps = math.ceil(n / world / micro)  # same count on every rank (ZeRO-3 gathers are collective)
    with torch.no_grad():
        for s in range(steps):
            rows = mine[s * micro:(s + 1) * micro] or [0]
            batch = _to_device(collate([data[i] for i in rows], kind, pad_id, cfg.data.padding_free), device)
            _, sums, _ = engine.module.sequence_logprobs(batch)
            if s * micro < len(mine):
                out[_pair_index(rows, kind, n).to(device)] = sums.double()
    dist.all_reduce(out)
    engine.train()
    log0(f"reference log-probs computed for {n} examples")
    return out


def evaluate(cfg: Config, export_dir: Path, tracker, rank: int, world: int) -> dict:
    """Evaluate the export on every rank (data-parallel); the summary goes to this run's MLflow run."""
    from redi_ds.eval import run_eval

    return run_eval(str(export_dir), cfg.eval.benchmarks, samples=cfg.eval.samples, temperature=cfg.eval.temperature,
                    top_p=cfg.eval.top_p, max_new_tokens=cfg.eval.max_new_tokens, limit=cfg.eval.limit,
                    system_prompt=cfg.data.system_prompt, force_think=cfg.eval.force_think,
                    backend=cfg.eval.backend, out_dir=str(cfg.stage_dir / "eval"), seed=cfg.run.seed,
                    mlflow_run_id=tracker.run_id, tracking_uri=tracker.uri if tracker.enabled else None,
                    rank=rank, world_size=world, progress=rank == 0)
