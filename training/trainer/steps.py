"""Training as named steps: setup, resume, epochs, evaluate, export.

:func:`train` runs them in order; each takes and returns typed values, so a test can run a
setup, one epoch and an evaluation on its own:

1. :func:`setup`: the accelerator, the data, the module, the optimizer's parameter groups
   (:func:`build_optimizer`) and the cosine schedule (:class:`TrainingRun`);
2. :func:`~.state.resume`: continue from ``out/last`` or start fresh (:class:`TrainState`),
   then hand the module and optimizer to accelerate;
3. :func:`run_epoch` (one epoch: :func:`train_epoch` on every batch, :func:`validation_loss`,
   early stopping with best-weights keeping) and :func:`train_epochs` (the loop: resumable
   saves, logging, progress);
4. :func:`evaluate_best`: the best epoch's weights, per-split metrics and the test predictions;
5. :func:`~.export.export_run`: ``metrics.json``, ``history.json``,
   ``test_predictions.parquet`` and the :class:`~apex_reward.ApexRewardModel` checkpoint
   (:func:`~.export.export_checkpoint`).

The early-stopping state (:class:`~.state.TrainState`), its saving and :func:`~.state.resume`
live in :mod:`.state` (``resume`` is re-exported here, as the second step).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from apex_reward.config import ConditionConfig, HeadConfig
from apex_reward.errors import ConfigError, require
from apex_reward.heads import ApexHead

from ..distributed import accelerator_cpu, check_launch
from .config import TrainConfig
from .data import SplitData, TrainingData, load_training_data, unit_scale
from .export import export_run
from .objective import (
    TrainModule,
    combine_losses,
    consistency_loss,
    evaluate,
    task_weights,
)
from .run import BestEvaluation, EpochStats, TrainingRun, TrainResult
from .state import TrainState, resume, save_state, save_tensors
from .views import InputAugment

logger = logging.getLogger(__name__)

__all__ = [
    "make_accelerator",
    "build_optimizer",
    "setup",
    "resume",
    "train_epoch",
    "validation_loss",
    "run_epoch",
    "train_epochs",
    "evaluate_best",
    "train_one",
    "head_config",
]


# ----------------------------------------------------------------------------------------------
# 1. setup


def make_accelerator(config: TrainConfig, out: Path):
    """The ``accelerate.Accelerator`` of a run: ``--device``, mixed precision, the tracker.

    Raises:
        ConfigError: a device this machine lacks, or TensorBoard asked for but not installed.
    """
    accelerate = require("accelerate", "train", "apex-reward train")
    cpu = accelerator_cpu(config.device)
    cuda = torch.cuda.is_available() and not cpu
    mp = config.mixed_precision
    if mp == "auto":
        mp = "fp16" if cuda else "no"
    if mp == "fp16" and not cuda:
        logger.warning("fp16 mixed precision needs a GPU; training in fp32 (use bf16 on CPU)")
        mp = "no"
    log_with = None
    if config.log_with in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            if config.log_with == "tensorboard":
                raise ConfigError("log_with=tensorboard but tensorboard is not installed") from None
    accelerator = accelerate.Accelerator(
        cpu=cpu, mixed_precision=mp, log_with=log_with, project_dir=str(out / "logs")
    )
    check_launch(accelerator)
    return accelerator


def build_optimizer(module: TrainModule, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with three parameter groups: weight matrices (weight decay), biases and norms (no
    decay), and the uncertainty parameters s_t (no decay, ``uncertainty_lr`` or 10 x ``lr``)."""
    decay = [p for name, p in module.named_parameters() if name != "log_vars" and p.ndim >= 2]
    no_decay = [p for name, p in module.named_parameters() if name != "log_vars" and p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {
                "params": [module.log_vars],
                "weight_decay": 0.0,
                "lr": config.uncertainty_lr or 10 * config.lr,
            },
        ],
        lr=config.lr,
    )


