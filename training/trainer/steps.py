"""Multi-task training of the APEX heads on extracted embeddings (APEX_SPEC §4).

``apex-reward train --embeddings runs/embeddings --prepared runs/prepared/prepared.parquet --model runs/apex-95m --out runs/train``

or, on four GPUs with fp16 DDP::

    accelerate launch --config_file training/configs/accelerate_4gpu_fp16.yaml -m apex_reward train --config training/configs/model_c.yaml ...

* Data: per-song (song mode) or per-segment (segment mode) MERT layer features from
  :class:`~apex_reward.training.embeddings.EmbeddingStore`, targets from ``prepared.parquet``
  (streams/likes scores and, for the full task set, the five aesthetic labels).
* The loss sees every target scaled to [0, 1] by its range (popularity /100, aesthetics
  (x-1)/4; the heads' sigmoid outputs live there too), so "equal" weighting is meaningful. Loss
  strategies: ``equal`` (sum of per-task MSE), ``manual`` (popularity weight above aesthetic,
  default 1.0 vs 0.5), ``uncertainty`` (Kendall et al.: sum of 0.5 exp(-s_t) L_t + 0.5 s_t with
  learned s_t = log sigma_t^2). Metrics are reported in native units.
* AdamW + cosine annealing (per step), early stopping on the validation loss with best-checkpoint
  keeping, seeded. The validation loss is the sum of unit-range per-task MSEs with the strategy's
  fixed weights (equal for ``equal`` and ``uncertainty``, the manual weights for ``manual``): the
  learned uncertainty weights are left out because they grow as training fits, which would make
  the criterion favour early epochs. Batches: ``batch_size`` per process; every step the same global batch is cut
  into one contiguous chunk per process, so a 4-process run sees the batches a 1-process run with
  4x the batch size sees. Accelerate handles DDP and mixed precision (fp16 by default on GPU,
  bf16 on request, fp32 on CPU).
* Resumable without pickle: after each epoch the head, the optimizer state (flattened to
  safetensors), the scheduler, the early-stopping state (JSON) and every process's RNG state are
  saved under ``out/last``; rerunning the same command continues from there.
* Output: ``metrics.json`` (per split and task: MSE, MAE, Pearson, Spearman), ``history.json``,
  ``test_predictions.parquet``, and ``model/`` — an :class:`~apex_reward.ApexRewardModel`
  checkpoint (trained head + the extraction model's front end and encoder + popularity reference
  quantiles) that ``from_pretrained`` loads and scores audio with.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from apex_reward.checkpoint import ENCODER_DIGEST_KEY
from apex_reward.cli import Command
from apex_reward.config import (
    AESTHETIC_TASKS,
    POPULARITY_TASKS,
    SCORE_RANGES,
    TASK_SETS,
    ApexConfig,
    HeadConfig,
    PopularityReferenceConfig,
)
from apex_reward.dataclass_io import (
    add_dataclass_arguments,
    dataclass_from_args,
    from_dict,
    to_dict,
)
from apex_reward.errors import ConfigError, require
from apex_reward.files import atomic_path, atomic_write_text
from apex_reward.heads import ApexHead
from apex_reward.popularity import percentile_ranks

from ..distributed import check_launch, finish_distributed

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "SplitData",
    "TrainingData",
    "TrainResult",
    "train",
    "regression_metrics",
    "export_checkpoint",
]

#: target column in prepared.parquet for each task
TARGET_COLUMNS: dict[str, str] = {
    "streams": "streams_score",
    "likes": "likes_score",
    **{t: t for t in AESTHETIC_TASKS},
}


@dataclass
class TrainConfig:
    """Options of ``apex-reward train`` (one run of the §4 training)."""

    embeddings: str = field(
        default="", metadata={"help": "extraction directory (apex-reward extract --out)"}
    )
    prepared: str = field(
        default="", metadata={"help": "prepared.parquet with targets and the split"}
    )
    model: str = field(
        default="",
        metadata={
            "help": "the checkpoint the embeddings were extracted with: its front end and encoder go into the exported model"
        },
    )
    out: str = field(default="runs/train", metadata={"help": "output directory"})
    tasks: Literal["full", "popularity"] = field(
        default="full", metadata={"help": "7 heads or streams+likes only"}
    )
    trunk_layers: Literal[2, 3] = field(default=2, metadata={"help": "shared trunk depth"})
    mode: Literal["song", "segment"] = field(
        default="song",
        metadata={"help": "song: average segments first; segment: one sample per segment"},
    )
    loss: Literal["equal", "manual", "uncertainty"] = field(
        default="uncertainty", metadata={"help": "loss strategy"}
    )
    popularity_weight: float = field(
        default=1.0, metadata={"help": "manual strategy: weight of streams and likes"}
    )
    aesthetic_weight: float = field(
        default=0.5, metadata={"help": "manual strategy: weight of each aesthetic task"}
    )
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    uncertainty_lr: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of the uncertainty parameters s_t (default: 10 x lr; they are "
            "scalars that must travel several units in log space)"
        },
    )
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=100, metadata={"help": "maximum epochs (cosine schedule length)"})
    batch_size: int = field(default=512, metadata={"help": "samples per process per step"})
    patience: int = field(
        default=10, metadata={"help": "early stopping: epochs without validation improvement"}
    )
    min_delta: float = field(
        default=0.0, metadata={"help": "early stopping: smallest improvement that counts"}
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field(
        default="auto",
        metadata={"help": "auto: fp16 on GPU, none on CPU (CPU fp16 is not supported)"},
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    cpu: bool = field(default=False, metadata={"help": "train on CPU even if GPUs are present"})
    log_with: Literal["auto", "tensorboard", "none"] = field(
        default="auto", metadata={"help": "experiment tracker (auto: TensorBoard when installed)"}
    )
    resume: bool = field(default=True, metadata={"help": "continue from out/last when it exists"})
    export: bool = field(
        default=True, metadata={"help": "write the ApexRewardModel checkpoint to out/model"}
    )
    save_interval_s: float = field(
        default=0.0,
        metadata={
            "help": "save the resumable state at most this often, seconds (0: every epoch; always at the end)"
        },
    )
    max_epochs_this_run: int | None = field(
        default=None,
        metadata={"help": "stop (resumably) after this many epochs in this invocation"},
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class SplitData:
    """One split, ready for training.

    Attributes:
        features: ``[M, L, H]`` per-sample layer features (fp16 or fp32, CPU); M = songs in song
            mode, segments in segment mode.
        targets: ``[M, T]`` float32 targets in native units (one row per sample).
        song_index: ``[M]`` int64 song of each sample (index into ``song_ids``).
        weights: ``[M]`` float32 weight of each sample in its song's average (segment mode).
        song_ids: the songs, in index order.
    """

    features: torch.Tensor
    targets: torch.Tensor
    song_index: torch.Tensor
    weights: torch.Tensor
    song_ids: list[str]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def song_targets(self) -> torch.Tensor:
        """``[S, T]`` native-unit targets per song."""
        out = torch.empty(len(self.song_ids), self.targets.shape[1])
        out[self.song_index] = self.targets
        return out


@dataclass
class TrainingData:
    """Train/val/test splits for one task set and input mode."""

    tasks: tuple[str, ...]
    mode: str
    splits: dict[str, SplitData]

    @property
    def num_layers(self) -> int:
        return int(self.splits["train"].features.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.splits["train"].features.shape[2])

    @classmethod
    def from_extraction(cls, store, prepared, tasks: str, mode: str) -> TrainingData:
        """Join an :class:`EmbeddingStore` with ``prepared`` (DataFrame) on song id."""
        names = TASK_SETS[tasks]
        cols = [TARGET_COLUMNS[t] for t in names]
        missing = [c for c in cols + ["split"] if c not in prepared.columns]
        if missing:
            raise ConfigError(
                f"prepared data lacks column(s) {missing}"
                + (" (aesthetic labels are needed for --tasks full)" if tasks == "full" else "")
            )
        extracted = set(store.song_ids)
        df = prepared[prepared["id"].isin(extracted)]
        dropped = len(prepared) - len(df)
        if dropped:
            logger.warning(
                "%d prepared songs have no embeddings (unreadable at extraction); skipped", dropped
            )
        if df[cols].isna().any().any():
            raise ConfigError("prepared data has missing target values")
        splits = {}
        for split in ("train", "val", "test"):
            part = df[df["split"] == split]
            if part.empty:
                raise ConfigError(f"the {split} split is empty")
            ids = part["id"].tolist()
            y = torch.as_tensor(part[cols].to_numpy(dtype=np.float32, copy=True))
            if mode == "song":
                # float32: rounding the averaged song features to fp16 would make the trainer's
                # predictions differ from the exported model's (which averages fp16 segments)
                feats = store.songs(ids)
                n = len(ids)
                splits[split] = SplitData(feats, y, torch.arange(n), torch.ones(n), ids)
            else:
                seg = store.segments(ids)
                splits[split] = SplitData(
                    seg.layer_features.to(torch.float16),
                    y[seg.song_index],
                    seg.song_index,
                    seg.weights,
                    ids,
                )
        return cls(tuple(names), mode, splits)

    @classmethod
    def from_arrays(
        cls,
        features: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        tasks: tuple[str, ...],
    ) -> TrainingData:
        """Song-mode data from in-memory tensors: ``features[split]`` ``[N, L, H]``,
        ``targets[split]`` ``[N, T]`` in native units (tests, benchmarks)."""
        splits = {}
        for split in ("train", "val", "test"):
            x, y = features[split], targets[split].float()
            n = x.shape[0]
            splits[split] = SplitData(
                x, y, torch.arange(n), torch.ones(n), [f"{split}{i}" for i in range(n)]
            )
        return cls(tuple(tasks), "song", splits)


def _unit_scale(tasks: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.tensor([SCORE_RANGES[t][0] for t in tasks])
    hi = torch.tensor([SCORE_RANGES[t][1] for t in tasks])
    return lo, hi - lo


# ----------------------------------------------------------------------------------------------
# model and loss


class TrainModule(nn.Module):
    """The head plus the uncertainty parameters; ``forward`` gives unit-range predictions."""

    def __init__(self, head: ApexHead, num_tasks: int) -> None:
        super().__init__()
        self.head = head
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, L, H]`` -> ``[B, T]`` predictions in [0, 1] (sigmoid of the head logits)."""
        z = self.head.logits(self.head.embed(features))
        return torch.sigmoid(torch.stack(list(z.values()), dim=1))


