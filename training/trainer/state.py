"""The trainer's resumable state without pickle: tensors in safetensors files, the rest JSON.

After an epoch the module, the optimizer state (its tensors flattened to safetensors, the rest
JSON), the scheduler, the early-stopping state and every process's RNG state are saved under
``out/last``; :func:`resume_key` says which options must match to continue a run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apex_reward.dataclass_io import to_dict
from apex_reward.files import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from .config import TrainConfig
    from .run import TrainingRun

__all__ = [
    "TrainState",
    "save_state",
    "flatten_optimizer",
    "unflatten_optimizer",
    "rng_state",
    "set_rng_state",
    "resume_key",
    "save_tensors",
    "atomic_json",
]


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {
            k: (tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resume_key(config: TrainConfig) -> dict[str, Any]:
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
        "device",
        "mixed_precision",
    ):
        d.pop(k, None)
    if d.get("ensemble") == 1:  # a single head: the key of runs saved before ensembles existed
        d.pop("ensemble")
    if d.get("condition") is None:  # unconditioned: the key of runs saved before conditioning
        for k in ("condition", "condition_mode", "condition_dropout"):
            d.pop(k, None)
    # the defaults of options added later: runs saved before them resume
    for k, default in (
        ("sample_views", True),
        ("view_consistency", 10.0),
        ("mask_features", 0.0),
        ("mask_layers", 0),
    ):
        if d.get(k) == default:
            d.pop(k)
    return d


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


@dataclass
class TrainState:
    """Where a run stands: early stopping and the history (saved in ``out/last/state.json``).

    Attributes:
        next_epoch: the epoch to run next (0-based).
        best_val: the best validation loss so far; best_epoch: its epoch (-1: none yet).
        bad_epochs: epochs since the last improvement.
        history: one record per finished epoch.
        finished: early stopping fired, or ``epochs`` were run.
    """

    next_epoch: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False

    def update(self, record: dict[str, Any], config: TrainConfig) -> bool:
        """Add the record of epoch ``next_epoch`` and apply early stopping; True when its
        validation loss improved on the best by more than ``min_delta``."""
        epoch, val_loss = record["epoch"], record["val_loss"]
        self.history.append(record)
        improved = val_loss < self.best_val - config.min_delta
        if improved:
            self.best_val, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
        else:
            self.bad_epochs += 1
        self.finished = self.bad_epochs >= config.patience or epoch + 1 >= config.epochs
        self.next_epoch = epoch + 1
        return improved


def save_state(run: TrainingRun, state: TrainState) -> None:
    """The resumable state after epoch ``state.next_epoch - 1``: every process's RNG first,
    then the main process's state file (the commit point), then older RNG files are removed."""
    accelerator, last = run.accelerator, run.out / "last"
    epoch = state.next_epoch - 1
    last.mkdir(parents=True, exist_ok=True)
    save_tensors(last / f"rng-rank{run.rank}-epoch{epoch}.safetensors", rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        opt_tensors, opt_meta = flatten_optimizer(run.optimizer.state_dict())
        save_tensors(last / "module.safetensors", run.module.state_dict())
        save_tensors(last / "optimizer.safetensors", opt_tensors)
        saved = {
            "epoch": epoch,
            "best_val": state.best_val,
            "bad_epochs": state.bad_epochs,
            "best_epoch": state.best_epoch,
            "history": state.history,
            "scheduler": run.scheduler.state_dict(),
            "optimizer": opt_meta,
            "resume_key": resume_key(run.config),
            "finished": state.finished,
        }
        atomic_json(last / "state.json", saved)
        for old in last.glob("rng-rank*-epoch*.safetensors"):
            if not old.name.endswith(f"-epoch{epoch}.safetensors"):
                old.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
