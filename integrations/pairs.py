"""Preference pairs from scored candidates, in TRL's standard preference format.

Given prompts with N scored candidates each, :func:`select_pairs` picks (chosen, rejected) pairs
by one of three strategies:

* ``best_vs_worst``: one pair per prompt, the highest- against the lowest-scoring candidate;
* ``all_pairs``: every pair of candidates whose scores differ by at least ``min_margin``;
* ``top_k``: each of the ``k`` best candidates against each of the ``k`` worst (``k`` is capped
  at half the valid candidates so the two sets never overlap).

Candidates whose score is missing (decoding or scoring failed) or non-finite are left out; pairs
whose scores are equal within ``tie_tolerance`` (ties) or differ by less than ``min_margin`` are
not emitted. All of these are counted in :class:`PairStats`. Every emitted pair satisfies
``score_chosen >= score_rejected + min_margin`` and ``score_chosen > score_rejected +
tie_tolerance``.

:func:`build_preference_pairs` returns a ``datasets.Dataset`` with the columns ``prompt``,
``chosen``, ``rejected``, ``score_chosen``, ``score_rejected`` and ``margin`` — what TRL's
``DPOTrainer`` and ``RewardTrainer`` (which also reads ``margin``) accept. Those trainers tokenise
``prompt``/``chosen``/``rejected`` themselves and read only text or conversational messages, so
token-id candidates (and prompts) are decoded to text with the ``tokenizer=`` given (the
policy's own tokenizer), and refused with a :class:`~apex_reward.errors.ConfigError` without one.
Pairs of bare audio (paths or arrays: what a trainer of text models would take for text and
train on nothing) are refused unless ``allow_audio_paths=True`` says the caller trains on audio.

The ``apex-reward pairs`` command does the whole job from a JSONL file of prompts and candidate
audio files (format in
:func:`apex_reward.integrations.pairs_job.read_candidates`); it needs each candidate's ``completion`` (or
``--allow-audio-paths``), and ``--tokenizer`` for completions given as token ids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from apex_reward.errors import ConfigError, require

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from apex_reward.model import ApexRewardModel

    from .trl_rewards import ApexRewardFunction

logger = logging.getLogger(__name__)

__all__ = [
    "PairStats",
    "select_pairs",
    "build_preference_pairs",
    "score_and_build_pairs",
]

Strategy = Literal["best_vs_worst", "all_pairs", "top_k"]
STRATEGIES: tuple[str, ...] = ("best_vs_worst", "all_pairs", "top_k")
PAIR_COLUMNS: tuple[str, ...] = (
    "prompt",
    "chosen",
    "rejected",
    "score_chosen",
    "score_rejected",
    "margin",
)


@dataclass
class PairStats:
    """What the builder kept and left out.

    Attributes:
        prompts: prompts seen.
        prompts_with_pairs: prompts that gave at least one pair.
        prompts_too_few_valid: prompts with fewer than two scored candidates (no pair possible).
        candidates: candidates seen.
        failed_candidates: candidates without a usable score (failed or non-finite).
        pairs: pairs emitted.
        ties: candidate pairs left out because their scores were equal (within the tolerance).
        below_margin: candidate pairs left out because their scores differed by less than
            ``min_margin`` (ties not included).
        capped: pairs left out by ``max_pairs_per_prompt``.
        mean_margin: mean ``score_chosen - score_rejected`` of the emitted pairs (NaN if none).
    """

    prompts: int = 0
    prompts_with_pairs: int = 0
    prompts_too_few_valid: int = 0
    candidates: int = 0
    failed_candidates: int = 0
    pairs: int = 0
    ties: int = 0
    below_margin: int = 0
    capped: int = 0
    mean_margin: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_margin"] = None if math.isnan(self.mean_margin) else self.mean_margin
        return d


def _usable(v: Any) -> bool:
    return (
        v is not None
        and not isinstance(v, bool)
        and isinstance(v, (int, float))
        and math.isfinite(v)
    )


def select_pairs(
    values: Sequence[float | None],
    *,
    strategy: Strategy = "best_vs_worst",
    min_margin: float = 0.0,
    top_k: int = 1,
    tie_tolerance: float = 1e-6,
    max_pairs_per_prompt: int | None = None,
    stats: PairStats | None = None,
) -> list[tuple[int, int]]:
    """Pairs ``(chosen, rejected)`` of candidate indices for one prompt.

    Args:
        values: one score per candidate; ``None``/NaN for candidates that failed.
        strategy: ``"best_vs_worst"``, ``"all_pairs"`` or ``"top_k"`` (module docstring).
        min_margin: keep a pair only if ``v[chosen] - v[rejected] >= min_margin``.
        top_k: ``k`` for ``"top_k"``.
        tie_tolerance: scores within this distance are a tie; ties are never paired.
        max_pairs_per_prompt: keep at most this many pairs, those with the largest margins.
        stats: counters to update (failed candidates, ties, pairs below the margin, ...).

    Returns:
        Index pairs, largest margin first (for ``best_vs_worst``: at most one pair).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: {strategy!r} is not one of {list(STRATEGIES)}")
    if not math.isfinite(min_margin) or min_margin < 0:
        raise ConfigError(f"min_margin must be a finite number >= 0, got {min_margin!r}")
    if not math.isfinite(tie_tolerance) or tie_tolerance < 0:
        raise ConfigError(f"tie_tolerance must be a finite number >= 0, got {tie_tolerance!r}")
    if strategy == "top_k" and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ConfigError(f"max_pairs_per_prompt must be >= 1, got {max_pairs_per_prompt}")
    st = stats if stats is not None else PairStats()
    st.prompts += 1
    st.candidates += len(values)
    valid = [i for i, v in enumerate(values) if _usable(v)]
    st.failed_candidates += len(values) - len(valid)
    if len(valid) < 2:
        st.prompts_too_few_valid += 1
        return []
    v = {i: float(values[i]) for i in valid}  # type: ignore[arg-type]
    # highest score first; equal scores keep their input order
    order = sorted(valid, key=lambda i: (-v[i], i))
    if strategy == "best_vs_worst":
        candidates = [(order[0], order[-1])]
    elif strategy == "top_k":
        k = min(top_k, len(order) // 2)
        candidates = [(a, b) for a in order[:k] for b in order[-k:]]
    else:
        candidates = [
            (order[x], order[y]) for x in range(len(order)) for y in range(x + 1, len(order))
        ]
    pairs = []
    for a, b in candidates:
        d = v[a] - v[b]
        if d <= tie_tolerance:
            st.ties += 1
        elif d < min_margin:
            st.below_margin += 1
        else:
            pairs.append((a, b))
    pairs.sort(key=lambda p: -(v[p[0]] - v[p[1]]))
    if max_pairs_per_prompt is not None and len(pairs) > max_pairs_per_prompt:
        st.capped += len(pairs) - max_pairs_per_prompt
        pairs = pairs[:max_pairs_per_prompt]
    if pairs:
        st.prompts_with_pairs += 1
    return pairs


def pair_records(
    prompts: Sequence[Any],
    candidates: Sequence[Sequence[Any]],
    values: Sequence[Sequence[float | None]],
    *,
    strategy: Strategy,
    min_margin: float,
    top_k: int,
    tie_tolerance: float,
    max_pairs_per_prompt: int | None,
    margin_scale: float,
    extra: Sequence[dict[str, Sequence[Any]]] | None = None,
) -> tuple[list[dict[str, Any]], PairStats]:
    if not (len(prompts) == len(candidates) == len(values)):
        raise ConfigError(
            f"got {len(prompts)} prompts, {len(candidates)} candidate lists and {len(values)} "
            "value lists; expected one of each per prompt"
        )
    if not math.isfinite(margin_scale) or margin_scale <= 0:
        raise ConfigError(f"margin_scale must be a finite number > 0, got {margin_scale!r}")
    stats = PairStats()
    records: list[dict[str, Any]] = []
    margins: list[float] = []
    for p, (prompt, cands, vals) in enumerate(zip(prompts, candidates, values)):
        if len(cands) != len(vals):
            raise ConfigError(
                f"prompt {p}: {len(cands)} candidates but {len(vals)} values; expected one each"
            )
        for a, b in select_pairs(
            vals,
            strategy=strategy,
            min_margin=min_margin,
            top_k=top_k,
            tie_tolerance=tie_tolerance,
            max_pairs_per_prompt=max_pairs_per_prompt,
            stats=stats,
        ):
            sa, sb = float(vals[a]), float(vals[b])  # type: ignore[arg-type]
            rec = {
                "prompt": prompt,
                "chosen": cands[a],
                "rejected": cands[b],
                "score_chosen": sa,
                "score_rejected": sb,
                "margin": margin_scale * (sa - sb),
            }
            if extra is not None:
                for col, per_candidate in extra[p].items():
                    rec[f"chosen_{col}"] = per_candidate[a]
                    rec[f"rejected_{col}"] = per_candidate[b]
            records.append(rec)
            margins.append(sa - sb)
    stats.pairs = len(records)
    if margins:
        stats.mean_margin = float(sum(margins) / len(margins))
    return records, stats


def is_token_ids(value: Any) -> bool:
    """A non-empty list/tuple of integers (not bools): token ids."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.size > 0 and np.issubdtype(value.dtype, np.integer)
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in value)
    )


def decode_token_ids(
    records: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase | None,
    remedy: str = "pass tokenizer= (the policy's tokenizer) to decode them to text",
) -> None:
    """Replace token-id ``prompt``/``chosen``/``rejected`` values by their text, in place.

    TRL's ``DPOTrainer``/``RewardTrainer`` tokenise these columns themselves (``prompt +
    chosen``, an EOS appended to text) and fail on lists of ids; special tokens (an EOS the
    generator emitted, padding) are dropped, since the trainers add their own.

    Raises:
        ConfigError: token ids and no ``tokenizer`` (the message ends with ``remedy``); a
            column mixing token ids with other values.
    """
    columns = [
        c for c in ("prompt", "chosen", "rejected") if any(is_token_ids(r[c]) for r in records)
    ]
    if not columns:
        return
    for c in columns:
        if not all(is_token_ids(r[c]) for r in records):
            raise ConfigError(
                f"cannot build a dataset from these pairs: {c} mixes token ids with other values; "
                "prompts and candidates must each have one type across all rows"
            )
    if tokenizer is None:
        raise ConfigError(
            f"{'/'.join(columns)} would hold token ids, which TRL's DPOTrainer and RewardTrainer "
            "cannot read (they tokenise text or conversational messages themselves): "
            f"{remedy}, or give text completions"
        )
    for r in records:
        for c in columns:
            if is_token_ids(r[c]):
                ids = [int(t) for t in r[c]]
                r[c] = tokenizer.decode(ids, skip_special_tokens=True)


def to_dataset(records: list[dict[str, Any]], columns: Sequence[str]) -> datasets.Dataset:
    datasets = require("datasets", "trl", "preference pairs")
    if not records:
        return datasets.Dataset.from_dict({c: [] for c in columns})
    try:
        return datasets.Dataset.from_list(records)
    except Exception as e:  # pyarrow raises several types for inconsistent columns
        raise ConfigError(
            "cannot build a dataset from these pairs: prompts and candidates must each have one "
            f"type across all rows (all text, all token-id lists or all paths) ({e})"
        ) from e


def build_preference_pairs(
    prompts: Sequence[Any],
    candidates: Sequence[Sequence[Any]],
    values: Sequence[Sequence[float | None]],
    *,
    strategy: Strategy = "best_vs_worst",
    min_margin: float = 0.0,
    top_k: int = 1,
    tie_tolerance: float = 1e-6,
    max_pairs_per_prompt: int | None = None,
    margin_scale: float = 1.0,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[datasets.Dataset, PairStats]:
    """Preference pairs from scored candidates.

    Args:
        prompts: one prompt per group (text, conversational messages, or token ids).
        candidates: ``[prompt][candidate]``: what goes in ``chosen``/``rejected`` (text,
            conversational messages or token ids; one type throughout). Audio paths are passed
            through as they are (strings), for a trainer that reads audio.
        values: ``[prompt][candidate]`` scores (higher is better), ``None`` where scoring failed.
        strategy, min_margin, top_k, tie_tolerance, max_pairs_per_prompt: see
            :func:`select_pairs`.
        margin_scale: the ``margin`` column is ``margin_scale * (score_chosen - score_rejected)``
            (TRL's ``RewardTrainer`` subtracts it inside its loss, in reward-logit units).
        tokenizer: decodes token-id prompts and candidates to text
            (``tokenizer.decode(ids, skip_special_tokens=True)``), which is what TRL's
            ``DPOTrainer`` and ``RewardTrainer`` read. Required when there are token ids.

    Returns:
        ``(dataset, stats)``: a ``datasets.Dataset`` with the columns ``prompt``, ``chosen``,
        ``rejected``, ``score_chosen``, ``score_rejected``, ``margin``, and :class:`PairStats`.

    Raises:
        ConfigError: token ids without ``tokenizer``; candidates of more than one type.
    """
    records, stats = pair_records(
        prompts,
        candidates,
        values,
        strategy=strategy,
        min_margin=min_margin,
        top_k=top_k,
        tie_tolerance=tie_tolerance,
        max_pairs_per_prompt=max_pairs_per_prompt,
        margin_scale=margin_scale,
    )
    decode_token_ids(records, tokenizer)
    return to_dataset(records, PAIR_COLUMNS), stats


def score_and_build_pairs(
    reward: ApexRewardFunction | ApexRewardModel | str | Path,
    prompts: Sequence[Any],
    candidates: Sequence[Sequence[Any]],
    *,
    strategy: Strategy = "best_vs_worst",
    min_margin: float = 0.0,
    top_k: int = 1,
    tie_tolerance: float = 1e-6,
    max_pairs_per_prompt: int | None = None,
    margin_scale: float = 1.0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    allow_audio_paths: bool = False,
    **reward_kwargs: Any,
) -> tuple[datasets.Dataset, PairStats]:
    """Score every candidate with an APEX reward function, then :func:`build_preference_pairs`.

    ``candidates[p]`` are completions the reward function turns into audio with its decoder
    (text, messages, or token ids with ``decode_from="completion_ids"``); they also fill
    ``chosen``/``rejected``. ``reward`` is an
    :class:`~apex_reward.integrations.trl_rewards.ApexRewardFunction`, or a model/checkpoint
    with ``reward_kwargs`` (``decoder=``, ``score=``, ...) to build one. All candidates are scored
    in one batched pass.

    Args:
        tokenizer: decodes token-id candidates (and prompts) to the text TRL's trainers read;
            required when the candidates are token ids.
        allow_audio_paths: a reward function without a decoder scores the candidates as audio
            (paths or arrays), so ``chosen``/``rejected`` would hold audio, not text for a
            language model: refused unless this is ``True`` (you train on audio yourself).

    Raises:
        ConfigError: audio candidates without ``allow_audio_paths``; token ids without
            ``tokenizer``.
    """
    from .trl_rewards import ApexRewardFunction

    fn = (
        reward
        if isinstance(reward, ApexRewardFunction)
        else ApexRewardFunction(reward, **reward_kwargs)
    )
    if fn.decoder is None and not allow_audio_paths:
        raise ConfigError(
            "the reward function has no decoder, so the candidates are scored as audio and "
            "chosen/rejected would hold audio (paths or arrays), which TRL's DPOTrainer and "
            "RewardTrainer would read as text and train on nothing: give completions and a "
            "decoder=, or pass allow_audio_paths=True if you train on the audio yourself"
        )
    flat = [c for group in candidates for c in group]
    ids = flat if fn.decode_from == "completion_ids" else None
    flat_values = fn.values(fn.score_completions(flat, completion_ids=ids)) if flat else []
    values, start = [], 0
    for group in candidates:
        values.append(flat_values[start : start + len(group)])
        start += len(group)
    return build_preference_pairs(
        prompts,
        candidates,
        values,
        strategy=strategy,
        min_margin=min_margin,
        top_k=top_k,
        tie_tolerance=tie_tolerance,
        max_pairs_per_prompt=max_pairs_per_prompt,
        margin_scale=margin_scale,
        tokenizer=tokenizer,
    )