@torch.no_grad()
def _init_log_vars(
    module: TrainModule, split: SplitData, lo: torch.Tensor, span: torch.Tensor, seed: int
) -> None:
    """Start each s_t at log(initial MSE of task t) on up to 4096 training samples.

    With s_t = 0 the uncertainty weights start at 1 and Adam moves s_t by at most ~lr per step,
    so reaching log sigma_t^2 (about -6 for a well-predicted task in unit range) takes thousands
    of steps; starting from the initial loss puts every task on the same footing at step 0.
    Every process computes the same value (same seed, same samples)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=g)[:4096]
    was_training = module.training
    module.eval()
    pred = module(split.features[idx]).float()
    module.train(was_training)
    target = (split.targets[idx] - lo) / span
    mse = ((pred - target) ** 2).mean(dim=0).clamp_min(1e-8)
    module.log_vars.copy_(torch.log(mse))


def _task_weights(config: TrainConfig, tasks: tuple[str, ...]) -> torch.Tensor:
    if config.loss == "manual":
        return torch.tensor(
            [
                config.popularity_weight if t in POPULARITY_TASKS else config.aesthetic_weight
                for t in tasks
            ]
        )
    return torch.ones(len(tasks))


def combine_losses(
    per_task: torch.Tensor, strategy: str, weights: torch.Tensor, log_vars: torch.Tensor
) -> torch.Tensor:
    """Total loss from per-task MSEs ``[T]`` (APEX_SPEC §4 strategies A, B, C)."""
    if strategy == "uncertainty":
        return (0.5 * torch.exp(-log_vars) * per_task + 0.5 * log_vars).sum()
    return (weights.to(per_task.device) * per_task).sum()


# ----------------------------------------------------------------------------------------------
# metrics


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MSE, MAE, Pearson and Spearman (average ranks for ties) of two ``[N]`` arrays."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    err = pred - true

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        if a.std() == 0 or b.std() == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    return {
        "mse": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
        "pearson": corr(pred, true),
        "spearman": corr(percentile_ranks(pred), percentile_ranks(true)),
        "n": int(len(pred)),
    }


@torch.no_grad()
def predict_songs(
    module: TrainModule, split: SplitData, device: torch.device, batch: int = 4096
) -> torch.Tensor:
    """``[S, T]`` per-song predictions in unit range (segment mode: weighted mean of segments)."""
    module.eval()
    outs = []
    for start in range(0, len(split), batch):
        x = split.features[start : start + batch].to(device)
        outs.append(module(x).float().cpu())
    pred = torch.cat(outs)
    if split.song_index.numel() == len(split.song_ids) and torch.equal(
        split.song_index, torch.arange(len(split.song_ids))
    ):
        return pred
    w = split.weights.float()[:, None]
    num = torch.zeros(len(split.song_ids), pred.shape[1]).index_add_(0, split.song_index, pred * w)
    den = torch.zeros(len(split.song_ids), 1).index_add_(0, split.song_index, w)
    return num / den


# ----------------------------------------------------------------------------------------------
# pickle-free training state


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, st in state["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {
            k: (tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _resume_key(config: TrainConfig) -> dict[str, Any]:
    """Config fields that must match to continue a run."""
    d = to_dict(config)
    for k in (
        "out",
        "resume",
        "export",
        "max_epochs_this_run",
        "epochs",
        "patience",
        "log_with",
        "cpu",
        "mixed_precision",
    ):
        d.pop(k, None)
    return d


# ----------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    """What :func:`train` returns (on every process)."""

    metrics: dict[str, dict[str, dict[str, float]]]
    history: list[dict[str, Any]]
    best_epoch: int
    finished: bool
    log_vars: list[float]
    out: Path
    checkpoint: Path | None = None


def _accelerator(config: TrainConfig, out: Path):
    accelerate = require("accelerate", "train", "apex-reward train")
    cuda = torch.cuda.is_available() and not config.cpu
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
        cpu=config.cpu, mixed_precision=mp, log_with=log_with, project_dir=str(out / "logs")
    )
    check_launch(accelerator)
    return accelerator


def train(
    config: TrainConfig, data: TrainingData | None = None, *, progress: bool = True
) -> TrainResult:
    """Train one condition; see the module docstring. ``data`` overrides loading from
    ``config.embeddings``/``config.prepared`` (tests)."""
    from safetensors.torch import load_file

    out = Path(config.out)
    accelerator = _accelerator(config, out)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if data is None:
        data = load_training_data(config)
    tasks = data.tasks
    torch.manual_seed(config.seed)
    head_cfg = HeadConfig(trunk_layers=config.trunk_layers, tasks=config.tasks, mode=config.mode)
    if head_cfg.task_names != tasks:
        raise ConfigError(f"data has tasks {tasks} but the config asks for {head_cfg.task_names}")
    module = TrainModule(ApexHead(data.hidden_size, data.num_layers, head_cfg), len(tasks))
    decay = [p for name, p in module.named_parameters() if name != "log_vars" and p.ndim >= 2]
    no_decay = [p for name, p in module.named_parameters() if name != "log_vars" and p.ndim < 2]
    optimizer = torch.optim.AdamW(
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
    train_split = data.splits["train"]
    n = len(train_split)
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
    lo, span = _unit_scale(tasks)
    task_w = _task_weights(config, tasks)

    # resume
    last = out / "last"
    start_epoch, best_val, bad_epochs, best_epoch, history = 0, math.inf, 0, -1, []
    state_path = last / "state.json"
    if config.resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state["resume_key"] != _resume_key(config):
            raise ConfigError(
                f"{out} holds a run with a different configuration; use another --out or --no-resume"
            )
        module.load_state_dict(load_file(str(last / "module.safetensors")))
        optimizer.load_state_dict(
            _unflatten_optimizer(load_file(str(last / "optimizer.safetensors")), state["optimizer"])
        )
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_val, bad_epochs = (
            state["epoch"] + 1,
            state["best_val"],
            state["bad_epochs"],
        )
        best_epoch, history = state["best_epoch"], state["history"]
        rng_file = last / f"rng-rank{rank}-epoch{state['epoch']}.safetensors"
        if rng_file.is_file():
            _set_rng_state(load_file(str(rng_file)))
        else:
            logger.warning(
                "no RNG state for rank %d at epoch %d; dropout noise will differ",
                rank,
                state["epoch"],
            )
        if accelerator.is_main_process:
            logger.info("resuming %s at epoch %d", out, start_epoch)
    else:
        if config.resume is False and last.exists() and accelerator.is_main_process:
            shutil.rmtree(last)
        if config.loss == "uncertainty":
            _init_log_vars(module, train_split, lo, span, config.seed)
    finished = bad_epochs >= config.patience or start_epoch >= config.epochs

    model, optimizer = accelerator.prepare(module, optimizer)
    raw = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(
            "apex",
            config={
                k: v for k, v in to_dict(config).items() if isinstance(v, (int, float, str, bool))
            },
        )
    accelerator.wait_for_everyone()

    def batch_loss(
        x: torch.Tensor, y: torch.Tensor, mod: nn.Module, log_vars: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pred = mod(x).float()
        target = (y - lo.to(y.device)) / span.to(y.device)
        per_task = ((pred - target) ** 2).mean(dim=0)
        return combine_losses(per_task, config.loss, task_w, log_vars), per_task

    @torch.no_grad()
    def split_loss(split: SplitData) -> tuple[float, list[float]]:
        raw.eval()
        total, per = 0.0, torch.zeros(len(tasks))
        for start in range(0, len(split), 8192):
            x = split.features[start : start + 8192].to(device)
            y = split.targets[start : start + 8192].to(device)
            with accelerator.autocast():
                pred = raw(x).float()
            target = (y - lo.to(device)) / span.to(device)
            per += ((pred - target) ** 2).sum(dim=0).cpu()
        per /= len(split)
        # The early-stopping criterion uses fixed task weights: with the uncertainty strategy the
        # learned weights exp(-s_t) grow as training fits, which would inflate the validation loss
        # and favour early epochs. Equal weights for "equal"/"uncertainty", the manual ones for "manual".
        total = float((task_w * per).sum())
        return total, per.tolist()

    def _save_state(
        epoch: int, best_val: float, bad_epochs: int, best_epoch: int, finished: bool
    ) -> None:
        """Resumable state: every process's RNG first, then the main process's state file (the
        commit point), then older RNG files are removed."""
        last.mkdir(parents=True, exist_ok=True)
        _save_tensors(last / f"rng-rank{rank}-epoch{epoch}.safetensors", _rng_state())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
            _save_tensors(last / "module.safetensors", raw.state_dict())
            _save_tensors(last / "optimizer.safetensors", opt_tensors)
            state = {
                "epoch": epoch,
                "best_val": best_val,
                "bad_epochs": bad_epochs,
                "best_epoch": best_epoch,
                "history": history,
                "scheduler": scheduler.state_dict(),
                "optimizer": opt_meta,
                "resume_key": _resume_key(config),
                "finished": finished,
            }
            _atomic_json(state_path, state)
            for old in last.glob("rng-rank*-epoch*.safetensors"):
                if not old.name.endswith(f"-epoch{epoch}.safetensors"):
                    old.unlink(missing_ok=True)
        accelerator.wait_for_everyone()

    last_save = time.perf_counter()
    bar = None
    if progress and accelerator.is_main_process and not finished:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.epochs,
            initial=start_epoch,
            unit="epoch",
            desc=f"training {out.name}",
            dynamic_ncols=True,
        )
    epochs_run = 0
    epoch = start_epoch - 1
    t0 = time.perf_counter()
    while not finished:
        epoch += 1
        model.train()
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        train_loss, seen = 0.0, 0
        t_epoch = time.perf_counter()
        for step in range(steps_per_epoch):
            idx = (
                perm[step * global_batch : (step + 1) * global_batch] if n >= global_batch else perm
            )
            mine = idx.chunk(world)[rank]
            x = train_split.features[mine].to(device, non_blocking=True)
            y = train_split.targets[mine].to(device, non_blocking=True)
            with accelerator.autocast():
                loss, _ = batch_loss(x, y, model, raw.log_vars)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_loss += float(loss.detach()) * len(mine)
            seen += len(mine)
        epoch_seconds = time.perf_counter() - t_epoch
        _sync_buffers(raw, world)  # BatchNorm statistics differ per process after local steps
        val_loss, val_per_task = split_loss(data.splits["val"])
        if world > 1:  # every process must take the same early-stopping decision
            val_loss = float(accelerator.reduce(torch.tensor([val_loss], device=device), "mean")[0])
        record = {
            "epoch": epoch,
            "train_loss": train_loss / max(1, seen),
            "val_loss": val_loss,
            "val_mse_unit": dict(zip(tasks, val_per_task)),
            "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": epoch_seconds,
            "samples_per_s": seen * world / max(epoch_seconds, 1e-9),
            "sigma2": dict(zip(tasks, torch.exp(raw.log_vars.detach().float()).cpu().tolist())),
        }
        history.append(record)
        improved = val_loss < best_val - config.min_delta
        if improved:
            best_val, best_epoch, bad_epochs = val_loss, epoch, 0
            if accelerator.is_main_process:
                _save_tensors(out / "best" / "module.safetensors", raw.state_dict())
        else:
            bad_epochs += 1
        finished = bad_epochs >= config.patience or epoch + 1 >= config.epochs
        epochs_run += 1
        stop_here = (
            config.max_epochs_this_run is not None and epochs_run >= config.max_epochs_this_run
        )
        now = time.perf_counter()
        if finished or stop_here or now - last_save >= config.save_interval_s:
            _save_state(epoch, best_val, bad_epochs, best_epoch, finished)
            last_save = now
        if accelerator.is_main_process:
            accelerator.log(
                {
                    "train/loss": record["train_loss"],
                    "val/loss": val_loss,
                    "lr": record["lr"],
                    **{f"val/mse_unit/{t}": v for t, v in record["val_mse_unit"].items()},
                    **{f"sigma2/{t}": v for t, v in record["sigma2"].items()},
                },
                step=epoch,
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(
                f"train {record['train_loss']:.4f} val {val_loss:.4f} best@{best_epoch}"
            )
        if stop_here and not finished:
            break
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0

    params_in_sync = _params_in_sync(accelerator, raw)
    result = TrainResult(
        metrics={},
        history=history,
        best_epoch=best_epoch,
        finished=finished,
        log_vars=raw.log_vars.detach().float().cpu().tolist(),
        out=out,
    )
    if finished:
        best_file = out / "best" / "module.safetensors"
        accelerator.wait_for_everyone()
        raw.load_state_dict(load_file(str(best_file)))
        result.log_vars = raw.log_vars.detach().float().cpu().tolist()
        result.metrics, predictions = evaluate(raw, data, device)
        if accelerator.is_main_process:
            _atomic_json(
                out / "metrics.json",
                {
                    "metrics": result.metrics,
                    "best_epoch": best_epoch,
                    "sigma2": dict(zip(tasks, np.exp(result.log_vars).tolist())),
                    "train_seconds_this_run": elapsed,
                    "world_size": world,
                    "params_in_sync": params_in_sync,
                    "config": to_dict(config),
                },
            )
            _atomic_json(out / "history.json", history)
            predictions.to_parquet(out / "test_predictions.parquet", index=False)
            if config.export and config.model:
                result.checkpoint = export_checkpoint(
                    raw.head, config, out / "model", metrics=result.metrics, best_epoch=best_epoch
                )
        accelerator.wait_for_everyone()
        if result.checkpoint is None and config.export and config.model:
            result.checkpoint = out / "model"
    accelerator.end_training()
    return result


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


def evaluate(module: TrainModule, data: TrainingData, device) -> tuple[dict[str, Any], Any]:
    """Per-split, per-task metrics in native units, and the test predictions as a DataFrame."""
    pd = require("pandas", "train")
    lo, span = _unit_scale(data.tasks)
    metrics: dict[str, Any] = {}
    test_frame = None
    for name, split in data.splits.items():
        pred = predict_songs(module, split, device) * span + lo
        true = split.song_targets
        metrics[name] = {
            t: regression_metrics(pred[:, j].numpy(), true[:, j].numpy())
            for j, t in enumerate(data.tasks)
        }
        if name == "test":
            test_frame = pd.DataFrame(
                {
                    "id": split.song_ids,
                    **{f"pred_{t}": pred[:, j].numpy() for j, t in enumerate(data.tasks)},
                    **{f"true_{t}": true[:, j].numpy() for j, t in enumerate(data.tasks)},
                }
            )
    return metrics, test_frame


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def _atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def load_training_data(config: TrainConfig) -> TrainingData:
    """Join ``config.embeddings`` with ``config.prepared`` for the configured tasks and mode."""
    pd = require("pandas", "train")
    from ..embeddings import EmbeddingStore

    if not config.embeddings or not config.prepared:
        raise ConfigError("train: --embeddings and --prepared are required")
    store = EmbeddingStore(config.embeddings)
    if config.model:
        _check_extraction_matches(store, config.model)
    prepared = pd.read_parquet(config.prepared)
    return TrainingData.from_extraction(store, prepared, config.tasks, config.mode)


def _check_extraction_matches(store, model_dir: str) -> None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    fp = store.fingerprint
    enc = cfg["encoder"]
    if (
        fp["encoder"]["hubert"] != enc["hubert"]
        or fp["encoder"]["layers"] != enc["layers"]
        or fp["frontend"] != cfg["frontend"]
    ):
        raise ConfigError(
            f"the embeddings in {store.dir} were not extracted with {model_dir} (front end or encoder differ)"
        )
    if fp.get("encoder_weights_sha256") not in (None, cfg.get(ENCODER_DIGEST_KEY)):
        raise ConfigError(f"the embeddings in {store.dir} come from other weights than {model_dir}")


def export_checkpoint(
    head: ApexHead,
    config: TrainConfig,
    out: Path,
    *,
    metrics: dict[str, Any] | None = None,
    best_epoch: int | None = None,
) -> Path:
    """Write a trained :class:`~apex_reward.ApexRewardModel` checkpoint: the trained ``head``, the
    front end and encoder of ``config.model`` (its stored encoder weights are copied; a referenced
    encoder stays referenced), and the popularity reference of ``config.prepared``."""
    from apex_reward.checkpoint import read_checkpoint, save_checkpoint

    raw, tensors, _ = read_checkpoint(config.model)
    base = ApexConfig.from_dict(raw)
    cfg = copy.deepcopy(base)
    cfg.head = copy.deepcopy(head.config)
    cfg.untrained = False
    cfg.preference.head = None  # a preference head is fitted for specific heads (apex-reward arena)
    ref_path = (
        Path(config.prepared).parent / "popularity_reference.json" if config.prepared else None
    )
    if ref_path is not None and ref_path.is_file():
        cfg.popularity_reference = from_dict(
            PopularityReferenceConfig, json.loads(ref_path.read_text())
        )
    cfg.training = {
        "config": to_dict(config),
        "best_epoch": best_epoch,
        "test_metrics": (metrics or {}).get("test"),
        "base_checkpoint": str(config.model),
    }
    out_tensors = {k: v for k, v in tensors.items() if k.startswith("encoder.")}
    out_tensors.update(
        {f"head.{k}": v.detach().float().cpu() for k, v in head.state_dict().items()}
    )
    if cfg.encoder.source is None and not any(k.startswith("encoder.") for k in out_tensors):
        raise ConfigError(f"{config.model} neither references nor stores its encoder weights")
    save_checkpoint(out, cfg.to_dict(), out_tensors)
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TrainConfig)


def run_train(args: argparse.Namespace) -> int:
    config = dataclass_from_args(TrainConfig, args)
    result = train(config)
    code = 0
    if result.finished and result.metrics:
        import accelerate.state

        if accelerate.state.PartialState().is_main_process:
            sys.stdout.write(format_metrics(result.metrics["test"]) + "\n")
            if result.checkpoint:
                sys.stderr.write(f"exported {result.checkpoint} (best epoch {result.best_epoch})\n")
    elif not result.finished:
        sys.stderr.write(
            f"stopped after epoch {result.history[-1]['epoch'] if result.history else '-'}; rerun to continue\n"
        )
    return finish_distributed(code)


COMMAND = Command(
    "train",
    "train APEX heads on extracted embeddings",
    add_train_arguments,
    run_train,
)


def format_metrics(test: dict[str, dict[str, float]]) -> str:
    """A Markdown table of per-task test metrics."""
    lines = ["| task | MSE | MAE | Pearson | Spearman |", "|---|---|---|---|---|"]
    for t, m in test.items():
        lines.append(
            f"| {t} | {m['mse']:.4g} | {m['mae']:.4g} | {m['pearson']:.3f} | {m['spearman']:.3f} |"
        )
    return "\n".join(lines)
