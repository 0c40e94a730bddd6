"""``apex-reward arena``: Music Arena preference evaluation and the fitted preference head.

APEX_SPEC §5 and the paper's §4.4 / Table 3, end to end:

1. read battles (:mod:`.data`) and apply the filters, counting what each removed;
2. score every distinct audio content once (:mod:`.cache`; cached across runs);
3. build the 31 pairwise features and cross-validate the five classifiers and the rule baseline
   (:mod:`.evaluation`), writing Table 3 (Markdown + CSV), the rule's feature-subset comparison,
   an ROC plot and out-of-fold predictions;
4. calibration of the logistic model's out-of-fold probabilities (reliability diagram, ECE);
5. optionally per-system offsets (anchor calibration) with their cross-validated effect;
6. with ``--export-head`` / ``--export-system-offsets``, write them into the checkpoint's
   ``config.json`` (:mod:`.head`), verified against scikit-learn.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from apex_reward.checkpoint import split_digests
from apex_reward.dataclass_io import (
    finite_or_none,
    to_dict,
)
from apex_reward.errors import ConfigError

from .evaluation import CLASSIFIERS, DEFAULT_SVM_GRID

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = ["ArenaConfig", "run_arena_evaluation"]


@dataclass
class ArenaConfig:
    """Options of ``apex-reward arena`` (every field is a ``--flag``; ``--config FILE`` too)."""

    model: str = field(
        metadata={"help": "required: APEX checkpoint directory (or hub id) that scores audio"}
    )
    battles: str | None = field(
        default=None,
        metadata={
            "help": "battles: the Music Arena dataset directory (battle_data/**/*.json), or a "
            ".json/.jsonl/.parquet/.csv/.tsv file"
        },
    )
    out: str = field(default="runs/arena", metadata={"help": "output directory"})
    audio_root: str | None = field(
        default=None,
        metadata={
            "help": "directory relative audio paths are resolved against (unset: the dataset "
            "directory, or the battle file's directory and its parents)"
        },
    )
    field_map: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "JSON object mapping canonical fields (battle_id, date, prompt, audio_a, "
            "audio_b, system_a, system_b, preference, is_instrumental) to the keys of your "
            "records; dotted keys reach into nested objects"
        },
    )
    date_from: str | None = field(
        default=None, metadata={"help": "keep battles on or after this ISO date/datetime"}
    )
    date_to: str | None = field(
        default=None, metadata={"help": "keep battles on or before this ISO date/datetime"}
    )
    last_days: float | None = field(
        default=None,
        metadata={"help": "keep battles within this many days of the newest one (paper: ~122)"},
    )
    device: str | None = field(
        default=None, metadata={"help": "torch device (unset: cuda if available, else cpu)"}
    )
    encoder: str | None = field(
        default=None,
        metadata={"help": "override where the MERT weights come from (hub id or directory)"},
    )
    encoder_dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto",
        metadata={
            "help": "encoder precision while scoring: auto = the GPU fast path (fp16) on CUDA, "
            "fp32 on CPU; fp32 = exact (fast path off)"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "30 s segments per encoder call"})
    num_workers: int = field(default=2, metadata={"help": "audio decoding threads"})
    cache: str | None = field(
        default=None,
        metadata={
            "help": "score cache file (SQLite; unset: $APEX_REWARD_CACHE/scores.sqlite or "
            "~/.cache/apex-reward/scores.sqlite)"
        },
    )
    use_cache: bool = field(
        default=True, metadata={"help": "read and write the persistent score cache"}
    )
    folds: int = field(default=10, metadata={"help": "stratified cross-validation folds"})
    seed: int = field(default=0, metadata={"help": "seed of the fold shuffling and classifiers"})
    classifiers: list[str] = field(
        default_factory=lambda: list(CLASSIFIERS),
        metadata={
            "help": f"classifiers to cross-validate, some of {list(CLASSIFIERS)} (logreg, the "
            "preference head's model, always runs)"
        },
    )
    svm_grid: dict[str, list[Any]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_SVM_GRID.items()},
        metadata={"help": "JSON grid of SVC parameters searched by an inner 3-fold CV"},
    )
    n_jobs: int = field(default=1, metadata={"help": "threads of the random forest and XGBoost"})
    ratio_eps: float = field(default=1e-6, metadata={"help": "epsilon of the ratio features"})
    calibration_bins: int = field(
        default=10, metadata={"help": "bins of the reliability diagram / ECE"}
    )
    export_head: bool = field(
        default=False,
        metadata={"help": "write the logistic model fitted on all battles into the checkpoint"},
    )
    export_system_offsets: bool = field(
        default=False,
        metadata={"help": "write per-system Bradley-Terry offsets into the checkpoint"},
    )
    export_to: str | None = field(
        default=None,
        metadata={
            "help": "write the exported checkpoint to this new directory instead of updating "
            "--model in place"
        },
    )
    swap_augment: bool = field(
        default=False,
        metadata={
            "help": "fit the exported head on every battle and its A/B-swapped copy (removes "
            "the arena's position bias: P(A>B) ~ 1-P(B>A))"
        },
    )
    offset_l2: float = field(
        default=1.0, metadata={"help": "L2 strength (Gaussian prior) of the system offsets"}
    )
    synthetic: bool = field(
        default=False,
        metadata={
            "help": "demo: generate a synthetic arena (clips + battles, hidden preference a known "
            "function of --model's scores) in OUT/synthetic_arena and evaluate on it"
        },
    )
    synthetic_battles: int = field(default=200, metadata={"help": "battles of --synthetic"})
    synthetic_songs: int = field(default=40, metadata={"help": "clips of --synthetic"})
    synthetic_seconds: float = field(default=2.0, metadata={"help": "clip length of --synthetic"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr"})

    def __post_init__(self) -> None:
        unknown = [c for c in self.classifiers if c not in CLASSIFIERS]
        if unknown:
            raise ConfigError(
                f"classifiers: unknown {unknown}; expected some of {list(CLASSIFIERS)}"
            )
        if self.folds < 2:
            raise ConfigError(f"folds: need at least 2, got {self.folds}")
        if not self.offset_l2 > 0:
            raise ConfigError(f"offset_l2: must be > 0, got {self.offset_l2}")
        if self.calibration_bins < 2:
            raise ConfigError(f"calibration_bins: need at least 2, got {self.calibration_bins}")
        if not self.battles and not self.synthetic:
            raise ConfigError("battles: give a battles file/directory, or --synthetic for a demo")


def _load_model(cfg: ArenaConfig) -> ApexRewardModel:
    import torch

    from apex_reward.model import ApexRewardModel

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = ApexRewardModel.from_pretrained(cfg.model, device=device, encoder_source=cfg.encoder)
    if model.untrained:
        logger.warning(
            "%s is an UNTRAINED model: its scores (and any head fitted on them) say nothing "
            "about the music",
            cfg.model,
        )
    return model


def _log_loss(y: np.ndarray, z: np.ndarray) -> float:
    # log(1 + exp(-z)) for y=1, log(1 + exp(z)) for y=0, computed stably
    s = np.where(y == 1, -z, z)
    return float(np.mean(np.logaddexp(0.0, s)))


def _offsets_cv(
    base: np.ndarray, data: Any, fold_of: np.ndarray, folds: int, l2: float
) -> dict[str, float]:
    """Cross-validated effect of per-system offsets on log loss and AUC."""
    from sklearn.metrics import roc_auc_score

    from .head import fit_system_offsets, system_offset_logits

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


def run_arena_evaluation(
    cfg: ArenaConfig, *, model: ApexRewardModel | None = None
) -> dict[str, Any]:
    """Run the whole evaluation (see the module docstring); returns the summary (also written to
    ``OUT/summary.json``).

    Args:
        cfg: the options.
        model: an already loaded model (default: load ``cfg.model``).

    Raises:
        ArenaDataError: unreadable battles, or too few A/B battles left for the CV.
        ConfigError, CheckpointError: invalid options or checkpoint.
    """
    from apex_reward.errors import require

    from .cache import ScoreCache, default_cache_path

    for module in ("sklearn", "pandas", "matplotlib"):
        require(module, "train", "apex-reward arena")
    if (cfg.export_head or cfg.export_system_offsets) and cfg.export_to is None:
        if not (Path(cfg.model).expanduser() / "config.json").is_file():
            raise ConfigError(
                f"--export-head/--export-system-offsets update --model in place, but "
                f"{cfg.model!r} is not a local checkpoint directory; pass --export-to DIR"
            )
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = _load_model(cfg)
    model.set_precision(cfg.encoder_dtype)
    summary: dict[str, Any] = {"config": to_dict(cfg), "untrained_model": model.untrained}
    cache = None
    if cfg.use_cache:
        cache = ScoreCache(cfg.cache if cfg.cache else default_cache_path())
    try:
        return _run(cfg, model, cache, out, summary, t_start)
    finally:
        if cache is not None:
            cache.close()


def _run(
    cfg: ArenaConfig,
    model: ApexRewardModel,
    cache: Any,
    out: Path,
    summary: dict[str, Any],
    t_start: float,
) -> dict[str, Any]:
    import torch

    from apex_reward.config import ApexConfig
    from apex_reward.preference import PreferenceHead, pairwise_feature_names

    from .cache import model_fingerprint, score_audio_files
    from .data import ArenaDataError, BattleIssue, load_battles
    from .evaluation import (
        RULE_SUBSETS,
        build_preference_data,
        cross_validate,
        evaluate,
        metric_rows_to_markdown,
        plot_reliability,
        plot_roc,
        reliability,
        rule_scores,
        write_metric_tables,
    )
    from .head import (
        fit_preference_head,
        fit_system_offsets,
        write_preference_to_checkpoint,
    )

    fingerprint = model_fingerprint(model)

    def scorer(paths: list[Path]) -> dict[str, np.ndarray]:
        res, _ = score_audio_files(
            model,
            paths,
            cache=cache,
            fingerprint=fingerprint,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
        )
        bad = [str(p) for p in paths if not res[p].ok]
        if bad:
            raise ArenaDataError(f"synthetic clips failed to score: {bad[:3]}")
        return {k: np.array([res[p].scores[k] for p in paths]) for k in model.score_names}

    # 1. battles ------------------------------------------------------------------------------
    battles_path = cfg.battles
    if cfg.synthetic:
        from .synthetic import write_synthetic_arena

        syn = write_synthetic_arena(
            out / "synthetic_arena",
            n_songs=cfg.synthetic_songs,
            n_battles=cfg.synthetic_battles,
            seconds=cfg.synthetic_seconds,
            seed=cfg.seed,
            score_fn=scorer,
        )
        battles_path = str(syn.battles)
        summary["synthetic"] = {"battles": battles_path, "true_auc": syn.true_auc}
    assert battles_path is not None
    battles, report = load_battles(
        battles_path,
        field_map=cfg.field_map,
        audio_root=cfg.audio_root,
        date_from=cfg.date_from,
        date_to=cfg.date_to,
        last_days=cfg.last_days,
    )

    # 2. scores ---------------------------------------------------------------------------------
    paths = [p for b in battles for p in (b.audio_a, b.audio_b) if p is not None]
    scored, stats = score_audio_files(
        model,
        paths,
        cache=cache,
        fingerprint=fingerprint,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        progress=cfg.progress,
    )
    summary["scoring"] = stats.to_dict()
    usable = []
    for b in battles:
        bad = [(p, scored[p]) for p in (b.audio_a, b.audio_b) if not scored[p].ok]
        if bad:
            reason = "; ".join(f"{p}: {e.error_type}: {e.error}" for p, e in bad)
            report.add_issue(BattleIssue.of(b, "audio unreadable: " + reason))
            report.remove("audio_unreadable")
            continue
        usable.append(b)
    (out / "battles_report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    summary["battles"] = {k: v for k, v in report.to_dict().items() if k != "issues"}
    summary["battles"]["issues"] = len(report.issues)
    if not usable:
        raise ArenaDataError(
            f"no usable A/B battles left in {battles_path} (see {out / 'battles_report.json'})"
        )

    # 3. features and cross-validation -------------------------------------------------------
    names = [n for n in model.score_names]
    sa = {k: [scored[b.audio_a].scores[k] for b in usable] for k in names}
    sb = {k: [scored[b.audio_b].scores[k] for b in usable] for k in names}
    data = build_preference_data(
        sa,
        sb,
        [b.is_instrumental for b in usable],
        [b.label for b in usable],
        names=pairwise_feature_names(names),
        ratio_eps=cfg.ratio_eps,
        battle_ids=[b.battle_id for b in usable],
        systems_a=[b.system_a for b in usable],
        systems_b=[b.system_b for b in usable],
    )
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
    summary["results"] = [r.to_dict() for r in main_rows]
    summary["rule_subsets"] = [r.to_dict() for r in rule_rows]
    summary["cv"] = {
        "folds": cfg.folds,
        "seed": cfg.seed,
        "seconds": cv.seconds,
        "svm_best_params": cv.best_params.get("svm"),
    }

    # 4. calibration of the logistic model -------------------------------------------------------
    prob = cv.probabilities["logreg"]
    rel = reliability(prob, data.y, bins=cfg.calibration_bins)
    plot_reliability(
        rel, out / "calibration.png", title="Logistic preference model: reliability (CV)"
    )
    (out / "calibration.json").write_text(json.dumps(finite_or_none(rel.to_dict()), indent=1))
    summary["calibration"] = {"ece": rel.ece, "brier": rel.brier, "log_loss": rel.log_loss}

    # 5. the head fitted on all battles ----------------------------------------------------------
    lr_row = next(r for r in main_rows if r.key == "logreg")
    provenance = {
        "battles": str(battles_path),
        "num_battles": len(data),
        "num_instrumental": int(data.instrumental.sum()),
        "a_wins": int(data.y.sum()),
        "date_window": report.date_window,
        "cv_folds": cfg.folds,
        "cv_seed": cfg.seed,
        "cv_auc": lr_row.auc,
        "cv_accuracy": lr_row.accuracy,
        "cv_auc_vocal": lr_row.auc_vocal,
        "cv_auc_instrumental": lr_row.auc_instrumental,
        "cv_ece": rel.ece,
        "score_model_fingerprint": stats.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import sklearn

        provenance["sklearn_version"] = sklearn.__version__
    except ImportError:  # pragma: no cover - sklearn is required above
        pass
    head_cfg, pipe = fit_preference_head(
        data, seed=cfg.seed, swap_augment=cfg.swap_augment, fitted_on=finite_or_none(provenance)
    )
    (out / "preference_head.json").write_text(json.dumps(to_dict(head_cfg), indent=1) + "\n")
    head = PreferenceHead(head_cfg)
    ta = {k: torch.from_numpy(v) for k, v in data.scores_a.items()}
    tb = {k: torch.from_numpy(v) for k, v in data.scores_b.items()}
    inst_t = torch.from_numpy(data.instrumental.astype(np.float64))
    with torch.no_grad():
        torch_logit = head(ta, tb, is_instrumental=inst_t).numpy()
        swapped = head(tb, ta, is_instrumental=inst_t).numpy()
    sk_logit = pipe.decision_function(data.X)
    p_ab, p_ba = 1 / (1 + np.exp(-torch_logit)), 1 / (1 + np.exp(-swapped))
    summary["head"] = {
        "features": len(head_cfg.features),
        "swap_augment": cfg.swap_augment,
        "max_abs_diff_torch_vs_sklearn": float(np.max(np.abs(torch_logit - sk_logit))),
        "order_inconsistency": float(np.mean(np.abs(p_ab + p_ba - 1.0))),
        "intercept": head_cfg.intercept,
    }

    # 6. per-system offsets ------------------------------------------------------------------------
    offsets = None
    has_systems = len({s for s in (*data.systems_a, *data.systems_b) if s is not None}) >= 2
    if has_systems:
        if cfg.export_head:
            base = cv.scores["logreg"]  # out-of-fold logits of the head being exported
            base_name = "exported head (out-of-fold logits)"
        elif model.preference_head is not None:
            with torch.no_grad():
                base = model.preference_head(ta, tb, is_instrumental=inst_t).double().numpy()
            base_name = "the checkpoint's preference head"
        else:
            ra = model.reward_from_scores(ta).numpy()
            rb = model.reward_from_scores(tb).numpy()
            base = (ra - rb) / model.config.preference.temperature
            base_name = "Bradley-Terry on the reward"
        offsets = fit_system_offsets(base, data.systems_a, data.systems_b, data.y, l2=cfg.offset_l2)
        counts: dict[str, int] = {}
        for s in (*data.systems_a, *data.systems_b):
            if s is not None:
                counts[s] = counts.get(s, 0) + 1
        summary["system_offsets"] = {
            "base": base_name,
            "l2": cfg.offset_l2,
            "offsets": offsets,
            "battles_per_system": counts,
            "cross_validated": _offsets_cv(base, data, cv.fold_of, cfg.folds, cfg.offset_l2),
        }
        (out / "system_offsets.json").write_text(json.dumps(summary["system_offsets"], indent=1))
    elif cfg.export_system_offsets:
        raise ArenaDataError("--export-system-offsets: the battles name fewer than 2 systems")

    # 7. export -----------------------------------------------------------------------------------
    if cfg.export_head or cfg.export_system_offsets:
        dst = write_preference_to_checkpoint(
            cfg.model,
            head=head_cfg if cfg.export_head else None,
            system_offsets=offsets if cfg.export_system_offsets else None,
            out=cfg.export_to,
        )
        raw, _ = split_digests(json.loads((dst / "config.json").read_text()))
        written = ApexConfig.from_dict(raw)
        check: dict[str, Any] = {"checkpoint": str(dst)}
        if cfg.export_head:
            assert written.preference.head is not None
            with torch.no_grad():
                reloaded = PreferenceHead(written.preference.head)(
                    ta, tb, is_instrumental=inst_t
                ).numpy()
            check["max_abs_diff_vs_sklearn"] = float(np.max(np.abs(reloaded - sk_logit)))
        if cfg.export_system_offsets:
            check["system_offsets"] = len(written.preference.system_offsets)
        summary["export"] = check

    summary["seconds"] = time.perf_counter() - t_start
    summary = finite_or_none(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(
        _report_markdown(
            summary,
            report.to_markdown(),
            metric_rows_to_markdown(main_rows),
            metric_rows_to_markdown(rule_rows),
        )
    )
    return summary


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _report_markdown(summary: dict[str, Any], battles_md: str, main_md: str, rules_md: str) -> str:
    s = summary["scoring"]
    lines = ["# Music Arena preference evaluation", ""]
    if summary.get("untrained_model"):
        lines += ["**The scoring model is UNTRAINED: these numbers say nothing about music.**", ""]
    if "synthetic" in summary:
        lines += [
            f"Synthetic arena (hidden preference known): AUC of the true function on the A/B "
            f"battles = {_num(summary['synthetic']['true_auc'])}.",
            "",
        ]
    lines += ["## Battles", "", battles_md]
    lines += [
        "## Scoring",
        "",
        f"{s['files']} audio files, {s['contents']} distinct contents: {s['cache_hits']} from "
        f"the cache, {s['scored']} scored now, {s['failed']} failed "
        f"(cache: {s['cache_path'] or 'disabled'}; model fingerprint {s['fingerprint'][:12]}).",
        "",
        "## Results (Table 3)",
        "",
        main_md,
        "![ROC](roc.png)",
        "",
        "## Rule baseline by score subset",
        "",
        rules_md,
        "## Calibration of the logistic model",
        "",
        f"Out-of-fold probabilities: ECE {summary['calibration']['ece']:.3f}, Brier "
        f"{summary['calibration']['brier']:.3f}, log loss {summary['calibration']['log_loss']:.3f}.",
        "",
        "![reliability](calibration.png)",
        "",
        "## Preference head (fitted on all battles)",
        "",
        f"{summary['head']['features']} features; torch vs scikit-learn max |Δlogit| "
        f"{summary['head']['max_abs_diff_torch_vs_sklearn']:.2e}; mean |P(A>B) + P(B>A) - 1| "
        f"{summary['head']['order_inconsistency']:.3f} (swap augmentation "
        f"{'on' if summary['head']['swap_augment'] else 'off'}).",
        "",
    ]
    so = summary.get("system_offsets")
    if so:
        cvr = so["cross_validated"]
        lines += [
            "## Per-system offsets",
            "",
            f"Base: {so['base']}; L2 {so['l2']}. Cross-validated log loss "
            f"{cvr['log_loss_without']:.4f} → {cvr['log_loss_with']:.4f}, AUC "
            f"{cvr['auc_without']:.3f} → {cvr['auc_with']:.3f}.",
            "",
            "| system | battles | offset |",
            "|---|---:|---:|",
        ]
        for name, off in sorted(so["offsets"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {so['battles_per_system'].get(name, 0)} | {off:+.3f} |")
        lines.append("")
    if "export" in summary:
        lines += ["## Export", "", f"Written to {summary['export']['checkpoint']}/config.json.", ""]
    return "\n".join(lines)