def head_config(config: TrainConfig, data: TrainingData) -> HeadConfig:
    """The head a run trains: depth, tasks and mode of ``config``, and with ``config.condition``
    the conditioning input over ``data``'s vocabulary of that column.

    Raises:
        ConfigError: ``config.condition`` names a column the data was not loaded with.
    """
    condition = None
    if config.condition:
        if data.condition_values is None or data.condition_column != config.condition:
            raise ConfigError(
                f"--condition {config.condition}: the training data carries no such column "
                f"(it was loaded with {data.condition_column!r})"
            )
        condition = ConditionConfig(
            values=list(data.condition_values),
            column=config.condition,
            mode=config.condition_mode,
            dropout=config.condition_dropout,
        )
    return HeadConfig(
        trunk_layers=config.trunk_layers, tasks=config.tasks, mode=config.mode, condition=condition
    )


def setup(config: TrainConfig, data: TrainingData | None = None) -> TrainingRun:
    """Step 1: the accelerator, the data (``data``, or ``config.embeddings`` joined with
    ``config.prepared``), the seeded module, the optimizer and the schedule.

    Raises:
        ConfigError: the data's tasks differ from the config's, or too few training samples
            for every process to get 2 per batch (BatchNorm).
    """
    out = Path(config.out)
    accelerator = make_accelerator(config, out)
    world = accelerator.num_processes
    if data is None:
        data = load_training_data(config)
    tasks = data.tasks
    torch.manual_seed(config.seed)
    head_cfg = head_config(config, data)
    if head_cfg.task_names != tasks:
        raise ConfigError(f"data has tasks {tasks} but the config asks for {head_cfg.task_names}")
    module = TrainModule(ApexHead(data.hidden_size, data.num_layers, head_cfg), len(tasks))
    optimizer = build_optimizer(module, config)
    n = len(data.splits["train"])
    global_batch = config.batch_size * world
    steps_per_epoch = max(1, n // global_batch)
    per_rank = [len(c) for c in torch.arange(min(n, global_batch)).chunk(world)]
    if len(per_rank) < world or min(per_rank) < 2:
        raise ConfigError(
            f"{n} training samples cannot give each of {world} processes at least 2 per batch (BatchNorm)"
        )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )
    lo, span = unit_scale(tasks)
    return TrainingRun(
        config,
        data,
        out,
        accelerator,
        module,
        optimizer,
        scheduler,
        steps_per_epoch,
        global_batch,
        lo,
        span,
        task_weights(config, tasks),
        augment=InputAugment.for_run(data.splits["train"], config),
    )


# ----------------------------------------------------------------------------------------------
# 3. epochs


