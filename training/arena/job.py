"""``apex-reward arena`` as named steps: Music Arena preference evaluation and the fitted
preference head.

The paper's out-of-distribution experiment (its Table 3) end to end, then the head it yields
(see ``docs/arena.md``). :func:`run_arena_evaluation` runs the steps in order; each takes typed
inputs and returns a typed result, so a test (or a notebook) can run them one at a time:

1. :func:`open_job` (load): check the options, load the model through
   :func:`apex_reward.loading.load_model`, open the score cache;
2. :func:`load_battle_set` (load): write the synthetic arena when asked, read the battles
   (:mod:`.data`) and apply the filters, counting what each removed;
3. :func:`score_battles` (score): score every distinct audio content once (:mod:`.cache`; cached
   across runs), drop battles with unreadable audio, build the 31 pairwise features;
4. :func:`evaluate_classifiers` (evaluate): cross-validate the five classifiers and the rule
   baseline (:mod:`.evaluation`), write Table 3 (Markdown + CSV), the rule's feature-subset
   comparison, an ROC plot, out-of-fold predictions, and the calibration of the logistic model's
   out-of-fold probabilities (reliability diagram, ECE);
5. :func:`fit_preference` (fit): the logistic head fitted on all battles (:mod:`.head`), checked
   against scikit-learn, and per-system offsets (anchor calibration) with their cross-validated
   effect;
6. :func:`export_preference` (export): with ``--export-head`` / ``--export-system-offsets``,
   write them into the checkpoint's ``config.json`` and check the written head;
7. :func:`write_summary`: ``summary.json`` and ``report.md``.

Outputs in ``--out``: ``report.md`` (everything below in one page), ``results.md``/``.csv``,
``rule_subsets.md``/``.csv``, ``roc.png``, ``calibration.png``, ``calibration.json``,
``predictions.csv`` (one row per battle: scores, features, out-of-fold predictions),
``battles_report.json`` (filters and every bad record), ``system_offsets.json`` (when fitted),
``preference_head.json`` (the fitted head) and ``summary.json`` (all numbers).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from apex_reward.calibration import Reliability
from apex_reward.checkpoint import split_digests
from apex_reward.config import ApexConfig, PreferenceHeadConfig
from apex_reward.dataclass_io import finite_or_none, to_dict
from apex_reward.errors import CheckpointError, ConfigError, require
from apex_reward.loading import load_model
from apex_reward.preference import PreferenceHead, pairwise_feature_names

from ..hub_data import is_hub_uri, resolve_hub_dataset
from .cache import (
    CachedScore,
    ScoreCache,
    ScoringStats,
    default_cache_path,
    model_fingerprint,
    score_audio_files,
)
from .config import ArenaConfig
from .data import ArenaDataError, Battle, BattleIssue, BattleLoadReport, load_battles
from .evaluation import (
    CLASSIFIERS,
    RULE_SUBSETS,
    CVResult,
    PreferenceData,
    build_preference_data,
    cross_validate,
    reliability,
    rule_scores,
)
from .head import (
    fit_preference_head,
    fit_system_offsets,
    system_offset_logits,
    write_preference_to_checkpoint,
)
from .metrics import (
    MetricRow,
    evaluate,
    metric_rows_to_markdown,
    plot_reliability,
    plot_roc,
    write_metric_tables,
)
from .report import report_markdown
from .synthetic import write_synthetic_arena

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = [
    "ArenaConfig",
    "ArenaJob",
    "BattleSet",
    "ScoredBattles",
    "Evaluation",
    "FittedPreference",
    "open_job",
    "load_battle_set",
    "score_battles",
    "evaluate_classifiers",
    "fit_preference",
    "export_preference",
    "write_summary",
    "run_arena_evaluation",
]


def _log_loss(y: np.ndarray, z: np.ndarray) -> float:
    # log(1 + exp(-z)) for y=1, log(1 + exp(z)) for y=0, computed stably
    s = np.where(y == 1, -z, z)
    return float(np.mean(np.logaddexp(0.0, s)))


def _offsets_cv(
    base: np.ndarray, data: PreferenceData, fold_of: np.ndarray, folds: int, l2: float
) -> dict[str, float]:
    """Cross-validated effect of per-system offsets on log loss and AUC."""
    from sklearn.metrics import roc_auc_score

    with_off = np.zeros_like(base)
    for k in range(folds):
        test = fold_of == k
        train = ~test
        off = fit_system_offsets(
            base[train],
            [data.systems_a[i] for i in np.flatnonzero(train)],
            [data.systems_b[i] for i in np.flatnonzero(train)],
            data.y[train],
            l2=l2,
        )
        idx = np.flatnonzero(test)
        with_off[test] = base[test] + system_offset_logits(
            off, [data.systems_a[i] for i in idx], [data.systems_b[i] for i in idx]
        )
    return {
        "log_loss_without": _log_loss(data.y, base),
        "log_loss_with": _log_loss(data.y, with_off),
        "auc_without": float(roc_auc_score(data.y, base)),
        "auc_with": float(roc_auc_score(data.y, with_off)),
    }


# ----------------------------------------------------------------------------------------------
# the steps' results


@dataclass
class ArenaJob:
    """What every step needs: the options, the scoring model, the output directory, the cache.

    Attributes:
        cfg: the options.
        model: the reward model that scores audio (on its device, at ``cfg.model.dtype``).
        out: the output directory (created).
        cache: the persistent score cache, or None with ``--no-use-cache``.
        fingerprint: the model's fingerprint (:func:`.cache.model_fingerprint`).
    """

    cfg: ArenaConfig
    model: ApexRewardModel
    out: Path
    cache: ScoreCache | None
    fingerprint: str

    def score_files(
        self, paths: list[Path], *, progress: bool = False
    ) -> tuple[dict[Path, CachedScore], ScoringStats]:
        """Scores of ``paths`` through the cache (:func:`.cache.score_audio_files`)."""
        return score_audio_files(
            self.model,
            paths,
            cache=self.cache,
            fingerprint=self.fingerprint,
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
            progress=progress,
        )

    def close(self) -> None:
        """Close the score cache."""
        if self.cache is not None:
            self.cache.close()


@dataclass
class BattleSet:
    """The battles kept by the filters (step 2).

    Attributes:
        source: the battles file or directory read.
        battles: the kept A/B battles.
        report: what each filter removed, and every bad record.
        synthetic: ``{"battles", "true_auc"}`` of a ``--synthetic`` arena, else None.
        hub: where a ``hf://`` source came from (repo, commit, mapping), else None.
    """

    source: str
    battles: list[Battle]
    report: BattleLoadReport
    synthetic: dict[str, Any] | None = None
    hub: dict[str, Any] | None = None


@dataclass
class ScoredBattles:
    """The battles whose two clips were scored, as features (step 3).

    Attributes:
        data: features, labels and scores of the usable battles.
        stats: what the scoring did (cache hits, scored, failed).
        battles: the step-2 battle set; its report now counts unreadable audio too.
    """

    data: PreferenceData
    stats: ScoringStats
    battles: BattleSet


@dataclass
class Evaluation:
    """Cross-validated classifiers and the calibration of the logistic model (step 4).

    Attributes:
        cv: out-of-fold scores, predictions and probabilities.
        main_rows: Table 3 (the rule on all scores and every classifier).
        rule_rows: the rule baseline by score subset.
        calibration: reliability of the logistic model's out-of-fold probabilities.
    """

    cv: CVResult
    main_rows: list[MetricRow]
    rule_rows: list[MetricRow]
    calibration: Reliability

    @property
    def logreg(self) -> MetricRow:
        """The logistic model's row (the model of the preference head)."""
        return next(r for r in self.main_rows if r.key == "logreg")


