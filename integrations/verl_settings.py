"""verl's ``reward_kwargs`` for :mod:`apex_reward.integrations.verl`: parsed and checked once
(:func:`parse_settings`) into a hashable :class:`Settings` (it keys the per-process batchers),
the score spec it selects, and the condition of one sample (:func:`sample_condition`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apex_reward.conditioning import per_input_conditions
from apex_reward.errors import ConfigError
from apex_reward.guard import POLICIES
from apex_reward.loading import ModelOptions
from apex_reward.windows import WindowSpec

from .decoders import check_target
from .score_spec import check_spec

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

__all__ = ["Settings", "parse_settings", "sample_condition", "score_spec_of", "window_setting"]

#: Keyword arguments verl itself may add to a reward call (verl-omni, with a reward router);
#: accepted and not used.
VERL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer", "model_name"})


@dataclass(frozen=True)
class Settings:
    """What ``reward_kwargs`` ask for (hashable: it keys the per-process batchers)."""

    options: tuple[str, str | None, str | None, str]  # model, encoder, device, dtype
    score: Any = "reward"
    guard: str = "penalize"
    decoder: str | None = None
    sample_rate: int | None = None
    failure_value: float | None = None
    max_batch: int = 16
    max_wait_s: float = 0.01
    windows: WindowSpec | None = None
    max_windows: int = 8
    condition: str | None = None
    condition_key: str | None = None

    def model_options(self) -> ModelOptions:
        model, encoder, device, dtype = self.options
        return ModelOptions(model=model, encoder=encoder, device=device, dtype=dtype)  # type: ignore[arg-type]


def parse_settings(
    *,
    model: Any = None,
    score: str | Mapping[str, float] = "reward",
    guard: str = "penalize",
    device: str | None = None,
    dtype: str = "auto",
    encoder: str | None = None,
    decoder: str | None = None,
    sample_rate: int | None = None,
    failure_value: float | None = None,
    max_batch: int = 16,
    max_wait_s: float = 0.01,
    windows: Any = None,
    max_windows: int = 8,
    condition: str | None = None,
    condition_key: str | None = None,
    **unknown: Any,
) -> Settings:
    if model is None or model == "":
        raise ConfigError(
            "reward_kwargs.model is required: the APEX checkpoint directory or hub id"
        )
    extra = tuple(sorted(k for k in unknown if k not in VERL_KWARGS))
    if extra:
        warnings.warn(
            f"apex_reward verl reward: ignoring unknown reward_kwargs {list(extra)}",
            stacklevel=3,
        )
    if guard not in POLICIES:
        raise ConfigError(f"guard: expected one of {', '.join(POLICIES)}, got {guard!r}")
    if decoder is not None:
        check_target(decoder)
    if failure_value is not None and (
        isinstance(failure_value, bool)
        or not isinstance(failure_value, (int, float))
        or not math.isfinite(failure_value)
    ):
        raise ConfigError(f"failure_value must be a finite number, got {failure_value!r}")
    if isinstance(score, Mapping):  # OmegaConf DictConfig -> a hashable, plain form
        score = tuple(sorted((str(k), float(v)) for k, v in score.items()))
    if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
        raise ConfigError(f"max_windows must be an integer >= 1, got {max_windows!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    for name, value in (("condition", condition), ("condition_key", condition_key)):
        if value is not None and not (isinstance(value, str) and value):
            raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    return Settings(
        options=(str(model), encoder, None if device is None else str(device), str(dtype)),
        score=score,
        guard=guard,
        decoder=decoder,
        sample_rate=sample_rate,
        failure_value=None if failure_value is None else float(failure_value),
        max_batch=max_batch,
        max_wait_s=float(max_wait_s),
        windows=window_setting(windows),
        max_windows=max_windows,
        condition=condition,
        condition_key=condition_key,
    )


def window_setting(value: Any) -> WindowSpec | None:
    """``windows`` in reward_kwargs: ``true`` (the segments), or ``{length_s, hop_s}``."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"length_s", "hop_s"})
        if unknown:
            raise ConfigError(f"windows: unknown keys {unknown}; expected length_s, hop_s")
        return WindowSpec(value.get("length_s"), value.get("hop_s"))
    return WindowSpec.coerce(value)


def score_spec_of(settings: Settings, model: ApexRewardModel) -> str | dict[str, float]:
    score = settings.score
    return check_spec(dict(score) if isinstance(score, tuple) else score, model.score_names)


def sample_condition(
    settings: Settings, model: ApexRewardModel, extra_info: Mapping[str, Any] | None
) -> str | None:
    """The sample's audience for a conditioned checkpoint: ``extra_info[condition_key]`` when the
    sample carries one, else ``condition`` (None: the learned average).

    Raises:
        UnknownConditionError: a value the checkpoint was not trained on, or a condition for a
            checkpoint without conditioning.
        ConfigError: ``condition_key`` with a checkpoint without conditioning.
    """
    value = settings.condition
    if settings.condition_key is not None:
        if model.config.head.condition is None:
            raise ConfigError(
                f"condition_key={settings.condition_key!r}: this checkpoint has no conditioning "
                "input"
            )
        own = (extra_info or {}).get(settings.condition_key)
        if own is not None:
            value = str(own)
    if value is not None:
        per_input_conditions(model.config.head.condition, value, 1)
    return value
