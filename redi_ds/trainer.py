"""The training loop, top to bottom:

    run = build(cfg)                    # checks, data, process group, stage lock, engine, reference pass,
                                        # resume, tracking
    for step in range(run.start_step, run.total_steps):
        stats = train_step(run, step)   # one optimizer step over every micro batch of every rank
        record(run, stats)              # metrics.jsonl, MLflow, progress bar; stops a diverged run
        ...checkpoint every train.save_every steps, or once on a stop request, then return
    finish(run)                         # final checkpoint, HF export, evaluation, the done marker

One optimizer step consumes ``train.global_batch_size`` examples (SFT rows or pairs): every rank takes
``micro_batch_size`` examples per forward, ``accum`` forwards per step, so ``global = micro * accum * world``.
The data order is a function of (seed, epoch) only and step ``s`` always reads the same examples, so a
resumed run sees exactly what the uninterrupted one saw.

The objective of a step does not depend on how it is split: each loss returns its micro batch's share of the
step objective, normalised by the step's totals (``StepTotals``: examples and response tokens of the whole
step, known before the forward from the encoded lengths), and ``engine.backward(share * accum * world)``
undoes DeepSpeed's 1/accum scaling and its mean over ranks, so the step's gradient is the gradient of the
sum of the shares. The logged loss is that sum.

Stopping early: SIGUSR1 / SIGTERM, or the file named by ``$REDI_DS_STOP_FILE`` appearing, makes every rank
save a checkpoint at the next step boundary and return (``{stage_dir}/preempted`` marks it). A run whose loss
or grad norm is NaN/inf for ``train.max_nonfinite_steps`` consecutive steps stops with a one-line error and
no export; it never writes a checkpoint of non-finite weights. Checkpoints: see ``redi_ds.checkpoints``.
Rerunning a finished stage with the same config says so and exits (``run.resume: never`` retrains).
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from redi_ds import parallel
from redi_ds.checkpoints import CheckpointStore
from redi_ds.ranks import log0
from redi_ds.config import Config, grad_accum_steps, save_config
from redi_ds.data.pipeline import count_steps, load_stage_data, stage_encoder
from redi_ds.distributed import StageLock, StopRequest, current_device, init_distributed, params_finite
from redi_ds.errors import TrainingError
from redi_ds.losses import SequenceLoss, StepTotals, build_loss
from redi_ds.passes import Batcher, HeldoutProbe, reference_pass
from redi_ds.rollout import make_rollouts
from redi_ds.schedule import lr_lambda, make_optimizer, resolve_precision, step_indices
from redi_ds.stage import StageDir
from redi_ds.textio import writable_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- what a step and a run return


@dataclass
class StepStats:
    step: int                # optimizer steps done, this one included (1-based)
    loss: float              # the step objective (sum of the micro batches' shares over all ranks)
    metrics: dict            # the loss's metrics, averaged over the step's micro batches and ranks
    lr: float                # the rate this step used
    grad_norm: Optional[float]
    tokens: int              # input tokens (prompt + response, no padding) of the step, all ranks
    target_tokens: int       # response tokens of the step (what SFT normalises by)
    step_time: float
    skipped: bool            # DeepSpeed did not apply the update (overflow)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and (self.grad_norm is None or math.isfinite(self.grad_norm))

    def row(self) -> dict:
        out = {"step": self.step, "loss": self.loss, **self.metrics, "lr": self.lr}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        out.update(tokens=self.tokens, target_tokens=self.target_tokens,
                   tokens_per_s=self.tokens / self.step_time if self.step_time > 0 else 0.0,
                   step_time=self.step_time, skipped=int(self.skipped))
        return out


@dataclass
class TrainResult:
    stage: str
    stage_dir: str
    steps: int
    status: str                   # "done" | "preempted" | "already_done"
    final: dict = field(default_factory=dict)  # the last step's metrics row
    export: Optional[str] = None
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    eval: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Run:
    """Everything ``build`` set up; ``train_step`` / ``record`` / ``finish`` read it."""

    cfg: Config
    rank: int
    world: int
    accum: int
    grad_average: int            # the ranks DeepSpeed averages gradients over (ds_config.gradient_average_size)
    precision: str
    device: torch.device
    batcher: Batcher             # examples -> a batch on this device, in the loss's row layout
    data: Any                    # datasets.Dataset of encoded rows
    lengths: torch.Tensor        # [N] response tokens per example (chosen + rejected for pairs)
    tokenizer: Any
    hf_model: Any
    loss_fn: SequenceLoss
    engine: Any
    scheduler: Any
    ref_logps: Optional[torch.Tensor]
    start_step: int
    total_steps: int
    store: CheckpointStore
    tracker: Any
    lock: "StageLock"
    stop: "StopRequest"
    bar: Any
    guard: "DivergenceGuard"
    probe: Optional["HeldoutProbe"] = None
    rollouts: Optional[Any] = None  # the distill stage: redi_ds.rollout.Rollouts
    last: dict = field(default_factory=dict)
    skipped_steps: int = 0

    @property
    def stage_dir(self) -> Path:
        return self.cfg.stage_dir

    @property
    def stage(self) -> StageDir:
        return StageDir(self.cfg.stage_dir)


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config) -> TrainResult:
    previous = finished(cfg)
    if previous is not None:
        log0(f"stage {cfg.stage} is already done ({previous.steps} steps, {cfg.stage_dir}); "
             "--run.resume never trains it again")
        return previous
    run = build(cfg)
    try:
        for step in range(run.start_step, run.total_steps):
            stats = train_step(run, step)
            record(run, stats)
            done = stats.step
            if run.probe is not None and run.probe.due(done, run.total_steps):
                record_probe(run, run.probe.measure(run.engine, done))
            stop = done < run.total_steps and (run.stop.agreed() or done == cfg.train.stop_after_steps)
            every = cfg.train.save_every
            if stop or (every and done % every == 0 and done < run.total_steps):
                save(run, done)
            if stop:
                return preempted(run, done)
        return finish(run)
    except BaseException:
        run.tracker.finish("FAILED")
        raise
    finally:
        run.bar.close()
        run.lock.release()


# ----------------------------------------------------------------------------- build


def build(cfg: Config) -> Run:
    import deepspeed

    from redi_ds import ds_config, lora
    from redi_ds.families import apply_liger, self_check
    from redi_ds.model import PolicyModel, build_model, load_tokenizer, resolve_model_path

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # everything a user can get wrong is checked before the data load and the process group
    accum = grad_accum_steps(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    precision = resolve_precision(cfg.deepspeed.precision)
    ds = ds_config.build(cfg, accum, precision)
    ds_config.validate_zero(ds, getattr(cfg, "_source", "config"))
    ds_config.check_sequence_parallel(ds, getattr(cfg, "_source", "config"))
    torch.manual_seed(cfg.run.seed)
    loss_fn = build_loss(cfg.loss)
    writable_dir(cfg.run.output_dir, "run.output_dir")
    model_path = resolve_model_path(cfg.model.name_or_path, cfg.run.output_dir)  # "@sft": a finished stage's export
    tokenizer = load_tokenizer(cfg.model, model_path)
    if loss_fn.needs_teacher:
        from redi_ds.rollout import teacher_tokenizer

        teacher_tokenizer(cfg, tokenizer)  # the same tokenizer as the student's, or one line before any compute
    data, lengths = load_stage_data(cfg, loss_fn.layout, tokenizer)
    total_steps = count_steps(cfg, len(data))

    rank, world = init_distributed()
    device = current_device()
    lock = StageLock.acquire(cfg.stage_dir, rank)
    store = CheckpointStore(cfg.stage_dir, rank)
    store.clean_partials()
    resume_from = resume_point(cfg, store)
    start_step = 0 if resume_from is None else store.check_resumable(resume_from, world, cfg.train.global_batch_size)

    model_dtype = torch.float32 if precision == "fp16" else DTYPES[precision]  # fp16: fp32 masters, scaled loss
    hf_model = build_model(cfg.model, model_path, model_dtype, cfg.run.seed, tokenizer)
    log0(self_check(hf_model, tokenizer, cfg.kernel, cfg.data.padding_free))  # exact, or one line and exit 2
    apply_liger(hf_model, cfg.model.liger)
    hf_model = lora.apply(hf_model, cfg.model.lora)  # adapters on, the rest frozen (model.lora.r > 0)
    rows = 1 if cfg.data.padding_free else cfg.train.micro_batch_size * loss_fn.layout.sequences_per_example
    sp = parallel.setup(hf_model, cfg.deepspeed.sequence_parallel_size, rows, tokenizer.pad_token_id)
    policy = PolicyModel(hf_model, loss_fn, cfg.kernel, sp=sp)
    optimizer = make_optimizer(policy, cfg, "offload_optimizer" in ds["zero_optimization"])
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    schedule = lr_lambda(cfg.train.schedule, warmup, total_steps, cfg.train.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=policy, optimizer=optimizer, config=ds, mpu=sp.mpu if sp else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    # reference log-probs (DPO): one pass with the initial weights, before any update (also on resume)
    batcher = Batcher(loss_fn.layout, tokenizer.pad_token_id, cfg.data.padding_free, device)
    micro = cfg.train.micro_batch_size
    ref_logps = reference_pass(engine, data, batcher, micro) if loss_fn.needs_reference else None

    if resume_from is not None:
        _, client = engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name,
                                           load_module_strict=not lora.enabled(cfg.model.lora))
        start_step = int(client["step"])
        log0(f"resumed from {resume_from} at step {start_step}")
    if resume_from is None or resume_from.parent != store.root:
        why = "run.resume: never" if cfg.run.resume == "never" else \
            "no checkpoint here verifies" if resume_from is None else f"resuming from {resume_from}"
        store.move_aside(why)
    rollouts = make_rollouts(cfg, tokenizer, loss_fn, model_path, model_dtype, device, rank) \
        if loss_fn.needs_teacher else None
    tracker = start_tracking(cfg, rank, world, accum, len(data), start_step, total_steps, model_path)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start_step, desc=cfg.stage, disable=rank != 0, dynamic_ncols=True)
    engine.train()
    run = Run(cfg=cfg, rank=rank, world=world, accum=accum, grad_average=ds_config.gradient_average_size(ds, world),
              precision=precision, device=device, batcher=batcher,
              data=data, lengths=lengths, tokenizer=tokenizer, hf_model=hf_model, loss_fn=loss_fn, engine=engine,
              scheduler=scheduler, ref_logps=ref_logps, start_step=start_step, total_steps=total_steps,
              store=store, tracker=tracker, lock=lock, stop=StopRequest(), bar=bar,
              guard=DivergenceGuard(cfg.train.max_nonfinite_steps),
              probe=HeldoutProbe(cfg.eval.heldout_pairs, cfg.eval.heldout_every, stage_encoder(cfg, tokenizer), batcher,
                                 micro) if cfg.eval.heldout_every else None, rollouts=rollouts)
    if run.probe is not None and start_step == 0:
        record_probe(run, run.probe.measure(engine, 0))
    return run


def resume_point(cfg: Config, store: CheckpointStore) -> Optional[Path]:
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        return store.latest()
    return Path(cfg.run.resume).resolve()


def start_tracking(cfg: Config, rank: int, world: int, accum: int, examples: int, start_step: int,
                   total_steps: int, model_path: str):
    """MLflow on global rank 0 (a run named {run.name}/{stage}, tagged); rank 0 begins the stage directory."""
    from redi_ds.tracking import Tracker, run_tags

    tracker = Tracker(cfg.tracking, cfg.run.output_dir, enabled=rank == 0)
    if rank != 0:
        return tracker
    stage = StageDir(cfg.stage_dir)
    prior = stage.begin(cfg, start_step)
    params = cfg.flat() | {"world_size": world, "grad_accum": accum, "examples": examples, "total_steps": total_steps}
    run_id = tracker.start(params, run_id=prior, run_name=cfg.tracking.run_name or f"{cfg.run.name}/{cfg.stage}",
                           tags=run_tags(cfg, model_path) | cfg.tracking.tags,
                           parent_run_id=cfg.tracking.parent_run_id)
    if run_id:
        stage.set_run_id(run_id)
        tracker.log_artifact(str(cfg.stage_dir / "config.yaml"))
    return tracker


# ----------------------------------------------------------------------------- one step


def step_batches(run: Run, step: int) -> tuple[list[tuple[dict, Optional[torch.Tensor]]], StepTotals, dict]:
    """This rank's micro batches of optimizer step ``step`` (each with its DPO reference log-probs or None), the
    step's StepTotals, and metrics the batches were made with (the distill stage's rollouts)."""
    cfg = run.cfg
    G, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    idx = step_indices(len(run.data), G, cfg.run.seed, step, cfg.data.shuffle)
    dp_rank = run.rank // cfg.deepspeed.sequence_parallel_size  # the ranks of an SP group read the same rows
    mine = idx[dp_rank * micro * run.accum:(dp_rank + 1) * micro * run.accum]  # this rank's share of the step
    micro_rows = [mine[a * micro:(a + 1) * micro] for a in range(run.accum)]
    if run.rollouts is not None:  # on-policy: sampled, scored, and the step's totals known only then
        batches, totals, extra = run.rollouts.step_batches(run.engine, [[run.data[i] for i in rows]
                                                                        for rows in micro_rows], step, G)
        return [(b, None) for b in batches], totals, extra
    totals = StepTotals(examples=G, tokens=int(run.lengths[idx].sum()))
    out = []
    for rows in micro_rows:
        ref = None if run.ref_logps is None else \
            run.ref_logps[run.batcher.layout.sequence_index(rows, len(run.data)).to(run.device)]
        out.append((run.batcher([run.data[i] for i in rows]), ref))
    return out, totals, {}


def train_step(run: Run, step: int) -> StepStats:
    """Optimizer step ``step`` (0-based): this rank's ``accum`` micro batches, then one DeepSpeed update."""
    import torch.distributed as dist

    cfg, engine = run.cfg, run.engine
    t0 = time.perf_counter()
    lr = run.scheduler.get_last_lr()[0]
    batches, totals, extra = step_batches(run, step)
    # DeepSpeed divides by accum and averages over grad_average ranks: undo both (the shares sum to the loss)
    grad_scale = float(run.accum * run.grad_average)
    counts_tokens = run.rank % cfg.deepspeed.sequence_parallel_size == 0  # one rank per SP group counts tokens
    share_sum, tokens, sums = 0.0, 0, {}
    for batch, ref in batches:
        if counts_tokens:
            tokens += int(batch["input_ids"].numel() if batch["attention_mask"] is None
                          else batch["attention_mask"].sum())
        share, metrics = engine(batch, totals, ref)
        engine.backward(share * grad_scale)
        engine.step()
        share_sum += float(share.detach())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) / run.accum
    keys = sorted(sums)
    vec = torch.tensor([share_sum, float(tokens)] + [sums[k] for k in keys], dtype=torch.float64, device=run.device)
    dist.all_reduce(vec)
    gn = engine.get_global_grad_norm()
    return StepStats(step=step + 1, loss=float(vec[0]), metrics={**{k: float(vec[2 + i]) / run.world
                                                                    for i, k in enumerate(keys)}, **extra},
                     lr=lr, grad_norm=None if gn is None else float(gn), tokens=int(vec[1]),
                     target_tokens=totals.tokens, step_time=time.perf_counter() - t0,
                     skipped=not engine.was_step_applied())


