"""A synthetic Music Arena with a known answer, for tests and the offline demo.

Songs from a few synthetic "systems" get true scores (the seven APEX scores in their ranges, plus
the combined ones); battles pair two songs of the same kind (vocal or instrumental) from
different systems, and the hidden preference follows a known logistic function of the true scores
(:class:`TruePreference`): ``logit P(A > B) = intercept + sum_d w_d (a_d - b_d) / s_d
+ is_instrumental * sum_d v_d (a_d - b_d) / s_d + effect[system_A] - effect[system_B]``.
Labels are drawn from it, so the best achievable AUC is known (:meth:`SyntheticArena.true_auc`).

Two modes:

* :func:`make_synthetic_arena` — features only: score dicts, no audio (fast; classifier tests).
* :func:`write_synthetic_arena` — audio: short procedurally synthesised clips (WAV) and a battles
  file in the released dataset's record format, for the CLI end to end. With a ``model``, the true
  scores are that model's scores of the clips, so an evaluation with the same model can recover
  the hidden function; without one they are drawn at random (unrelated to the audio).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from apex_reward.config import AESTHETIC_TASKS, ALL_TASKS
from apex_reward.heads import combine_scores

from .evaluation import PreferenceData, build_preference_data

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

__all__ = [
    "TruePreference",
    "SyntheticArena",
    "SyntheticArenaFiles",
    "synthetic_song_scores",
    "make_synthetic_arena",
    "synth_clip",
    "write_synthetic_arena",
]

DEFAULT_SYSTEMS: tuple[str, ...] = (
    "synth-alpha",
    "synth-beta",
    "synth-gamma",
    "synth-delta",
    "synth-epsilon",
    "synth-zeta",
)

#: Typical spread of each score, used to put differences on a common footing.
SCORE_SCALES: dict[str, float] = {
    "streams": 20.0,
    "likes": 20.0,
    "popularity": 20.0,
    **{t: 0.5 for t in AESTHETIC_TASKS},
    "songeval": 0.5,
    "overall": 0.1,
}


@dataclass
class TruePreference:
    """The hidden logistic preference function of a synthetic arena.

    Attributes:
        diff_weights: ``w_d`` on ``(a_d - b_d) / scales[d]``.
        instrumental_weights: ``v_d``, added on instrumental battles only.
        scales: per-score scale ``s_d`` (default :data:`SCORE_SCALES`).
        intercept: position bias (logit of A over B for identical songs).
        system_effects: per-system quality not visible in the scores.
    """

    diff_weights: dict[str, float] = field(
        default_factory=lambda: {"likes": 0.3, "streams": 0.1, "songeval": 0.4, "clarity": 0.15}
    )
    instrumental_weights: dict[str, float] = field(
        default_factory=lambda: {"songeval": 0.3, "musicality": 0.2, "likes": -0.2}
    )
    scales: dict[str, float] = field(default_factory=lambda: dict(SCORE_SCALES))
    intercept: float = 0.15
    system_effects: dict[str, float] = field(default_factory=dict)

    def logits(
        self,
        scores_a: Mapping[str, np.ndarray],
        scores_b: Mapping[str, np.ndarray],
        is_instrumental: np.ndarray,
        systems_a: Sequence[str | None] | None = None,
        systems_b: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """The true ``logit P(A > B)`` of each battle. ``[N]`` float64."""
        inst = np.asarray(is_instrumental, dtype=np.float64)
        z = np.full(inst.shape[0], float(self.intercept))
        for d, w in self.diff_weights.items():
            z = z + w * (np.asarray(scores_a[d]) - np.asarray(scores_b[d])) / self.scales[d]
        for d, v in self.instrumental_weights.items():
            z = z + v * inst * (np.asarray(scores_a[d]) - np.asarray(scores_b[d])) / self.scales[d]
        if self.system_effects and systems_a is not None and systems_b is not None:
            z = z + np.array([self.system_effects.get(s, 0.0) for s in systems_a])
            z = z - np.array([self.system_effects.get(s, 0.0) for s in systems_b])
        return z


def synthetic_song_scores(
    n: int, rng: np.random.Generator, quality: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Plausible APEX scores of ``n`` songs: correlated popularity (0–100) and aesthetics (1–5)
    driven by a latent quality (``[n]``, default standard normal), plus the combined scores."""
    q = rng.standard_normal(n) if quality is None else np.asarray(quality, dtype=np.float64)
    pop = 0.5 * q + rng.standard_normal(n)
    pred = {
        "streams": 100.0 / (1.0 + np.exp(-(1.2 * pop - 0.8 + 0.5 * rng.standard_normal(n)))),
        "likes": 100.0 / (1.0 + np.exp(-(1.2 * pop - 0.6 + 0.5 * rng.standard_normal(n)))),
    }
    for t in AESTHETIC_TASKS:
        pred[t] = 1.0 + 4.0 / (1.0 + np.exp(-(0.8 * q + 0.3 + 0.6 * rng.standard_normal(n))))
    return _combined(pred)


