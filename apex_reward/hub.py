"""Publishing checkpoints on the Hugging Face Hub: :func:`push_to_hub` and the model card.

A pushed repo is an ordinary checkpoint directory (``config.json`` + ``model.safetensors``, see
:mod:`apex_reward.checkpoint`) plus a generated ``README.md`` model card, and optionally the
report of ``apex-reward audit`` under ``audit/``. Upload goes through ``huggingface_hub``'s
documented API (``HfApi.create_repo`` + ``HfApi.upload_folder``); download goes through
``snapshot_download`` in :func:`~apex_reward.checkpoint.resolve_checkpoint_dir`, so
``ApexRewardModel.from_pretrained("org/name", revision=..., token=..., cache_dir=...,
local_files_only=...)`` loads what was pushed.

The card is written only from what the checkpoint records: its ``config.json`` (scores, reward,
encoder, head, training provenance and test metrics, calibration, guard) and, when given, an audit
``report.json``. A figure the checkpoint does not hold is shown as "not recorded", never guessed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import CONFIG_NAME, split_digests
from .config import SCORE_RANGES, score_names
from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = ["CARD_NAME", "AUDIT_DIR", "model_card", "push_to_hub"]

CARD_NAME = "README.md"
#: where an audit report is stored in a pushed repo
AUDIT_DIR = "audit"
NOT_RECORDED = "not recorded"
#: files of an ``apex-reward audit`` output directory that are published with the model
_AUDIT_FILES = ("report.json", "report.md", "probes.png", "snr_ladder.png", "attack.png")

_SCORE_MEANING = {
    "streams": "predicted stream count percentile",
    "likes": "predicted like count percentile",
    "coherence": "SongEval coherence",
    "musicality": "SongEval musicality",
    "memorability": "SongEval memorability",
    "clarity": "SongEval clarity",
    "naturalness": "SongEval naturalness",
    "popularity": "mean of streams and likes",
    "songeval": "mean of the five aesthetic scores",
    "overall": "mean of popularity/100 and (songeval-1)/4",
}


def _fmt(value: Any) -> str:
    if value is None:
        return NOT_RECORDED
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _section(title: str, lines: list[str]) -> list[str]:
    return [f"## {title}", "", *lines, ""]


def _metrics_table(metrics: Any) -> list[str]:
    """``{task: {metric: value}}`` -> a markdown table (metric columns in first-seen order)."""
    if not isinstance(metrics, Mapping) or not metrics:
        return [f"Test metrics: {NOT_RECORDED}."]
    columns: list[str] = []
    for row in metrics.values():
        if isinstance(row, Mapping):
            columns += [c for c in row if c not in columns]
    lines = ["| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for task, row in metrics.items():
        row = row if isinstance(row, Mapping) else {}
        lines.append(f"| {task} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return lines


def _pick(mapping: Any, *keys: str) -> Any:
    """``mapping[k0][k1]...`` or None when any level is missing (fields other versions add)."""
    for k in keys:
        if not isinstance(mapping, Mapping) or k not in mapping:
            return None
        mapping = mapping[k]
    return mapping


def _audit_lines(audit: Mapping[str, Any] | None) -> list[str]:
    if not audit:
        return [
            f"Audit: {NOT_RECORDED} (run `apex-reward audit` and push with its output "
            "directory to include the report)."
        ]
    verdict = audit.get("verdict") or {}
    ref = audit.get("reference") or {}
    failing = verdict.get("failing_probes")
    lines = [
        f"- guard policy audited: {_fmt(audit.get('policy'))}",
        f"- reference clips: {_fmt(ref.get('count'))} ({_fmt(ref.get('kind'))}), median "
        f"reward {_fmt(ref.get('median'))}",
        f"- probes counted: {_fmt(verdict.get('counted_probes'))}; failing: "
        + (", ".join(failing) if failing else "none" if failing is not None else NOT_RECORDED),
        "- transforms scoring above the clean clip: "
        + (", ".join(verdict.get("transforms_above_clean") or []) or "none"),
        f"- exit status: {_fmt(verdict.get('exit_status'))}",
    ]
    attack = audit.get("attack")
    if isinstance(attack, Mapping):
        shown = {k: v for k, v in attack.items() if isinstance(v, (int, float, str, bool))}
        if shown:
            lines.append(
                "- gradient attack: " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
            )
    lines += ["", f"The full report is in `{AUDIT_DIR}/report.md` and `{AUDIT_DIR}/report.json`."]
    return lines


def model_card(
    config: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    license: str | None = None,
    audit: Mapping[str, Any] | None = None,
) -> str:
    """The ``README.md`` model card of a checkpoint, from its ``config.json`` dict.

    Args:
        config: the checkpoint's ``config.json`` (``ApexConfig.to_dict()``; digests allowed).
            Fields a version does not have are reported as "not recorded".
        repo_id: the Hub repo, for the usage snippet.
        license: SPDX-style licence id of the weights (e.g. ``"cc-by-nc-4.0"``); None =
            "not recorded" (Hub metadata ``other``).
        audit: an ``apex-reward audit`` ``report.json`` summary, when one was run.

    Returns:
        Markdown with YAML front matter (Hub metadata).
    """
    config, digests = split_digests(dict(config))
    head = config.get("head") or {}
    encoder = config.get("encoder") or {}
    frontend = config.get("frontend") or {}
    training = config.get("training") or {}
    untrained = bool(config.get("untrained", True))
    tasks = head.get("tasks", "full")

    try:
        names = score_names(tasks)
    except KeyError:
        raise ConfigError(f"config.head.tasks: unknown task set {tasks!r}") from None
    front = ["---", "library_name: apex-reward", f"license: {license or 'other'}", "tags:"]
    front += ["- audio", "- music", "- reward-model", "- apex"]
    if encoder.get("source"):
        front.append(f"base_model: {encoder['source']}")
    front.append("---")

    lines = [*front, "", f"# APEX reward model{f': {repo_id}' if repo_id else ''}", ""]
    if untrained:
        lines += [
            "> **UNTRAINED**: the heads of this checkpoint were never trained; its scores show "
            "that the pipeline runs and say nothing about the music.",
            "",
        ]
    lines += [
        "APEX predicts the popularity and five aesthetic qualities of a piece of music from "
        "frozen MERT embeddings and combines them into a differentiable scalar reward for "
        "fine-tuning music generators (RL, DPO). Load it with the `apex-reward` package:",
        "",
        "```python",
        "from apex_reward import ApexRewardModel",
        f'model = ApexRewardModel.from_pretrained("{repo_id or "path/to/checkpoint"}")',
        'results = model.score(["song.wav"])',
        "```",
        "",
    ]
    rows = ["| score | range | meaning |", "|---|---|---|"]
    for s in names:
        lo, hi = SCORE_RANGES[s]
        rows.append(f"| {s} | {lo:g}–{hi:g} | {_SCORE_MEANING.get(s, '')} |")
    weights = config.get("reward_weights") or {}
    reward = " + ".join(f"{w:g} × {k}" for k, w in weights.items()) or NOT_RECORDED
    lines += _section("Scores", [*rows, "", f"Reward: `{reward}`."])

    stored = "stored in this repo" if encoder.get("stored") else "referenced, fetched on load"
    lora = encoder.get("lora")
    lines += _section(
        "Model",
        [
            f"- encoder: {_fmt(encoder.get('preset'))} from {_fmt(encoder.get('source'))} at "
            f"revision {_fmt(encoder.get('revision'))} ({stored}); layers "
            f"{_fmt(encoder.get('layers'))}",
            f"- LoRA adapter: {'r=' + str(lora.get('r')) if isinstance(lora, Mapping) else 'none'}",
            f"- head: {_fmt(head.get('trunk_layers'))}-layer trunk, tasks {tasks}, "
            f"{_fmt(head.get('mode'))} mode",
            f"- front end: {_fmt(frontend.get('sample_rate'))} Hz, "
            f"{_fmt(frontend.get('segment_seconds'))} s segments",
            f"- weights sha256: {_fmt(digests.get('weights_sha256'))}",
            f"- written by apex-reward {_fmt(config.get('apex_reward_version'))}, checkpoint "
            f"format {_fmt(config.get('format_version'))}",
        ],
    )

    tconf = training.get("config") if isinstance(training.get("config"), Mapping) else {}
    data = {
        k: v
        for k, v in (tconf or {}).items()
        if k in ("prepared", "embeddings", "seed", "loss", "epochs", "lr", "batch_size")
        and v not in (None, "")
    }
    prov = [
        f"- base checkpoint: {_fmt(training.get('base_checkpoint'))}",
        f"- best epoch: {_fmt(training.get('best_epoch'))}",
    ]
    prov += [f"- {k}: {_fmt(v)}" for k, v in data.items()] or [f"- training data: {NOT_RECORDED}"]
    ref = config.get("popularity_reference")
    prov.append(
        "- popularity reference: "
        + (f"{_fmt(ref.get('num_songs'))} songs" if isinstance(ref, Mapping) else NOT_RECORDED)
    )
    if untrained:
        prov = [f"Training provenance: {NOT_RECORDED} (untrained heads)."]
    lines += _section("Training data and provenance", prov)
    lines += _section("Metrics (held-out test split)", _metrics_table(training.get("test_metrics")))

    pref = config.get("preference") or {}
    fitted = _pick(pref, "head", "fitted_on")
    calib = [
        f"- Bradley–Terry temperature: {_fmt(pref.get('temperature'))}",
        "- preference head: "
        + (
            "fitted on " + json.dumps(fitted, sort_keys=True)
            if isinstance(fitted, Mapping) and fitted
            else "fitted"
            if pref.get("head")
            else "none"
        ),
        "- per-system offsets: " + (", ".join(sorted(pref.get("system_offsets") or {})) or "none"),
    ]
    for key in ("calibration", "ood"):  # recorded by newer versions; absent in older ones
        value = config.get(key)
        if key == "ood" and isinstance(value, Mapping) and not value.get("fitted_on"):
            value = None  # OOD settings without fitted statistics: nothing was measured
        calib.append(
            f"- {key}: " + (json.dumps(value, sort_keys=True)[:400] if value else NOT_RECORDED)
        )
    guard = config.get("guard") or {}
    calib.append(f"- guard policy: {_fmt(guard.get('policy'))}, floor {_fmt(guard.get('floor'))}")
    lines += _section("Calibration and robustness", calib)
    lines += _section("Audit", _audit_lines(audit))
    lines += _section(
        "Licence",
        [
            f"Weights: {license or NOT_RECORDED}. The encoder weights keep the licence of "
            f"{_fmt(encoder.get('source'))}.",
        ],
    )
    return "\n".join(lines).rstrip() + "\n"


def read_audit(audit: str | Path) -> tuple[dict[str, Any], list[Path]]:
    """An ``apex-reward audit`` output directory (or its ``report.json``) -> (summary, files)."""
    p = Path(audit)
    directory = p.parent if p.is_file() else p
    report = directory / "report.json"
    if not report.is_file():
        raise ConfigError(f"audit: {report} not found (pass an apex-reward audit output directory)")
    try:
        summary = json.loads(report.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"audit: {report} is not valid JSON ({e})") from e
    return summary, [directory / f for f in _AUDIT_FILES if (directory / f).is_file()]


def push_to_hub(
    model: ApexRewardModel,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload APEX reward model",
    create_pr: bool = False,
    include_encoder: bool | None = None,
    license: str | None = None,
    audit: str | Path | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload ``model`` as a checkpoint with its model card to the Hub repo ``repo_id``.

    The repo is created when missing (``exist_ok``); files are committed in one commit with
    ``HfApi.upload_folder``.

    Args:
        model: the model to publish (saved with ``save_pretrained``).
        repo_id: ``"org/name"``.
        token: Hub token (None: the logged-in user's, or ``HF_TOKEN``).
        private: visibility of a newly created repo.
        revision: branch to commit to (default the main branch).
        include_encoder: as in ``save_pretrained`` (default: store it only when it has no
            source to reference).
        license: licence id of the weights, written to the card and its metadata.
        audit: an ``apex-reward audit`` output directory; its report goes to ``audit/`` and its
            verdict into the card.
        endpoint: Hub URL (default ``huggingface_hub``'s, ``HF_ENDPOINT``).

    Returns:
        The URL of the commit.

    Raises:
        ConfigError: a bad ``repo_id`` or audit directory.
        CheckpointError: the Hub refused the upload (the message carries its reason).
    """
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"repo_id: expected 'org/name', got {repo_id!r}")
    summary, audit_files = read_audit(audit) if audit is not None else (None, [])
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="apex-push-") as tmp:
        folder = Path(tmp)
        model.save_pretrained(folder, include_encoder=include_encoder)
        raw = json.loads((folder / CONFIG_NAME).read_text())
        card = model_card(raw, repo_id=repo_id, license=license, audit=summary)
        (folder / CARD_NAME).write_text(card)
        if audit_files:
            (folder / AUDIT_DIR).mkdir()
            for f in audit_files:
                shutil.copyfile(f, folder / AUDIT_DIR / f.name)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )
        except Exception as e:  # HfHubHTTPError and friends: one typed error with the reason
            raise CheckpointError(f"push_to_hub {repo_id}: {type(e).__name__}: {e}".rstrip()) from e
    url = str(getattr(info, "commit_url", info))
    logger.info("pushed %s: %s", repo_id, url)
    return url