def _batch_loss(
    run: TrainingRun,
    x: torch.Tensor,
    y: torch.Tensor,
    c: torch.Tensor | None = None,
    partner: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The strategy's loss on one batch (``c``: condition indices, conditioned runs; ``partner``:
    another view of the same songs, whose view-consistency penalty is added), and the ``[T]``
    unit-range per-task MSEs of ``x``."""
    if partner is None:
        pred = run.model(x, c).float()
    else:  # one pass over both views: BatchNorm sees them together
        both = run.model(torch.cat([x, partner]), None if c is None else torch.cat([c, c]))
        pred, other = both.float().chunk(2)
    target = (y - run.lo.to(y.device)) / run.span.to(y.device)
    per_task = ((pred - target) ** 2).mean(dim=0)
    loss = combine_losses(per_task, run.config.loss, run.weights, run.module.log_vars)
    if partner is not None:
        penalty = consistency_loss(pred, other, run.config.loss, run.weights, run.module.log_vars)
        loss = loss + run.config.view_consistency * penalty
    return loss, per_task


def train_epoch(run: TrainingRun, epoch: int) -> EpochStats:
    """Optimizer steps over one epoch: every step the same global batch (shuffled with a seed of
    ``config.seed`` and ``epoch``) is cut into one contiguous chunk per process."""
    train_split = run.data.splits["train"]
    n, global_batch = len(train_split), run.global_batch
    run.model.train()
    g = torch.Generator().manual_seed(run.config.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    train_loss, seen = 0.0, 0
    t_epoch = time.perf_counter()
    for step in range(run.steps_per_epoch):
        idx = perm[step * global_batch : (step + 1) * global_batch] if n >= global_batch else perm
        mine = idx.chunk(run.world)[run.rank]
        partner = None
        if run.augment is None:
            x = train_split.features[mine].to(run.device, non_blocking=True)
        else:  # drawn over the global batch, so independent of the number of processes
            x = run.augment.batch(idx, epoch, step).chunk(run.world)[run.rank].to(run.device)
            if run.view_consistency:
                partner = run.augment.partner_batch(idx, epoch, step)
                partner = partner.chunk(run.world)[run.rank].to(run.device)
        y = train_split.targets[mine].to(run.device, non_blocking=True)
        c = train_split.conditions_at(mine)
        if c is not None:
            c = c.to(run.device, non_blocking=True)
        with run.accelerator.autocast():
            loss, _ = _batch_loss(run, x, y, c, partner)
        run.accelerator.backward(loss)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        train_loss += float(loss.detach()) * len(mine)
        seen += len(mine)
    return EpochStats(train_loss / max(1, seen), seen, time.perf_counter() - t_epoch)


@torch.no_grad()
def validation_loss(run: TrainingRun, split: SplitData) -> tuple[float, list[float]]:
    """The early-stopping criterion on ``split``: the sum of unit-range per-task MSEs with fixed
    task weights, and the per-task MSEs.

    The fixed weights are equal for ``equal``/``uncertainty`` and the manual ones for ``manual``:
    with the uncertainty strategy the learned weights exp(-s_t) grow as training fits, which
    would inflate the validation loss and favour early epochs.
    """
    module, device = run.module, run.device
    module.eval()
    per = torch.zeros(len(run.tasks))
    for start in range(0, len(split), 8192):
        x = split.features[start : start + 8192].to(device)
        y = split.targets[start : start + 8192].to(device)
        c = split.conditions_at(slice(start, start + 8192))
        with run.accelerator.autocast():
            pred = module(x, None if c is None else c.to(device)).float()
        target = (y - run.lo.to(device)) / run.span.to(device)
        per += ((pred - target) ** 2).sum(dim=0).cpu()
    per /= len(split)
    return float((run.weights * per).sum()), per.tolist()


def run_epoch(run: TrainingRun, state: TrainState) -> dict[str, Any]:
    """Epoch ``state.next_epoch``: train, validate, update early stopping (saving the best
    weights to ``out/best``). Returns the epoch's history record."""
    epoch, tasks, raw = state.next_epoch, run.tasks, run.module
    stats = train_epoch(run, epoch)
    _sync_buffers(raw, run.world)  # BatchNorm statistics differ per process after local steps
    val_loss, val_per_task = validation_loss(run, run.data.splits["val"])
    if run.world > 1:  # every process must take the same early-stopping decision
        val_loss = float(
            run.accelerator.reduce(torch.tensor([val_loss], device=run.device), "mean")[0]
        )
    record = {
        "epoch": epoch,
        "train_loss": stats.train_loss,
        "val_loss": val_loss,
        "val_mse_unit": dict(zip(tasks, val_per_task)),
        "lr": run.scheduler.get_last_lr()[0],
        "epoch_seconds": stats.seconds,
        "samples_per_s": stats.samples * run.world / max(stats.seconds, 1e-9),
        "sigma2": dict(zip(tasks, torch.exp(raw.log_vars.detach().float()).cpu().tolist())),
    }
    if state.update(record, run.config) and run.accelerator.is_main_process:
        save_tensors(run.out / "best" / "module.safetensors", raw.state_dict())
    return record