def _combined(pred: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = combine_scores(
        {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in pred.items()}
    )
    return {k: v.numpy() for k, v in out.items()}


@dataclass
class SyntheticArena:
    """Battles with known true preference probabilities (features-only mode).

    Attributes:
        scores_a, scores_b: ``{name: [N]}`` the scores a model reports for A and B.
        true_scores_a, true_scores_b: the true scores (equal to the above without noise).
        is_instrumental: ``[N]`` bool. labels: ``[N]`` 1 when A was preferred.
        true_logits: ``[N]`` the hidden function's logits.
        systems_a, systems_b, battle_ids: per battle.
    """

    scores_a: dict[str, np.ndarray]
    scores_b: dict[str, np.ndarray]
    true_scores_a: dict[str, np.ndarray]
    true_scores_b: dict[str, np.ndarray]
    is_instrumental: np.ndarray
    labels: np.ndarray
    true_logits: np.ndarray
    systems_a: list[str]
    systems_b: list[str]
    battle_ids: list[str]
    preference: TruePreference

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def true_auc(self, mask: np.ndarray | None = None) -> float:
        """AUC of the hidden function's logits against the drawn labels (the Bayes ranking)."""
        from sklearn.metrics import roc_auc_score

        m = np.ones(len(self), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        return float(roc_auc_score(self.labels[m], self.true_logits[m]))

    def to_preference_data(self, *, ratio_eps: float = 1e-6) -> PreferenceData:
        """The 31 pairwise features of the battles, from the reported scores."""
        return build_preference_data(
            self.scores_a,
            self.scores_b,
            self.is_instrumental,
            self.labels,
            ratio_eps=ratio_eps,
            battle_ids=self.battle_ids,
            systems_a=self.systems_a,
            systems_b=self.systems_b,
        )


def _pair_songs(
    rng: np.random.Generator, n_battles: int, inst: np.ndarray, systems: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Battle pairs: same kind (vocal/instrumental), different systems where possible."""
    n = len(inst)
    a_idx = np.empty(n_battles, dtype=np.int64)
    b_idx = np.empty(n_battles, dtype=np.int64)
    for k in range(n_battles):
        i = int(rng.integers(n))
        pool = np.flatnonzero((inst == inst[i]) & (systems != systems[i]))
        if len(pool) == 0:
            pool = np.flatnonzero((inst == inst[i]) & (np.arange(n) != i))
        if len(pool) == 0:
            pool = np.flatnonzero(np.arange(n) != i)
        a_idx[k], b_idx[k] = i, int(rng.choice(pool))
    return a_idx, b_idx


def make_synthetic_arena(
    n_battles: int = 2000,
    *,
    n_songs: int | None = None,
    seed: int = 0,
    systems: Sequence[str] = DEFAULT_SYSTEMS,
    system_quality_sd: float = 0.5,
    instrumental_fraction: float = 0.6,
    preference: TruePreference | None = None,
    score_noise: float = 0.0,
) -> SyntheticArena:
    """Features-only synthetic arena.

    Args:
        n_battles: number of battles (all A/B; the labels are drawn from the true function).
        n_songs: size of the song pool (default ``2 * n_battles``).
        seed: RNG seed; the arena is a deterministic function of the arguments.
        systems: generator names; each has a latent quality shift ``N(0, system_quality_sd)``.
        instrumental_fraction: share of instrumental songs.
        preference: the hidden function (default :class:`TruePreference`).
        score_noise: noise on the reported scores, in units of each score's scale (0: the model
            reports the true scores).
    """
    rng = np.random.default_rng(seed)
    pref = preference or TruePreference()
    n = int(n_songs or 2 * n_battles)
    sys_names = np.array(list(systems))
    shift = {s: float(rng.normal(0.0, system_quality_sd)) for s in sys_names}
    song_sys = sys_names[rng.integers(len(sys_names), size=n)]
    inst = rng.random(n) < instrumental_fraction
    true = synthetic_song_scores(
        n, rng, rng.standard_normal(n) + np.array([shift[s] for s in song_sys])
    )
    if score_noise > 0:
        noisy = {
            t: true[t] + score_noise * SCORE_SCALES[t] * rng.standard_normal(n) for t in ALL_TASKS
        }
        noisy = {
            t: np.clip(v, 0.0, 100.0) if t in ("streams", "likes") else np.clip(v, 1.0, 5.0)
            for t, v in noisy.items()
        }
        reported = _combined(noisy)
    else:
        reported = true
    a, b = _pair_songs(rng, n_battles, inst, song_sys)
    ta = {k: v[a] for k, v in true.items()}
    tb = {k: v[b] for k, v in true.items()}
    sa, sb = list(song_sys[a]), list(song_sys[b])
    z = pref.logits(ta, tb, inst[a], sa, sb)
    labels = (rng.random(n_battles) < 1.0 / (1.0 + np.exp(-z))).astype(np.int64)
    return SyntheticArena(
        scores_a={k: v[a] for k, v in reported.items()},
        scores_b={k: v[b] for k, v in reported.items()},
        true_scores_a=ta,
        true_scores_b=tb,
        is_instrumental=inst[a].copy(),
        labels=labels,
        true_logits=z,
        systems_a=[str(s) for s in sa],
        systems_b=[str(s) for s in sb],
        battle_ids=[f"synthetic-{k:05d}" for k in range(n_battles)],
        preference=pref,
    )


# ----------------------------------------------------------------------------------------------
# audio mode


def synth_clip(
    seconds: float,
    sample_rate: int,
    rng: np.random.Generator,
    *,
    brightness: float = 0.5,
    noise: float = 0.05,
    tempo_bpm: float = 110.0,
) -> np.ndarray:
    """A short procedural piece: plucked notes with ``brightness``-weighted harmonics on a beat,
    percussive clicks and background noise. ``[samples]`` float32 in [-1, 1]."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    out = np.zeros(n)
    beat = 60.0 / tempo_bpm
    root = 196.0 * 2 ** (int(rng.integers(0, 12)) / 12)
    scale = (0, 2, 4, 5, 7, 9, 11, 12)
    start_t = 0.0
    while start_t < seconds:
        s = int(start_t * sample_rate)
        e = min(n, s + int(beat * sample_rate))
        tt = t[s:e] - t[s]
        f0 = root * 2 ** (scale[int(rng.integers(len(scale)))] / 12)
        env = np.exp(-4.0 * tt)
        for h in range(1, 6):
            out[s:e] += (brightness ** (h - 1)) / h * 0.3 * env * np.sin(2 * np.pi * f0 * h * tt)
        click = min(e, s + int(0.02 * sample_rate))
        out[s:click] += 0.3 * rng.standard_normal(click - s)
        start_t += beat
    out += noise * rng.standard_normal(n)
    return np.tanh(out).astype(np.float32)


@dataclass
class SyntheticArenaFiles:
    """What :func:`write_synthetic_arena` wrote.

    Attributes:
        root: the dataset directory (audio under ``audio_files/``).
        battles: the battles file (or directory, for ``fmt="json-dir"``).
        audio: the clip paths, in song order.
        truth: ``{battle_id: {"true_logit", "preference"}}`` for every battle.
        true_auc: AUC of the true logits on the A/B battles.
    """

    root: Path
    battles: Path
    audio: list[Path]
    truth: dict[str, dict[str, Any]]
    true_auc: float


def write_synthetic_arena(
    out_dir: str | Path,
    *,
    n_songs: int = 24,
    n_battles: int = 80,
    seconds: float = 1.5,
    sample_rate: int = 24000,
    seed: int = 0,
    model: ApexRewardModel | None = None,
    score_fn: Callable[[list[Path]], dict[str, np.ndarray]] | None = None,
    preference: TruePreference | None = None,
    tie_fraction: float = 0.1,
    both_bad_fraction: float = 0.05,
    duplicate_songs: int = 2,
    systems: Sequence[str] = DEFAULT_SYSTEMS[:4],
    fmt: Literal["jsonl", "json-dir", "csv", "parquet"] = "jsonl",
) -> SyntheticArenaFiles:
    """Write an audio-mode synthetic arena: WAV clips + battles in the released record format.

    Args:
        out_dir: dataset directory to create (``audio_files/synthetic/*.wav``, the battles file,
            ``truth.json``).
        n_songs: clips to synthesise (``duplicate_songs`` of them are byte-identical copies of
            others, under other names, to exercise content deduplication).
        n_battles: battles between songs of the same kind (vocal/instrumental).
        seconds, sample_rate: clip length and rate.
        seed: RNG seed.
        model: if given, the true scores are this model's scores of the clips; else random.
        score_fn: alternative to ``model``: clip paths -> ``{score name: [n_songs]}`` (e.g. a
            cached scorer).
        preference: the hidden function (default :class:`TruePreference`, with each score's
            scale set to its spread over the clips, so that model scores of any spread give a
            clear preference signal).
        tie_fraction, both_bad_fraction: battles whose vote is replaced by TIE / BOTH_BAD.
        systems: generator names.
        fmt: battles file format: ``battles.jsonl``, ``battle_data/synthetic/*.json`` (the
            dataset's layout), ``battles.csv`` or ``battles.parquet``.
    """
    import soundfile as sf

    rng = np.random.default_rng(seed)
    root = Path(out_dir)
    audio_dir = root / "audio_files" / "synthetic"
    audio_dir.mkdir(parents=True, exist_ok=True)
    n_unique = max(2, n_songs - duplicate_songs)
    paths: list[Path] = []
    for i in range(n_songs):
        p = audio_dir / f"song_{i:03d}.wav"
        if i < n_unique:
            clip = synth_clip(
                seconds,
                sample_rate,
                rng,
                brightness=float(rng.uniform(0.2, 0.9)),
                noise=float(rng.uniform(0.0, 0.2)),
                tempo_bpm=float(rng.uniform(80, 150)),
            )
            sf.write(p, clip, sample_rate, subtype="PCM_16")
        else:  # byte-identical copy of an earlier clip
            p.write_bytes(paths[i % n_unique].read_bytes())
        paths.append(p)
    sys_names = np.array(list(systems))
    song_sys = sys_names[np.arange(n_songs) % len(sys_names)]
    inst = (np.arange(n_songs) // len(sys_names)) % 2 == 0
    if score_fn is not None:
        true = {k: np.asarray(v, dtype=np.float64) for k, v in score_fn(paths).items()}
    elif model is not None:
        results = model.score(paths)
        bad = [r for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"synthetic clip failed to score: {bad[0].input}: {bad[0].error}")
        true = {k: np.array([r.scores[k] for r in results]) for k in results[0].scores}
    else:
        true = synthetic_song_scores(n_songs, rng)
    pref = preference or TruePreference(
        scales={k: float(np.std(v)) if np.std(v) > 0 else 1.0 for k, v in true.items()}
    )
    a, b = _pair_songs(rng, n_battles, inst, song_sys)
    ta = {k: v[a] for k, v in true.items()}
    tb = {k: v[b] for k, v in true.items()}
    z = pref.logits(ta, tb, inst[a], list(song_sys[a]), list(song_sys[b]))
    wins_a = rng.random(n_battles) < 1.0 / (1.0 + np.exp(-z))
    u = rng.random(n_battles)
    start = datetime(2025, 8, 1, 12, 0, tzinfo=timezone(timedelta(hours=-4)))
    records, truth = [], {}
    for k in range(n_battles):
        if u[k] < tie_fraction:
            vote = "TIE"
        elif u[k] < tie_fraction + both_bad_fraction:
            vote = "BOTH_BAD"
        else:
            vote = "A" if wins_a[k] else "B"
        bid = f"synthetic-{seed}-{k:05d}"
        records.append(
            {
                "battle_uuid": bid,
                "date": (start + timedelta(hours=k * 24 * 150 / max(1, n_battles))).isoformat(),
                "prompt": f"{'instrumental' if inst[a[k]] else 'vocal'} piece #{k}",
                "is_instrumental": bool(inst[a[k]]),
                "audio_a": paths[a[k]].relative_to(root).as_posix(),
                "system_a": str(song_sys[a[k]]),
                "audio_b": paths[b[k]].relative_to(root).as_posix(),
                "system_b": str(song_sys[b[k]]),
                "preference": vote,
            }
        )
        truth[bid] = {"true_logit": float(z[k]), "preference": vote}
    battles = _write_records(root, records, fmt)
    ab = np.array([r["preference"] in ("A", "B") for r in records])
    y = np.array([r["preference"] == "A" for r in records])
    true_auc = math.nan
    if ab.any() and len(set(y[ab])) == 2:
        from sklearn.metrics import roc_auc_score

        true_auc = float(roc_auc_score(y[ab], z[ab]))
    (root / "truth.json").write_text(
        json.dumps(
            {"true_auc_ab": true_auc, "preference": _pref_dict(pref), "battles": truth}, indent=1
        )
    )
    return SyntheticArenaFiles(root, battles, paths, truth, true_auc)


def _pref_dict(p: TruePreference) -> dict[str, Any]:
    return {
        "diff_weights": p.diff_weights,
        "instrumental_weights": p.instrumental_weights,
        "scales": p.scales,
        "intercept": p.intercept,
        "system_effects": p.system_effects,
    }


def _write_records(root: Path, records: list[dict[str, Any]], fmt: str) -> Path:
    if fmt == "jsonl":
        p = root / "battles.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
        return p
    if fmt == "json-dir":
        d = root / "battle_data" / "synthetic"
        d.mkdir(parents=True, exist_ok=True)
        for r in records:
            (d / f"{r['battle_uuid']}.json").write_text(json.dumps(r))
        return root
    import pandas as pd

    df = pd.DataFrame(records)
    if fmt == "csv":
        p = root / "battles.csv"
        df.to_csv(p, index=False)
        return p
    if fmt == "parquet":
        p = root / "battles.parquet"
        df.to_parquet(p, index=False)
        return p
    raise ValueError(f"unknown battles format {fmt!r}; expected jsonl, json-dir, csv or parquet")