@dataclass
class FittedPreference:
    """The preference head fitted on all battles, and the per-system offsets (step 5).

    Attributes:
        head: the head's config (features, coefficients, scaler, provenance).
        sklearn_logits: ``[N]`` scikit-learn's decision function on the battles (the reference
            the torch head and the exported head are checked against).
        head_summary: features, swap augmentation, torch vs scikit-learn difference, order
            inconsistency, intercept.
        offsets: ``{system: offset}``, or None when the battles name fewer than 2 systems.
        offsets_summary: base, L2, offsets, battles per system, cross-validated effect.
    """

    head: PreferenceHeadConfig
    sklearn_logits: np.ndarray
    head_summary: dict[str, Any]
    offsets: dict[str, float] | None = None
    offsets_summary: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------
# the steps


def open_job(cfg: ArenaConfig, *, model: ApexRewardModel | None = None) -> ArenaJob:
    """Step 1: check the options, create ``cfg.out``, load the model and open the score cache.

    Args:
        cfg: the options.
        model: an already loaded model (default: :func:`apex_reward.loading.load_model` of
            ``cfg.model``); either way it runs at ``cfg.model.dtype``.

    Raises:
        MissingDependencyError: the ``train`` extra is not installed.
        ConfigError, CheckpointError: invalid options or checkpoint.
    """
    for module in ("sklearn", "pandas", "matplotlib"):
        require(module, "train", "apex-reward arena")
    checkpoint = cfg.model.require_model()
    if (cfg.export_head or cfg.export_system_offsets) and cfg.export_to is None:
        if not (Path(checkpoint).expanduser() / "config.json").is_file():
            raise ConfigError(
                f"--export-head/--export-system-offsets update --model in place, but "
                f"{checkpoint!r} is not a local checkpoint directory; pass --export-to DIR"
            )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = load_model(cfg.model)
    else:
        model.set_precision(cfg.model.dtype)
    cache = ScoreCache(cfg.cache if cfg.cache else default_cache_path()) if cfg.use_cache else None
    return ArenaJob(cfg, model, out, cache, model_fingerprint(model))


