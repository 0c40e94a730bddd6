"""``ApexRewardModel``: waveform -> APEX scores, scalar reward and pairwise preference logits.

One forward path (docs/model.md): front end -> frozen MERT -> pooled layers -> ``ApexHead`` ->
combined scores -> reward. ``forward`` is differentiable with respect to the input waveform and
never changes the gradient mode; :meth:`ApexRewardModel.score` is the batched, ``inference_mode``
convenience for files and arrays. The precision switches and the GPU fast path come from
:class:`~apex_reward.precision.PrecisionMixin`, ``logit P(A > B)`` from
:class:`~apex_reward.preference.PreferenceMixin`.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import ensemble as ensemble_heads
from . import guard as guard_policy
from . import ood as ood_score
from .audio import AudioFrontEnd, Segments, WaveformInput, as_waveform_list, per_song_rates
from .checkpoint import save_checkpoint
from .conditioning import ConditionArg, condition_indices
from .config import ApexConfig
from .encoders import Encoder, build_encoder, load_encoder
from .errors import ConfigError
from .guard import GuardPolicy
from .heads import ApexHead, weighted_reward, weighted_song_mean
from .outputs import ApexOutput, SegmentFeatures
from .precision import PrecisionMixin, bucket_size
from .preference import PreferenceHead, PreferenceMixin
from .windows import WindowSpec, window_scores

logger = logging.getLogger(__name__)

__all__ = ["ApexRewardModel", "ApexOutput", "SegmentFeatures"]


class ApexRewardModel(PrecisionMixin, PreferenceMixin, nn.Module):
    """The APEX reward model.

    Build one with :meth:`from_pretrained` (a checkpoint directory or hub id) or
    :meth:`from_config` (an untrained model). Call it on waveforms for differentiable scores;
    use :meth:`score` for files; :meth:`preference_logits` for ``logit P(A > B)``.

    Attributes:
        segment_batch_size: how many 30 s segments go through the encoder at once (bounds
            memory for long songs; does not change the scores).
    """

    def __init__(self, config: ApexConfig, encoder: Encoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.frontend = AudioFrontEnd(config.frontend)
        self.encoder = encoder if encoder is not None else build_encoder(config.encoder)
        # The head is tiny next to the encoder; running it in float64 makes a song's score
        # independent of which other songs share its batch (float32 GEMM kernels differ by batch
        # size), at no measurable cost. Checkpoints store it as it is (a few MB).
        self.head = ApexHead(
            config.encoder.hidden_size, len(config.encoder.layers), config.head
        ).to(torch.float64)
        self.preference_head: nn.Module | None = None
        if config.preference.head is not None:
            self.preference_head = PreferenceHead(config.preference.head)
        self.ensemble_heads = ensemble_heads.build_members(config)  # members 1..K-1
        self.ood_stats: ood_score.OodStatistics | None = None
        self.segment_batch_size = 8
        #: GPU fast path: None = on automatically for CUDA (see set_fast_path), True/False = set
        self.fast_path: bool | None = None
        self._fast_applied = False
        self._fp32_encoder_state: dict[str, torch.Tensor] | None = None
        self.bucket_batches = False

    # ------------------------------------------------------------------------------------------
    # construction, saving, loading

    @classmethod
    def from_config(
        cls, config: ApexConfig, *, encoder: Literal["load", "random"] | Encoder = "load"
    ) -> ApexRewardModel:
        """A model with freshly initialised heads.

        ``encoder="load"`` fetches the weights named by ``config.encoder.source`` (falling back to
        random weights, with a warning, only for an encoder without a source); ``"random"``
        initialises the encoder randomly (tests, the tiny demo).
        """
        if isinstance(encoder, torch.nn.Module):
            enc = encoder
        elif encoder == "load" and config.encoder.source:
            enc = load_encoder(config.encoder)
        else:
            if encoder == "load":
                logger.warning(
                    "encoder %r has no weight source: using random weights", config.encoder.preset
                )
            enc = build_encoder(config.encoder)
        return cls(config, enc).eval()

    def save_pretrained(
        self, directory: str | Path, *, include_encoder: bool | None = None
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` to ``directory``.

        The encoder is referenced by ``config.encoder.source`` + ``revision``; with
        ``include_encoder=True`` (forced for encoders without a source, e.g. the random ``tiny``
        one) its weights are stored in the checkpoint as well.
        """
        cfg = copy.deepcopy(self.config)
        if include_encoder is None:
            include_encoder = cfg.encoder.stored or not cfg.encoder.source
        if not include_encoder and not cfg.encoder.source:
            raise ConfigError(
                "this encoder has no source to reference (random weights); save with "
                "include_encoder=True"
            )
        cfg.encoder.stored = bool(include_encoder)
        tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.preference_head is not None:
            tensors.update(
                {f"preference.{k}": v for k, v in self.preference_head.state_dict().items()}
            )
        tensors.update(ensemble_heads.member_tensors(self))
        if self.ood_stats is not None:
            tensors.update(self.ood_stats.to_tensors())
        encoder_state = self.encoder.model.state_dict()
        if cfg.encoder.lora is not None or hasattr(self.encoder.model, "peft_config"):
            # LoRA (apex_reward.lora): base weights under their plain names,
            # the adapter under its own prefix
            from .lora import split_lora_state_dict

            encoder_state, adapter = split_lora_state_dict(self.encoder, cfg.encoder.lora)
            tensors.update({f"encoder_lora.{k}": v for k, v in adapter.items()})
        if include_encoder:
            if self._fp32_encoder_state is not None:  # the fast path holds bf16/fp16 copies
                encoder_state = {
                    k: self._fp32_encoder_state.get(k, v) for k, v in encoder_state.items()
                }
            tensors.update({f"encoder.{k}": v for k, v in encoder_state.items()})
        out = save_checkpoint(directory, cfg.to_dict(), tensors)
        if cfg.encoder.lora is not None:  # the adapter also in PEFT's own layout
            from .lora import save_peft_adapter

            save_peft_adapter(self.encoder, out)
        return out

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        revision: str | None = None,
        encoder_source: str | None = None,
        device: str | torch.device | None = None,
        freeze: bool = True,
        verify: bool = True,
        fast: bool | None = None,
        trust_unverified: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> ApexRewardModel:
        """Load a checkpoint directory (or hub repo id).

        Args:
            path_or_id: directory with ``config.json`` + ``model.safetensors``, or a hub id.
            revision: hub revision of the checkpoint (hub ids only).
            encoder_source: override where the MERT weights come from (hub id or local dir),
                e.g. a local copy when offline. Ignored when the checkpoint stores them.
            device: move the model there.
            freeze: ``requires_grad_(False)`` on all parameters (gradients still reach the input
                waveform); pass ``False`` to fine-tune the heads (and a stored LoRA adapter,
                which then also makes the encoder follow ``train()``).
            verify: check ``model.safetensors`` against the checksum in ``config.json``.
            trust_unverified: load a checkpoint whose ``config.json`` has no checksum (refused
                otherwise).
            fast: the GPU fast path (:meth:`set_fast_path`); None = on when the model runs on
                CUDA, False = never (exact float32 everywhere).
            token, cache_dir, local_files_only: passed to ``huggingface_hub.snapshot_download``
                for hub ids (access token, download cache, no network): the checkpoint's, and
                the encoder's when the checkpoint references it by hub id.

        Returns:
            The model in eval mode.

        Raises:
            CheckpointError, ConfigError: missing/corrupt/tampered files or invalid config fields.
        """
        from .pretrained import load_pretrained

        return load_pretrained(
            cls,
            path_or_id,
            revision=revision,
            encoder_source=encoder_source,
            device=device,
            freeze=freeze,
            verify=verify,
            fast=fast,
            trust_unverified=trust_unverified,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload this model (checkpoint + generated model card) to the Hub repo ``repo_id``;
        returns the commit URL. Keyword arguments: :func:`apex_reward.hub.push_to_hub`."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    # ------------------------------------------------------------------------------------------
    # properties

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def score_names(self) -> tuple[str, ...]:
        return self.config.score_names

    @property
    def untrained(self) -> bool:
        return self.config.untrained

    # ------------------------------------------------------------------------------------------
    # forward path

    def _segment_weights(self, segments: Segments) -> torch.Tensor:
        return self.frontend.segment_weights(segments)

    def iter_encoded_chunks(
        self, segments: Segments, segment_batch_size: int | None = None, *, dynamics: bool = False
    ) -> Iterator[torch.Tensor]:
        """Encode ``segments.audio`` in chunks of ``segment_batch_size``; yields ``[n, L, H]``
        (``[n, 3L, H]`` with ``dynamics``: see ``MertEncoder.forward``) covering the segments in
        order. Under ``segment_padding="none"`` segments of equal encoded length are batched
        together (:func:`~apex_reward.buckets.encode_by_length`)."""
        bs = max(1, int(segment_batch_size or self.segment_batch_size))
        encode = functools.partial(self._encode_chunk, dynamics=dynamics)
        if self.config.frontend.segment_padding != "full":
            from .buckets import encode_by_length

            lengths = self.frontend.encoded_lengths(segments.valid)
            yield encode_by_length(encode, segments, lengths, bs)
            return
        for start in range(0, segments.audio.shape[0], bs):
            yield encode(segments.audio[start : start + bs], segments.valid[start : start + bs], bs)

    def _encode_chunk(
        self, audio: torch.Tensor, valid: torch.Tensor, bs: int, *, dynamics: bool = False
    ) -> torch.Tensor:
        """One encoder call on ``[n, S']`` segments (n <= bs) -> ``[n, L, H]`` (``[n, 3L, H]``
        with ``dynamics``)."""
        n = audio.shape[0]
        size = bucket_size(n, bs) if self.bucket_batches else n
        if size > n:  # pad with silent segments to a fixed batch size; their rows are dropped
            audio = torch.nn.functional.pad(audio, (0, 0, 0, size - n))
            valid = torch.nn.functional.pad(valid, (0, size - n), value=audio.shape[-1])
        if dynamics:
            return self.encoder(audio, valid, dynamics=True)[:n]
        return self.encoder(audio, valid)[:n]

    def encode(
        self,
        waveforms: WaveformInput,
        sample_rate: int | Sequence[int],
        *,
        segment_batch_size: int | None = None,
        check: bool = True,
        dynamics: bool | None = None,
    ) -> SegmentFeatures:
        """Front end + encoder: waveforms -> per-segment pooled layer features.

        Args:
            waveforms: ``[B, T]``, ``[B, C, T]``, ``[T]``, or a list of ``[T]``/``[C, T]`` tensors
                or arrays, at ``sample_rate`` Hz (one rate, or one per song).
            segment_batch_size: segments per encoder call (default ``self.segment_batch_size``).
            check: run ``frontend.check`` on each song (``False`` when the caller already did:
                it is a full pass over the samples).
            dynamics: also compute the frames' ``dynamics`` (default: when the OOD statistics
                need them, :func:`~apex_reward.ood.needs_dynamics`).

        Returns:
            :class:`SegmentFeatures` with ``layer_features`` ``[N, L, H]`` (and ``dynamics``
            ``[N, 2, L, H]`` when computed).
        """
        self._maybe_fast_path()
        if dynamics is None:
            dynamics = ood_score.needs_dynamics(self)
        if dynamics and not getattr(self.encoder, "supports_dynamics", False):
            raise ConfigError(
                f"{type(self.encoder).__name__} does not compute the frames' dynamics "
                "(ood.features='moments')"
            )
        segments = self.frontend(waveforms, sample_rate, device=self.device, check=check)
        chunks = list(self.iter_encoded_chunks(segments, segment_batch_size, dynamics=dynamics))
        encoded, moments = ood_score.split_dynamics(torch.cat(chunks, dim=0), dynamics)
        return SegmentFeatures(
            layer_features=encoded,
            dynamics=moments,
            song_index=segments.song_index,
            weights=self._segment_weights(segments),
            durations_s=segments.durations.float() / self.config.frontend.sample_rate,
            num_songs=segments.num_songs,
        )

    def reward_from_scores(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar reward ``sum_k w_k * scores[k]`` (``config.reward_weights``). ``[B]``."""
        return weighted_reward(scores, self.config.reward_weights)

    def predict_from_features(
        self,
        features: SegmentFeatures,
        *,
        return_embeddings: bool = False,
        condition: ConditionArg | torch.Tensor = None,
    ) -> ApexOutput:
        """Head, combined scores and reward from encoder features (e.g. cached embeddings).

        ``condition``: as in :meth:`forward`, or ``[B]`` condition indices."""
        if not isinstance(condition, torch.Tensor):
            condition = condition_indices(
                self.config.head.condition, condition, features.num_songs, self.device
            )
        scores, reward, std = ensemble_heads.predict_members(self, features, condition)
        embeddings = None
        if return_embeddings:
            embeddings = weighted_song_mean(
                self.head.embed(features.layer_features),
                features.song_index,
                features.weights,
                features.num_songs,
            ).float()
        out = ApexOutput(
            scores=scores,
            reward=reward,
            embeddings=embeddings,
            features=features if return_embeddings else None,
            std=std,
        )
        ood_score.attach_ood(self, out, features)
        return out

    def forward(
        self,
        waveforms: WaveformInput,
        sample_rate: int | Sequence[int],
        *,
        return_embeddings: bool = False,
        segment_batch_size: int | None = None,
        check: bool = True,
        guard: GuardPolicy | None = None,
        robust: int | None = None,
        seed: int | None = None,
        return_windows: bool | WindowSpec = False,
        condition: ConditionArg = None,
        checks: Sequence[tuple[Mapping[str, float], Sequence[str]]] | None = None,
    ) -> ApexOutput:
        """Score waveforms; differentiable with respect to them.

        Args:
            waveforms: ``[B, T]`` mono, ``[B, C, T]`` multi-channel, ``[T]`` one song, or a list
                of ``[T]``/``[C, T]`` tensors (different lengths allowed), any float dtype.
            sample_rate: Hz, one for all songs or a sequence with one per song.
            return_embeddings: also return song embeddings ``[B, H]`` and per-segment features.
            segment_batch_size: segments per encoder call.
            check: validate each song with ``frontend.check`` (``False``: the caller already did).
            guard: the guard policy, ``"off"``, ``"flag"`` or ``"penalize"``
                (:mod:`apex_reward.guard`); None: the checkpoint's ``config.guard.policy``.
            robust: K > 0 averages every output over K random, differentiable transforms of each
                song (:mod:`apex_reward.robust`: gain, segmentation offset, resampling jitter,
                noise); 0 or None: off. Costs K encoder passes.
            seed: seed of the robust transforms (deterministic for a given seed; None: drawn
                from torch's global generator).
            return_windows: also score time windows (``out.windows``, ``[B, W]``): ``True`` the
                30 s segments, a :class:`~apex_reward.windows.WindowSpec` windows of its length
                and hop (:mod:`apex_reward.windows`).
            condition: a conditioned checkpoint's audience (:mod:`apex_reward.conditioning`):
                one value of its ``head.condition.values`` (e.g. ``"udio"``) for every song, one
                value (or None) per song, or None for the learned average condition.
            checks: the guard's signal checks already measured, one ``(signals, flags)`` per
                song (:func:`apex_reward.guard.check`; the reward server measures them on the
                audio as sent, before it resamples): used instead of measuring them again. The
                OOD flag and the policy still apply. None: measured here.

        Returns:
            :class:`ApexOutput` with ``scores`` (each ``[B]``) and ``reward`` ``[B]``, and the
            ``signals`` and ``flags`` of each song unless the policy is ``off``.

        Raises:
            AudioError subclasses for empty, non-finite, too-short or too-long input, and
            AudioShapeError for tensors of the wrong shape; UnknownConditionError for a
            condition the checkpoint does not know.
        """
        policy = guard_policy.resolve_policy(self.config, guard)
        if policy != "off" or condition is not None:  # the songs the encoder sees, as given
            waveforms = as_waveform_list(waveforms)
        cond = condition_indices(
            self.config.head.condition,
            condition,
            len(waveforms) if condition is not None else 0,
            self.device,
        )
        spec = WindowSpec.coerce(return_windows)
        if robust and spec is not None:
            raise ConfigError(
                "return_windows and robust cannot be combined: score the windows of the song "
                "as given (robust=0)"
            )
        if robust:
            from .robust import robust_predict

            out = robust_predict(
                self,
                waveforms,
                sample_rate,
                robust=robust,
                seed=seed,
                return_embeddings=return_embeddings,
                segment_batch_size=segment_batch_size,
                check=check,
                condition=cond,
            )
        else:
            features = self.encode(
                waveforms, sample_rate, segment_batch_size=segment_batch_size, check=check
            )
            out = self.predict_from_features(
                features, return_embeddings=return_embeddings, condition=cond
            )
        if policy == "off":
            if spec is not None:
                out.windows = window_scores(
                    self,
                    waveforms,
                    sample_rate,
                    spec,
                    features=features,
                    segment_batch_size=segment_batch_size,
                    condition=cond,
                )
            return out
        if checks is None:
            rates = per_song_rates(sample_rate, len(waveforms), "sample_rate")
            signals, flags = guard_policy.check(waveforms, rates, self.config.guard)
        else:
            if len(checks) != out.reward.shape[0]:
                raise ConfigError(f"checks: {len(checks)} entries for {out.reward.shape[0]} songs")
            signals = [dict(s) for s, _ in checks]
            flags = [list(f) for _, f in checks]
        out.signals = {
            name: torch.tensor([s[name] for s in signals], dtype=torch.float64)
            for name in signals[0]
        }
        out.flags = ood_score.merge_flags(flags, ood_score.beyond_threshold(self, out))
        floor = guard_policy.reward_floor(self.config)
        out.reward = ood_score.guarded_reward(
            self, out.reward, out.flags, policy, floor, out.ood_distance
        )
        if spec is not None:
            out.windows = window_scores(
                self,
                waveforms,
                sample_rate,
                spec,
                features=features,
                flags=out.flags,
                policy=policy,
                segment_batch_size=segment_batch_size,
                condition=cond,
            )
        return out

    # ------------------------------------------------------------------------------------------
    # batched scoring of files and arrays

    def score(
        self,
        inputs: Any,
        *,
        sample_rate: int | Sequence[int] | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        progress: bool = False,
        guard: GuardPolicy | None = None,
        robust: int = 0,
        seed: int | None = None,
        windows: bool | WindowSpec | None = None,
        condition: ConditionArg = None,
    ) -> list:
        """Score files and/or arrays in batches under ``inference_mode``.

        Args:
            inputs: a path, an array/tensor, or a sequence of paths, arrays/tensors
                (``[T]`` or ``[C, T]``) and ``(array, sample_rate)`` tuples.
            sample_rate: Hz for arrays given without one.
            batch_size: 30 s segments per encoder call; songs are grouped to fill it.
            num_workers: threads decoding files ahead of the encoder.
            progress: show a tqdm progress bar on stderr.
            guard: the guard policy (:mod:`apex_reward.guard`); None: the checkpoint's.
            robust, seed: the robust reward over ``robust`` random transforms (see
                :meth:`forward`; 0: off).
            windows: also score time windows (``ScoreResult.windows``), as ``return_windows``.
            condition: a conditioned checkpoint's condition (see :meth:`forward`): one value
                for all inputs, one value (or None) per input, or None (the learned average).

        Returns:
            One :class:`~apex_reward.scoring.ScoreResult` per input, in input order: scores,
            reward, signals and flags, or the error that input raised (other inputs are still
            scored).
        """
        from .scoring import score_inputs

        return score_inputs(
            self,
            inputs,
            sample_rate=sample_rate,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
            guard=guard,
            robust=robust,
            seed=seed,
            windows=windows,
            condition=condition,
        )
