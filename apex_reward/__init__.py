"""apex-reward: APEX as a differentiable reward model for generative-music fine-tuning.

Core API::

    from apex_reward import ApexRewardModel
    model = ApexRewardModel.from_pretrained("path/to/checkpoint")
    out = model(waveforms, sample_rate=44100)      # differentiable; out.scores, out.reward
    results = model.score(["a.wav", "b.flac"])      # batched, inference mode
    logits = model.preference_logits(a, b, sample_rate=44100)

Training (``apex_reward.training``) and integrations (``apex_reward.integrations``: TRL, PEFT,
reward server) are sub-packages with their own optional dependencies; importing ``apex_reward``
does not import them.
"""

from ._version import __version__
from .audio import AudioFrontEnd, load_audio
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
from .encoder import MertEncoder
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
from .heads import ApexHead
from .model import ApexOutput, ApexRewardModel, SegmentFeatures
from .popularity import PopularityReference, popularity_scores
from .scoring import ScoreResult

__all__ = [
    "__version__",
    "ApexRewardModel",
    "ApexOutput",
    "SegmentFeatures",
    "ScoreResult",
    "ApexConfig",
    "EncoderConfig",
    "FrontendConfig",
    "HeadConfig",
    "PreferenceConfig",
    "ApexHead",
    "MertEncoder",
    "AudioFrontEnd",
    "load_audio",
    "PopularityReference",
    "popularity_scores",
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