def load_battle_set(job: ArenaJob) -> BattleSet:
    """Step 2: write the ``--synthetic`` arena when asked, then read and filter the battles.

    Raises:
        ArenaDataError: unreadable battles, or synthetic clips that failed to score.
    """
    cfg = job.cfg
    source, synthetic = cfg.battles, None
    if cfg.synthetic:
        syn = write_synthetic_arena(
            job.out / "synthetic_arena",
            n_songs=cfg.synthetic_songs,
            n_battles=cfg.synthetic_battles,
            seconds=cfg.synthetic_seconds,
            seed=cfg.seed,
            score_fn=lambda paths: _synthetic_scores(job, paths),
        )
        source = str(syn.battles)
        synthetic = {"battles": source, "true_auc": syn.true_auc}
    if source is None:  # ArenaConfig asks for --battles or --synthetic
        raise ConfigError("battles: give a battles file/directory, or --synthetic for a demo")
    hub = None
    if is_hub_uri(source):  # the released dataset on the Hub: its files, pinned to a commit
        hub = resolve_hub_dataset(source)
        source = str(hub.path)
    battles, report = load_battles(
        source,
        field_map=cfg.field_map,
        audio_root=cfg.audio_root,
        date_from=cfg.date_from,
        date_to=cfg.date_to,
        last_days=cfg.last_days,
    )
    return BattleSet(source, battles, report, synthetic, hub.provenance() if hub else None)


def _synthetic_scores(job: ArenaJob, paths: list[Path]) -> dict[str, np.ndarray]:
    """The scores of the synthetic clips, ``{score name: [len(paths)]}`` (every clip must score)."""
    res, _ = job.score_files(paths)
    bad = [str(p) for p in paths if not res[p].ok]
    if bad:
        raise ArenaDataError(f"synthetic clips failed to score: {bad[:3]}")
    return {k: np.array([res[p].scores[k] for p in paths]) for k in job.model.score_names}


