"""The front end's one-pass segment rows (:mod:`apex_reward.segment_rows`) equal the masked
normalisation of the zero-padded rows they replace, in value and in gradient, and leave the
padding exactly zero."""

from __future__ import annotations

import pytest
import torch

from apex_reward import FrontendConfig
from apex_reward.audio import AudioFrontEnd
from apex_reward.errors import ConfigError
from apex_reward.segment_rows import cut_rows

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 24000


def _masked_reference(songs, S, floor):
    """Zero-pad every song to whole ``S``-sample rows, then normalise each row over its first
    ``valid`` samples with a mask (the front end's former formula, float32)."""
    pieces, valid = [], []
    for x in songs:
        n = x.shape[-1]
        k = max(1, -(-n // S))
        pieces.append(torch.nn.functional.pad(x, (0, k * S - n)).reshape(k, S))
        valid += [S] * (k - 1) + [n - (k - 1) * S]
    audio = torch.cat(pieces)
    valid_t = torch.tensor(valid)
    mask = (torch.arange(S)[None, :] < valid_t[:, None]).to(audio.dtype)
    n = valid_t.to(audio.dtype)[:, None]
    mean = (audio * mask).sum(-1, keepdim=True) / n
    centred = (audio - mean) * mask
    var = (centred * centred).sum(-1, keepdim=True) / n
    level = 10 * torch.log10(var.double().squeeze(1) + 1e-20)
    return centred / torch.sqrt(var + floor), valid_t, level.float()


def _songs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    lengths = [int(0.7 * SR), int(2.5 * SR), int(4.3 * SR)]  # 1, 2 and 3 rows of 2 s
    # a DC offset and a quiet song: the statistics must not lean on a zero mean or unit level
    songs = [
        0.3 * torch.randn(lengths[0], generator=g) + 0.25,
        1e-3 * torch.randn(lengths[1], generator=g),
        torch.sin(torch.arange(lengths[2]) * 0.05) + 0.1 * torch.randn(lengths[2], generator=g),
    ]
    return [s.clone().requires_grad_(requires_grad) for s in songs]


def _front_end(floor=1e-7):
    return AudioFrontEnd(
        FrontendConfig(
            segment_seconds=2.0,
            min_duration_s=0.5,
            trim_silence=False,
            silent_segment_db=None,
            gradient_gate_db=None,
            normalize_floor=floor,
        )
    )


@pytest.mark.parametrize("floor", [1e-7, 1e-3])
def test_segments_equal_the_masked_normalisation_of_padded_rows(floor):
    fe = _front_end(floor)
    S = fe.config.segment_samples
    songs = _songs()
    segs = fe.segment(songs)
    ref, valid, level = _masked_reference(songs, S, floor)
    assert segs.audio.shape == ref.shape == (6, S)  # 1 + 2 + 3 rows
    assert torch.equal(segs.valid, valid)
    # float rounding only: the statistics are now float64, the masked sums were float32
    assert (segs.audio - ref).abs().max() < 2e-5
    for i, n in enumerate(valid.tolist()):
        assert torch.count_nonzero(segs.audio[i, n:]) == 0  # padding exactly zero
    assert torch.allclose(segs.level_db, level, atol=1e-3)


def test_gradient_equals_the_masked_formula():
    fe = _front_end()
    S = fe.config.segment_samples
    weights = torch.randn(6, S, generator=torch.Generator().manual_seed(1))
    a, b = _songs(requires_grad=True), _songs(requires_grad=True)
    (fe.segment(a).audio * weights).sum().backward()
    (_masked_reference(b, S, 1e-7)[0] * weights).sum().backward()
    for x, y in zip(a, b):
        scale = y.grad.abs().max()
        assert (x.grad - y.grad).abs().max() <= 1e-4 * scale


def test_normalisation_reads_only_the_valid_samples():
    """Normalised rows ignore whatever lies past each stretch and are zero there, with the
    default floor of ``Wav2Vec2FeatureExtractor`` (1e-7)."""
    g = torch.Generator().manual_seed(2)
    audio = torch.randn(3, 1000, generator=g)
    valid = torch.tensor([1000, 400, 7])
    spans = [(row, 0, int(n)) for row, n in zip(audio, valid.tolist())]
    out = cut_rows(spans, audio.shape[-1], normalize=True)[0]
    for i, n in enumerate(valid.tolist()):
        row = audio[i, :n].double()
        want = (row - row.mean()) / torch.sqrt(row.var(correction=0) + 1e-7)
        assert torch.allclose(out[i, :n].double(), want, atol=1e-5)
        assert torch.count_nonzero(out[i, n:]) == 0


def test_cut_rows_without_normalisation_copies_the_stretches():
    x = torch.arange(10, dtype=torch.float32)
    rows, level = cut_rows([(x, 2, 5), (x, 9, 1)], 6, normalize=False)
    assert rows.tolist() == [[2, 3, 4, 5, 6, 0], [9, 0, 0, 0, 0, 0]]
    assert level[0] == pytest.approx(10 * torch.log10(torch.tensor(2.0)).item(), abs=1e-5)
    assert level[1] == pytest.approx(-200.0)  # one sample: pure DC


def test_target_level_scales_each_normalised_row_to_that_rms():
    songs = _songs()
    spans = [(s, 0, s.shape[-1]) for s in songs]
    unit, level = cut_rows(spans, songs[-1].shape[-1], normalize=True)
    rows, level_again = cut_rows(spans, songs[-1].shape[-1], normalize=True, target_db=-20.0)
    assert torch.allclose(rows, unit * 0.1, atol=1e-7)  # -20 dBFS is an RMS of 0.1
    for row, s in zip(rows, songs):
        rms = row[: s.shape[-1]].double().pow(2).mean().sqrt()
        var = s.detach().double().var(correction=0)
        assert float(rms) == pytest.approx(0.1 * float(var / (var + 1e-7)) ** 0.5, rel=1e-4)
    assert torch.equal(level, level_again)  # the reported level is the input's, not the target
    with pytest.raises(ConfigError, match="normalize_level_db"):
        FrontendConfig(normalize_level_db=3.0)