def record(run: Run, stats: StepStats) -> None:
    """Log the step (metrics.jsonl, MLflow, progress bar) and stop a run that diverged."""
    run.skipped_steps += int(stats.skipped)
    row = stats.row() | {"skipped_steps": run.skipped_steps}
    run.last = row
    if run.rank == 0:
        run.stage.append_metrics(row)
        if stats.step % run.cfg.train.log_every == 0 or stats.step == run.total_steps:
            run.tracker.log_metrics(row, step=stats.step)
        run.bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        run.bar.update(1)
        if stats.skipped and run.precision != "fp16":
            log0(f"step {stats.step}: DeepSpeed skipped the update (overflow); {run.skipped_steps} skipped so far")
    run.guard.update(stats, run.precision, run.store)


def record_probe(run: Run, row: dict) -> None:
    """A held-out probe's row: heldout.jsonl and MLflow (rank 0)."""
    if run.rank == 0:
        run.stage.append_metrics(row, run.stage.heldout)
        run.tracker.log_metrics({f"heldout_{k}": v for k, v in row.items() if k != "step"}, step=row["step"])


class DivergenceGuard:
    """Counts consecutive steps with a non-finite loss or grad norm; too many stop the run (one line)."""

    def __init__(self, limit: int):
        self.limit, self.bad, self.first = limit, 0, 0

    def update(self, stats: StepStats, precision: str, store: CheckpointStore) -> None:
        # under fp16 an overflow (inf grad norm, update skipped) is the loss scaler's business, not divergence
        finite = math.isfinite(stats.loss) and (stats.finite or (precision == "fp16" and stats.skipped))
        if finite:
            self.bad = 0
            return
        self.bad += 1
        self.first = self.first if self.bad > 1 else stats.step
        if self.bad >= self.limit:
            good = store.latest()
            then = (f"the last good checkpoint is {good} (rerun to resume from it, e.g. with a smaller train.lr)"
                    if good else "there is no checkpoint to resume from (try a smaller train.lr)")
            raise TrainingError(
                f"training diverged: loss {stats.loss:.4g}, grad norm {stats.grad_norm} at steps "
                f"{self.first}-{stats.step} ({self.bad} consecutive non-finite steps, train.max_nonfinite_steps "
                f"{self.limit}); no export was written; {then}")