def score_battles(job: ArenaJob, battle_set: BattleSet) -> ScoredBattles:
    """Step 3: score every distinct clip once, drop battles with unreadable audio (recorded in
    the report, written to ``battles_report.json``), and build the pairwise features.

    Raises:
        ArenaDataError: no usable A/B battle left.
    """
    cfg, report = job.cfg, battle_set.report
    paths = [p for b in battle_set.battles for p in (b.audio_a, b.audio_b) if p is not None]
    scored, stats = job.score_files(paths, progress=cfg.progress)
    usable = []
    for b in battle_set.battles:
        bad = [(p, scored[p]) for p in (b.audio_a, b.audio_b) if not scored[p].ok]
        if bad:
            reason = "; ".join(f"{p}: {e.error_type}: {e.error}" for p, e in bad)
            report.add_issue(BattleIssue.of(b, "audio unreadable: " + reason))
            report.remove("audio_unreadable")
            continue
        usable.append(b)
    report_path = job.out / "battles_report.json"
    report_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if not usable:
        raise ArenaDataError(
            f"no usable A/B battles left in {battle_set.source} (see {report_path})"
        )
    names = list(job.model.score_names)
    data = build_preference_data(
        {k: [scored[b.audio_a].scores[k] for b in usable] for k in names},
        {k: [scored[b.audio_b].scores[k] for b in usable] for k in names},
        [b.is_instrumental for b in usable],
        [b.label for b in usable],
        names=pairwise_feature_names(names),
        ratio_eps=cfg.ratio_eps,
        battle_ids=[b.battle_id for b in usable],
        systems_a=[b.system_a for b in usable],
        systems_b=[b.system_b for b in usable],
    )
    return ScoredBattles(data, stats, battle_set)


def evaluate_classifiers(job: ArenaJob, scored: ScoredBattles) -> Evaluation:
    """Step 4: cross-validate the classifiers and the rule baseline; write ``results.md``/``.csv``,
    ``rule_subsets.md``/``.csv``, ``roc.png``, ``predictions.csv``, and the logistic model's
    calibration (``calibration.png``, ``calibration.json``).

    Raises:
        ArenaDataError: too few battles of an outcome for the folds.
    """
    cfg, out, data = job.cfg, job.out, scored.data
    classifiers = list(dict.fromkeys(["logreg", *cfg.classifiers]))
    cv = cross_validate(
        data,
        [c for c in CLASSIFIERS if c in classifiers],
        folds=cfg.folds,
        seed=cfg.seed,
        n_jobs=cfg.n_jobs,
        svm_grid=cfg.svm_grid,
        progress=cfg.progress,
    )
    main_rows, rule_rows = evaluate(data, cv)
    write_metric_tables(
        main_rows,
        out / "results",
        title=f"Preference prediction ({cfg.folds}-fold stratified CV, seed {cfg.seed})",
    )
    write_metric_tables(rule_rows, out / "rule_subsets", title="Rule baseline by score subset")
    curves = {r.method: cv.scores[r.key] for r in main_rows if r.key in cv.scores}
    for r in main_rows:
        if r.key.startswith("rule_"):
            curves[r.method] = rule_scores(data, RULE_SUBSETS[r.key.removeprefix("rule_")])
    plot_roc(data.y, curves, out / "roc.png", title="Preference prediction: out-of-fold ROC")
    frame = data.to_frame()
    frame.insert(4, "fold", cv.fold_of)
    for name, s in cv.scores.items():
        frame[f"oof_score_{name}"] = s
    for name, s in cv.probabilities.items():
        frame[f"oof_prob_{name}"] = s
    frame.to_csv(out / "predictions.csv", index=False)
    rel = reliability(cv.probabilities["logreg"], data.y, bins=cfg.calibration_bins)
    plot_reliability(
        rel, out / "calibration.png", title="Logistic preference model: reliability (CV)"
    )
    (out / "calibration.json").write_text(json.dumps(finite_or_none(rel.to_dict()), indent=1))
    return Evaluation(cv, main_rows, rule_rows, rel)