def train_epochs(run: TrainingRun, state: TrainState, *, progress: bool = True) -> float:
    """Run epochs until early stopping, ``epochs``, or ``max_epochs_this_run`` in this call;
    save the resumable state (at most every ``save_interval_s``, always at the end), log to the
    tracker, show a progress bar. Returns the seconds it took."""
    config, accelerator = run.config, run.accelerator
    last_save = time.perf_counter()
    bar = None
    if progress and accelerator.is_main_process and not state.finished:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.epochs,
            initial=state.next_epoch,
            unit="epoch",
            desc=f"training {run.out.name}",
            dynamic_ncols=True,
        )
    epochs_run = 0
    t0 = time.perf_counter()
    while not state.finished:
        record = run_epoch(run, state)
        epochs_run += 1
        stop_here = (
            config.max_epochs_this_run is not None and epochs_run >= config.max_epochs_this_run
        )
        now = time.perf_counter()
        if state.finished or stop_here or now - last_save >= config.save_interval_s:
            save_state(run, state)
            last_save = now
        if accelerator.is_main_process:
            accelerator.log(
                {
                    "train/loss": record["train_loss"],
                    "val/loss": record["val_loss"],
                    "lr": record["lr"],
                    **{f"val/mse_unit/{t}": v for t, v in record["val_mse_unit"].items()},
                    **{f"sigma2/{t}": v for t, v in record["sigma2"].items()},
                },
                step=record["epoch"],
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(
                f"train {record['train_loss']:.4f} val {record['val_loss']:.4f} "
                f"best@{state.best_epoch}"
            )
        if stop_here and not state.finished:
            break
    if bar is not None:
        bar.close()
    return time.perf_counter() - t0


@torch.no_grad()
def _sync_buffers(module: nn.Module, world: int) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process."""
    if world > 1:
        for buf in module.buffers():
            torch.distributed.broadcast(buf, src=0)


@torch.no_grad()
def _params_in_sync(accelerator, module: nn.Module) -> bool:
    """True when every process holds the same parameters (DDP keeps them equal; checked, not assumed)."""
    flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
    weights = torch.arange(len(flat), dtype=torch.float64, device=flat.device)
    probe = torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()])
    gathered = accelerator.gather(probe.to(accelerator.device)[None]).cpu()
    return bool(torch.all(gathered == gathered[0]))


# ----------------------------------------------------------------------------------------------
# 4. evaluate (5. export: see .export)


def evaluate_best(run: TrainingRun) -> BestEvaluation:
    """Step 4: load the best epoch's weights (``out/best``) into the module and evaluate it on
    every split."""
    run.accelerator.wait_for_everyone()
    run.module.load_state_dict(load_file(str(run.out / "best" / "module.safetensors")))
    metrics, predictions = evaluate(run.module, run.data, run.device)
    return BestEvaluation(metrics, predictions, run.module.log_vars.detach().float().cpu().tolist())


# ----------------------------------------------------------------------------------------------
# the whole run


def train_one(
    config: TrainConfig, data: TrainingData | None = None, *, progress: bool = True
) -> TrainResult:
    """Train one head: :func:`setup`, :func:`resume`, :func:`train_epochs`, then (once
    finished) :func:`evaluate_best` and :func:`export_run`. ``data`` overrides loading from
    ``config.embeddings``/``config.prepared`` (tests). ``config.ensemble`` is not looked at
    (:func:`~.entry.train` chooses between this and an ensemble)."""
    run = setup(config, data)
    state = resume(run)
    seconds = train_epochs(run, state, progress=progress)
    params_in_sync = _params_in_sync(run.accelerator, run.module)
    result = TrainResult(
        metrics={},
        history=state.history,
        best_epoch=state.best_epoch,
        finished=state.finished,
        log_vars=run.module.log_vars.detach().float().cpu().tolist(),
        out=run.out,
    )
    if state.finished:
        best = evaluate_best(run)
        result.metrics, result.log_vars = best.metrics, best.log_vars
        result.checkpoint = export_run(
            run, state, best, seconds=seconds, params_in_sync=params_in_sync
        )
    run.accelerator.end_training()
    return result