def save(run: Run, step: int) -> None:
    """A checkpoint of step ``step``, unless the run is mid-divergence or its weights are not finite."""
    if run.guard.bad or not params_finite(run.engine):
        log0(f"step {step}: not saving a checkpoint of non-finite weights (last good: {run.store.latest()})")
        return
    run.store.save(run.engine, run.cfg, step, run.world)


# ----------------------------------------------------------------------------- the end


def finish(run: Run) -> TrainResult:
    """Final checkpoint, HF export, evaluation, the done marker."""
    import torch.distributed as dist

    from redi_ds.model import export_hf

    cfg, rank = run.cfg, run.rank
    if run.guard.bad:
        raise TrainingError(f"the last {run.guard.bad} step(s) had a non-finite loss or grad norm; no export was "
                            f"written; the last good checkpoint is {run.store.latest() or 'none'}")
    final_tag = f"step_{run.total_steps}"
    latest = run.store.latest()
    if latest is None or latest.name != final_tag:
        save(run, run.total_steps)
    result = TrainResult(stage=cfg.stage, stage_dir=str(run.stage_dir), steps=run.total_steps, status="done",
                         final=run.last or run.stage.last_metrics(), run_id=run.tracker.run_id,
                         tracking_uri=run.tracker.uri if run.tracker.enabled else None)
    export_dir = run.stage_dir / "export"
    if cfg.train.export:
        state = consolidated_state_dict(run.engine)
        if rank == 0:  # complete or absent, like a checkpoint: written aside, renamed into place
            partial = export_dir.with_name("export.partial")
            shutil.rmtree(partial, ignore_errors=True)
            export_hf(state, run.hf_model, run.tokenizer, str(partial))
            save_config(cfg, partial / "redi_ds_config.yaml")
            shutil.rmtree(export_dir, ignore_errors=True)
            os.replace(partial, export_dir)
        dist.barrier()
        result.export = str(export_dir)
    if rank == 0:
        final_file = run.stage.write_result(result.to_json())
        run.tracker.log_metrics({f"final_{k}": v for k, v in result.final.items() if k != "step"},
                                step=run.total_steps)
        run.tracker.log_artifact(str(final_file))
        run.tracker.log_artifact(str(run.stage.metrics))
    if cfg.eval.benchmarks and cfg.train.export:
        run.engine.destroy()  # free the accelerator for generation
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result.eval = evaluate(cfg, export_dir, run.tracker, rank, run.world)
    if rank == 0:
        run.stage.write_result(result.to_json())
        run.stage.mark_done(run.total_steps, final_tag)
    run.tracker.finish()
    dist.barrier()
    return result


