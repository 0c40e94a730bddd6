"""Music Arena preference evaluation and the fitted preference head (``apex-reward arena``).

* :mod:`.data`: reading battles (the released dataset, JSON/JSONL/Parquet/CSV) and their filters;
* :mod:`.cache`: scoring every distinct audio content once, cached across runs;
* :mod:`.evaluation`: the 31 pairwise features, cross-validated classifiers, rule baseline,
  metrics tables, ROC and reliability plots;
* :mod:`.head`: the fitted preference head, per-system offsets, writing them into a checkpoint;
* :mod:`.synthetic`: a synthetic arena whose hidden preference is known (tests, demo);
* :mod:`.config`: the options (:class:`ArenaConfig`);
* :mod:`.job`: the evaluation as named steps (:func:`run_arena_evaluation`);
* :mod:`.report`: ``report.md``;
* :mod:`.command`: the ``apex-reward arena`` command line.

See ``docs/arena.md``.
"""

from __future__ import annotations

from .config import ArenaConfig
from .job import run_arena_evaluation

__all__ = ["ArenaConfig", "run_arena_evaluation"]
