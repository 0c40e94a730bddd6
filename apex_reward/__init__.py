"""apex-reward: APEX as a differentiable reward model for generative-music fine-tuning.

Core API::

    from apex_reward import ApexRewardModel
    model = ApexRewardModel.from_pretrained("path/to/checkpoint")
    out = model(waveforms, sample_rate=44100)      # differentiable; out.scores, out.reward
    results = model.score(["a.wav", "b.flac"])      # batched, inference mode
    logits = model.preference_logits(a, b, sample_rate=44100)

    # a job's model, as the command line loads it (device, precision, untrained warning)
    model = load_model(ModelOptions(model="path/to/checkpoint", device="cuda", dtype="fp32"))

The model's specification is in the repository's ``docs/`` folder. Building blocks (the front end
``apex_reward.audio``, the encoder ``apex_reward.encoder``, the heads ``apex_reward.heads``,
popularity scores ``apex_reward.popularity``) are importable from their modules. Training
(``apex_reward.training``) and integrations (``apex_reward.integrations``: TRL, PEFT, reward
server) are sub-packages with their own optional dependencies; importing ``apex_reward`` does not
import them.
"""

from typing import TYPE_CHECKING

from ._version import __version__
from .errors import (
    ApexError,
    AudioDecodeError,
    AudioError,
    AudioRangeError,
    AudioShapeError,
    AudioTooLongError,
    AudioTooShortError,
    CheckpointError,
    ConfigError,
    EmptyAudioError,
    MissingDependencyError,
    NonFiniteAudioError,
    UnsupportedSampleRateError,
)

#: Names imported from their module on first use (PEP 562), so that ``import apex_reward`` (and
#: ``apex-reward --version``) does not import torch until a model, config or decoder is needed.
_LAZY: dict[str, str] = {
    "load_audio": ".audio",
    "AESTHETIC_TASKS": ".config",
    "ALL_TASKS": ".config",
    "POPULARITY_TASKS": ".config",
    "SCORE_RANGES": ".config",
    "ApexConfig": ".config",
    "EncoderConfig": ".config",
    "FrontendConfig": ".config",
    "HeadConfig": ".config",
    "PreferenceConfig": ".config",
    "list_presets": ".presets",
    "ModelOptions": ".loading",
    "load_model": ".loading",
    "ApexOutput": ".model",
    "ApexRewardModel": ".model",
    "ScoreResult": ".scoring",
}

if TYPE_CHECKING:
    from .audio import load_audio
    from .config import (
        AESTHETIC_TASKS,
        ALL_TASKS,
        POPULARITY_TASKS,
        SCORE_RANGES,
        ApexConfig,
        EncoderConfig,
        FrontendConfig,
        HeadConfig,
        PreferenceConfig,
    )
    from .loading import ModelOptions, load_model
    from .model import ApexOutput, ApexRewardModel
    from .presets import list_presets
    from .scoring import ScoreResult


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "ApexRewardModel",
    "ApexOutput",
    "ScoreResult",
    "ModelOptions",
    "load_model",
    "load_audio",
    "list_presets",
    "ApexConfig",
    "EncoderConfig",
    "FrontendConfig",
    "HeadConfig",
    "PreferenceConfig",
    "POPULARITY_TASKS",
    "AESTHETIC_TASKS",
    "ALL_TASKS",
    "SCORE_RANGES",
    "ApexError",
    "AudioError",
    "AudioDecodeError",
    "AudioShapeError",
    "AudioRangeError",
    "AudioTooLongError",
    "AudioTooShortError",
    "EmptyAudioError",
    "NonFiniteAudioError",
    "UnsupportedSampleRateError",
    "CheckpointError",
    "ConfigError",
    "MissingDependencyError",
]