def preempted(run: Run, done: int) -> TrainResult:
    if run.rank == 0:
        run.stage.mark_preempted(done)
        log0(f"stopped early at step {done}: checkpoint saved; rerun the same command to resume")
    run.tracker.finish("KILLED")
    return TrainResult(stage=run.cfg.stage, stage_dir=str(run.stage_dir), steps=done, status="preempted",
                       final=run.last, run_id=run.tracker.run_id)


def finished(cfg: Config) -> Optional[TrainResult]:
    """The stored result of a stage that is done with this very config (its final checkpoint present)."""
    if cfg.run.resume != "auto":
        return None
    result = StageDir(cfg.stage_dir).finished(cfg, CheckpointStore(cfg.stage_dir, 0).latest())
    if result is None:
        return None
    known = set(TrainResult.__dataclass_fields__)
    return TrainResult(**{k: v for k, v in result.items() if k in known} | {"status": "already_done"})


# ----------------------------------------------------------------------------- pieces


def consolidated_state_dict(engine) -> dict:
    """Full weights on rank 0 (collective under ZeRO-3)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def evaluate(cfg: Config, export_dir: Path, tracker, rank: int, world: int) -> dict:
    """Evaluate the export on every rank (data-parallel); the summary goes to this run's MLflow run."""
    from redi_ds.eval import run_eval

    return run_eval(str(export_dir), cfg.eval.benchmarks, cfg.eval, out_dir=str(cfg.stage_dir / "eval"),
                    mlflow_run_id=tracker.run_id, tracking_uri=tracker.uri if tracker.enabled else None,
                    rank=rank, world_size=world, progress=rank == 0)