def fit_preference(
    job: ArenaJob, scored: ScoredBattles, evaluation: Evaluation
) -> FittedPreference:
    """Step 5: fit the logistic head on all battles (``preference_head.json``), check it against
    scikit-learn in both battle orders, and fit per-system offsets with their cross-validated
    effect (``system_offsets.json``) when the battles name at least 2 systems.

    Raises:
        ArenaDataError: ``--export-system-offsets`` with fewer than 2 systems.
    """
    cfg, data = job.cfg, scored.data
    head_cfg, pipe = fit_preference_head(
        data,
        seed=cfg.seed,
        swap_augment=cfg.swap_augment,
        fitted_on=finite_or_none(_provenance(job, scored, evaluation)),
    )
    (job.out / "preference_head.json").write_text(json.dumps(to_dict(head_cfg), indent=1) + "\n")
    ta, tb, inst = _score_tensors(data)
    head = PreferenceHead(head_cfg)
    with torch.no_grad():
        torch_logit = head(ta, tb, is_instrumental=inst).numpy()
        swapped = head(tb, ta, is_instrumental=inst).numpy()
    sk_logit = pipe.decision_function(data.X)
    p_ab, p_ba = 1 / (1 + np.exp(-torch_logit)), 1 / (1 + np.exp(-swapped))
    fitted = FittedPreference(
        head_cfg,
        sk_logit,
        {
            "features": len(head_cfg.features),
            "swap_augment": cfg.swap_augment,
            "max_abs_diff_torch_vs_sklearn": float(np.max(np.abs(torch_logit - sk_logit))),
            "order_inconsistency": float(np.mean(np.abs(p_ab + p_ba - 1.0))),
            "intercept": head_cfg.intercept,
        },
    )
    if len({s for s in (*data.systems_a, *data.systems_b) if s is not None}) < 2:
        if cfg.export_system_offsets:
            raise ArenaDataError("--export-system-offsets: the battles name fewer than 2 systems")
        return fitted
    base, base_name = _offset_base(job, data, evaluation)
    fitted.offsets = fit_system_offsets(
        base, data.systems_a, data.systems_b, data.y, l2=cfg.offset_l2
    )
    counts: dict[str, int] = {}
    for s in (*data.systems_a, *data.systems_b):
        if s is not None:
            counts[s] = counts.get(s, 0) + 1
    fitted.offsets_summary = {
        "base": base_name,
        "l2": cfg.offset_l2,
        "offsets": fitted.offsets,
        "battles_per_system": counts,
        "cross_validated": _offsets_cv(base, data, evaluation.cv.fold_of, cfg.folds, cfg.offset_l2),
    }
    (job.out / "system_offsets.json").write_text(json.dumps(fitted.offsets_summary, indent=1))
    return fitted


def _provenance(job: ArenaJob, scored: ScoredBattles, evaluation: Evaluation) -> dict[str, Any]:
    """What the exported head was fitted on (stored as its ``fitted_on``)."""
    cfg, data, lr_row = job.cfg, scored.data, evaluation.logreg
    return {
        "battles": str(scored.battles.source),
        "num_battles": len(data),
        "num_instrumental": int(data.instrumental.sum()),
        "a_wins": int(data.y.sum()),
        "date_window": scored.battles.report.date_window,
        "cv_folds": cfg.folds,
        "cv_seed": cfg.seed,
        "cv_auc": lr_row.auc,
        "cv_accuracy": lr_row.accuracy,
        "cv_auc_vocal": lr_row.auc_vocal,
        "cv_auc_instrumental": lr_row.auc_instrumental,
        "cv_ece": evaluation.calibration.ece,
        "score_model_fingerprint": scored.stats.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sklearn_version": require("sklearn", "train", "apex-reward arena").__version__,
    }


