"""Multi-task training of the APEX heads on extracted embeddings (see ``docs/training.md``).

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
  the criterion favour early epochs. Batches: ``batch_size`` per process; every step the same
  global batch is cut into one contiguous chunk per process, so a 4-process run sees the batches a 1-process run with
  4x the batch size sees. Accelerate handles DDP and mixed precision (fp16 by default on GPU,
  bf16 on request, fp32 on CPU).
* Resumable without pickle: after each epoch the head, the optimizer state (flattened to
  safetensors), the scheduler, the early-stopping state (JSON) and every process's RNG state are
  saved under ``out/last``; rerunning the same command continues from there.
* Output: ``metrics.json`` (per split and task: MSE, MAE, Pearson, Spearman), ``history.json``,
  ``test_predictions.parquet``, and ``model/`` — an :class:`~apex_reward.ApexRewardModel`
  checkpoint (trained head + the extraction model's front end and encoder + popularity reference
  quantiles) that ``from_pretrained`` loads and scores audio with.

Modules: :mod:`.config` (:class:`TrainConfig`), :mod:`.data` (:class:`TrainingData`),
:mod:`.objective` (the trained module, losses, metrics), :mod:`.state` (early stopping and the
pickle-free resumable state), :mod:`.run` (what a run shares and returns), :mod:`.steps` (setup,
resume, epochs, evaluate: one head), :mod:`.ensemble` (several heads), :mod:`.entry`
(:func:`train`: one or several),
:mod:`.export` (the results and the checkpoint) and :mod:`.command` (``apex-reward train``).
"""

from __future__ import annotations

from .command import COMMAND, format_metrics
from .config import TrainConfig
from .data import SplitData, TrainingData, load_training_data
from .entry import train
from .export import export_checkpoint
from .objective import TrainModule, combine_losses, evaluate, predict_songs, regression_metrics
from .run import TrainResult

__all__ = [
    "TrainConfig",
    "SplitData",
    "TrainingData",
    "TrainModule",
    "TrainResult",
    "train",
    "load_training_data",
    "combine_losses",
    "regression_metrics",
    "predict_songs",
    "evaluate",
    "export_checkpoint",
    "format_metrics",
    "COMMAND",
]
