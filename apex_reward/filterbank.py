"""Kaldi-style log-mel filterbank in torch: the AST encoder's front end (docs/model.md#encoders).

:class:`LogMelFilterbank` computes the features transformers' ``ASTFeatureExtractor`` computes
(25 ms Hann frames every 10 ms at 16 kHz, per-frame DC removal and 0.97 pre-emphasis, 512-point
FFT power spectrum, 128 Kaldi mel bands from 20 Hz, natural log floored at float32 epsilon, frames
past the audio zero-padded to a fixed count, then ``(x - mean) / (2 * std)``), but batched and in
torch, so that gradients flow from the encoder back to the waveform. The mel matrix comes from
``transformers.audio_utils.mel_filter_bank`` (the same one the extractor uses) and is a buffer
that is not stored in checkpoints.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["LogMelFilterbank", "fbank_frames"]

FRAME_LENGTH = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms at 16 kHz
FFT_LENGTH = 512
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07  # float32 epsilon: the floor of the mel energies
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


def fbank_frames(samples: torch.Tensor) -> torch.Tensor:
    """Number of complete 25 ms frames (hop 10 ms) in ``samples`` samples at 16 kHz, >= 0. ``[N]``."""
    n = torch.div(samples - FRAME_LENGTH, HOP_LENGTH, rounding_mode="floor") + 1
    return torch.clamp(n, min=0)


class LogMelFilterbank(torch.nn.Module):
    """``[N, S]`` 16 kHz waveforms -> ``[N, max_frames, num_mel_bins]`` normalised log-mel features.

    Args:
        num_mel_bins: mel bands (128 for the AudioSet AST checkpoints).
        max_frames: frames per segment after zero-padding / truncation (1024 = 10.24 s).
        sample_rate: Hz; the frame and hop lengths are those of 16 kHz audio, as in the extractor.
        mean, std: normalisation constants (AudioSet statistics by default); ``normalize=False``
            returns the raw log-mel energies.
    """

    def __init__(
        self,
        num_mel_bins: int = 128,
        max_frames: int = 1024,
        *,
        sample_rate: int = 16000,
        mean: float = AUDIOSET_MEAN,
        std: float = AUDIOSET_STD,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.num_mel_bins = int(num_mel_bins)
        self.max_frames = int(max_frames)
        self.mean, self.std, self.normalize = float(mean), float(std), bool(normalize)
        with warnings.catch_warnings():  # 128 Kaldi bands over 257 bins leave one band empty
            warnings.simplefilter("ignore", UserWarning)
            mel = mel_filter_bank(
                num_frequency_bins=FFT_LENGTH // 2 + 1,
                num_mel_filters=self.num_mel_bins,
                min_frequency=20,
                max_frequency=sample_rate // 2,
                sampling_rate=sample_rate,
                norm=None,
                mel_scale="kaldi",
                triangularize_in_mel_space=True,
            )
        self.register_buffer("mel", torch.as_tensor(mel, dtype=torch.float32), persistent=False)
        window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float64)
        self.register_buffer("window", window.float(), persistent=False)

    def forward(self, audio: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Filterbank features of each segment.

        Args:
            audio: ``[N, S]`` float waveforms at 16 kHz (any S; shorter than one frame gives only
                padding frames).
            valid: ``[N]`` unpadded samples per segment; frames reaching past them are replaced
                by padding, as the extractor pads the features of a shorter clip. ``None``: all.

        Returns:
            ``[N, max_frames, num_mel_bins]`` float32.
        """
        x = audio.float()
        if x.shape[-1] < FRAME_LENGTH:
            x = torch.nn.functional.pad(x, (0, FRAME_LENGTH - x.shape[-1]))
        frames = x.unfold(-1, FRAME_LENGTH, HOP_LENGTH)[:, : self.max_frames]  # [N, F, 400]
        frames = frames - frames.mean(dim=-1, keepdim=True)
        frames = torch.cat(
            [frames[..., :1] * (1 - PREEMPHASIS), frames[..., 1:] - PREEMPHASIS * frames[..., :-1]],
            dim=-1,
        )
        spec = torch.fft.rfft(frames * self.window, n=FFT_LENGTH)
        power = spec.real.square() + spec.imag.square()  # [N, F, 257]; no |.| (no NaN gradient)
        logmel = torch.log(torch.clamp(power @ self.mel, min=MEL_FLOOR))  # [N, F, mel]
        samples = torch.full((x.shape[0],), audio.shape[-1], device=x.device)
        if valid is not None:
            samples = torch.minimum(samples, valid.to(x.device))
        n = fbank_frames(samples)
        keep = torch.arange(logmel.shape[1], device=x.device)[None, :] < n[:, None]
        logmel = logmel * keep[..., None].to(logmel.dtype)  # padding frames are zeros
        missing = self.max_frames - logmel.shape[1]
        if missing > 0:
            logmel = torch.nn.functional.pad(logmel, (0, 0, 0, missing))
        if self.normalize:
            logmel = (logmel - self.mean) / (2 * self.std)
        return logmel
