"""The trainer's resumable state without pickle: tensors in safetensors files, the rest JSON.

After an epoch the module, the optimizer state (its tensors flattened to safetensors, the rest
JSON), the scheduler, the early-stopping state and every process's RNG state are saved under
``out/last`` (:func:`save_state`); :func:`resume` restores them, or starts a run afresh, and
:func:`resume_key` says which options must match to continue a run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from apex_reward.dataclass_io import to_dict
from apex_reward.errors import ConfigError
from apex_reward.files import atomic_path, atomic_write_text

from .objective import init_log_vars

if TYPE_CHECKING:
    from .config import TrainConfig
    from .run import TrainingRun

logger = logging.getLogger(__name__)

__all__ = [
    "TrainState",
    "save_state",
    "resume",
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
            # the weight in force (0 without sampled views): runs saved before the option had none
            "view_consistency": run.view_consistency,
            "finished": state.finished,
        }
        atomic_json(last / "state.json", saved)
        for old in last.glob("rng-rank*-epoch*.safetensors"):
            if not old.name.endswith(f"-epoch{epoch}.safetensors"):
                old.unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def resume(run: TrainingRun) -> TrainState:
    """Step 2: restore ``out/last`` (module, optimizer, scheduler, early stopping, this process's
    RNG) when ``config.resume`` and it exists, else start fresh (removing ``out/last`` with
    ``--no-resume``; uncertainty parameters started at the initial losses); then hand the module
    and optimizer to accelerate (``run.model``) and start the tracker.

    Raises:
        ConfigError: ``out/last`` holds a run with a different configuration.
    """
    config, out, accelerator = run.config, run.out, run.accelerator
    last = out / "last"
    state_path = last / "state.json"
    state = TrainState()
    if config.resume and state_path.is_file():
        saved = json.loads(state_path.read_text())
        # the view-consistency weight is compared as it acts (0 without sampled views), below
        key, saved_key = resume_key(config), dict(saved["resume_key"])
        key.pop("view_consistency", None)
        saved_key.pop("view_consistency", None)
        if saved_key != key:
            raise ConfigError(
                f"{out} holds a run with a different configuration; use another --out or --no-resume"
            )
        weight = run.view_consistency
        before = saved.get("view_consistency", 0.0)  # runs saved before the option had none
        if before != weight:
            raise ConfigError(
                f"{out} holds a run trained with view consistency {before:g} and this one would "
                f"continue it with {weight:g}: pass --view-consistency {before:g} to continue "
                "it, or use another --out or --no-resume"
            )
        run.module.load_state_dict(load_file(str(last / "module.safetensors")))
        run.optimizer.load_state_dict(
            unflatten_optimizer(load_file(str(last / "optimizer.safetensors")), saved["optimizer"])
        )
        run.scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(
            next_epoch=saved["epoch"] + 1,
            best_val=saved["best_val"],
            bad_epochs=saved["bad_epochs"],
            best_epoch=saved["best_epoch"],
            history=saved["history"],
        )
        rng_file = last / f"rng-rank{run.rank}-epoch{saved['epoch']}.safetensors"
        if rng_file.is_file():
            set_rng_state(load_file(str(rng_file)))
        else:
            logger.warning(
                "no RNG state for rank %d at epoch %d; dropout noise will differ",
                run.rank,
                saved["epoch"],
            )
        if accelerator.is_main_process:
            logger.info("resuming %s at epoch %d", out, state.next_epoch)
    else:
        if config.resume is False and last.exists() and accelerator.is_main_process:
            shutil.rmtree(last)
        if config.loss == "uncertainty":
            init_log_vars(run.module, run.data.splits["train"], run.lo, run.span, config.seed)
    state.finished = state.bad_epochs >= config.patience or state.next_epoch >= config.epochs

    run.model, run.optimizer = accelerator.prepare(run.module, run.optimizer)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(
            "apex",
            config={
                k: v for k, v in to_dict(config).items() if isinstance(v, (int, float, str, bool))
            },
        )
    accelerator.wait_for_everyone()
    return state