def _score_tensors(
    data: PreferenceData,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """The battles' scores of A and B and the instrumental flags as torch tensors."""
    ta = {k: torch.from_numpy(v) for k, v in data.scores_a.items()}
    tb = {k: torch.from_numpy(v) for k, v in data.scores_b.items()}
    return ta, tb, torch.from_numpy(data.instrumental.astype(np.float64))


def _offset_base(
    job: ArenaJob, data: PreferenceData, evaluation: Evaluation
) -> tuple[np.ndarray, str]:
    """The logits the system offsets are fitted on top of, and their description."""
    model = job.model
    if job.cfg.export_head:
        return evaluation.cv.scores["logreg"], "exported head (out-of-fold logits)"
    ta, tb, inst = _score_tensors(data)
    if model.preference_head is not None:
        with torch.no_grad():
            base = model.preference_head(ta, tb, is_instrumental=inst).double().numpy()
        return base, "the checkpoint's preference head"
    ra = model.reward_from_scores(ta).numpy()
    rb = model.reward_from_scores(tb).numpy()
    return (ra - rb) / model.config.preference.temperature, "Bradley-Terry on the reward"


def export_preference(
    job: ArenaJob, scored: ScoredBattles, fitted: FittedPreference
) -> dict[str, Any] | None:
    """Step 6: with ``--export-head`` / ``--export-system-offsets``, write the head and/or the
    offsets into the checkpoint (in place, or a copy in ``--export-to``), read the written
    ``config.json`` back and check its head against scikit-learn.

    Returns:
        ``{"checkpoint", "max_abs_diff_vs_sklearn"?, "system_offsets"?}``, or None when nothing
        was to be exported.
    """
    cfg = job.cfg
    if not (cfg.export_head or cfg.export_system_offsets):
        return None
    dst = write_preference_to_checkpoint(
        cfg.model.require_model(),
        head=fitted.head if cfg.export_head else None,
        system_offsets=fitted.offsets if cfg.export_system_offsets else None,
        out=cfg.export_to,
    )
    raw, _ = split_digests(json.loads((dst / "config.json").read_text()))
    written = ApexConfig.from_dict(raw)
    check: dict[str, Any] = {"checkpoint": str(dst)}
    if cfg.export_head:
        if written.preference.head is None:
            raise CheckpointError(f"{dst}/config.json: the exported preference head is missing")
        ta, tb, inst = _score_tensors(scored.data)
        with torch.no_grad():
            reloaded = PreferenceHead(written.preference.head)(ta, tb, is_instrumental=inst)
        check["max_abs_diff_vs_sklearn"] = float(
            np.max(np.abs(reloaded.numpy() - fitted.sklearn_logits))
        )
    if cfg.export_system_offsets:
        check["system_offsets"] = len(written.preference.system_offsets)
    return check


def write_summary(
    job: ArenaJob,
    scored: ScoredBattles,
    evaluation: Evaluation,
    fitted: FittedPreference,
    export: dict[str, Any] | None,
    *,
    seconds: float,
) -> dict[str, Any]:
    """Step 7: every number of the run as ``summary.json`` (returned) and ``report.md``."""
    cfg, cv = job.cfg, evaluation.cv
    report = scored.battles.report
    summary: dict[str, Any] = {"config": to_dict(cfg), "untrained_model": job.model.untrained}
    if scored.battles.synthetic is not None:
        summary["synthetic"] = scored.battles.synthetic
    if scored.battles.hub is not None:
        summary["hub_source"] = scored.battles.hub
    summary["scoring"] = scored.stats.to_dict()
    summary["battles"] = {k: v for k, v in report.to_dict().items() if k != "issues"}
    summary["battles"]["issues"] = len(report.issues)
    summary["results"] = [r.to_dict() for r in evaluation.main_rows]
    summary["rule_subsets"] = [r.to_dict() for r in evaluation.rule_rows]
    summary["cv"] = {
        "folds": cfg.folds,
        "seed": cfg.seed,
        "seconds": cv.seconds,
        "svm_best_params": cv.best_params.get("svm"),
    }
    rel = evaluation.calibration
    summary["calibration"] = {"ece": rel.ece, "brier": rel.brier, "log_loss": rel.log_loss}
    summary["head"] = fitted.head_summary
    if fitted.offsets_summary is not None:
        summary["system_offsets"] = fitted.offsets_summary
    if export is not None:
        summary["export"] = export
    summary["seconds"] = seconds
    summary = finite_or_none(summary)
    (job.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (job.out / "report.md").write_text(
        report_markdown(
            summary,
            report.to_markdown(),
            metric_rows_to_markdown(evaluation.main_rows),
            metric_rows_to_markdown(evaluation.rule_rows),
        )
    )
    return summary


def run_arena_evaluation(
    cfg: ArenaConfig, *, model: ApexRewardModel | None = None
) -> dict[str, Any]:
    """Run every step (see the module docstring); returns the summary (also written to
    ``OUT/summary.json``).

    Args:
        cfg: the options.
        model: an already loaded model (default: load ``cfg.model``).

    Raises:
        ArenaDataError: unreadable battles, or too few A/B battles left for the CV.
        ConfigError, CheckpointError: invalid options or checkpoint.
    """
    t_start = time.perf_counter()
    job = open_job(cfg, model=model)
    try:
        battle_set = load_battle_set(job)
        scored = score_battles(job, battle_set)
        evaluation = evaluate_classifiers(job, scored)
        fitted = fit_preference(job, scored, evaluation)
        export = export_preference(job, scored, fitted)
        return write_summary(
            job, scored, evaluation, fitted, export, seconds=time.perf_counter() - t_start
        )
    finally:
        job.close()
