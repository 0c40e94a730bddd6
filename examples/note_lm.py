"""Shared pieces of the TRL examples: a note synthesiser, a note-token language model built from a
config (no downloads), and a tiny demo APEX reward model.

The "music generator" is a tiny GPT-2 whose vocabulary is the notes of a small synthesiser (C4 to
G5, plus a rest). A completion such as ``"C4 E4 G4 _ C5"`` is decoded to audio by
:class:`NoteDecoder`: each token becomes an eighth note (0.125 s) of a plucked two-partial tone.

The demo reward model (:func:`build_demo_reward_model`) is the ``tiny`` APEX preset — a randomly
initialised MERT-shaped encoder — with its head's BatchNorm statistics calibrated on this
synthesiser's output and 1 s segments (instead of 30 s) so that examples run in seconds on a CPU.
Be clear about what it measures: its reward is a fixed, deterministic function of the audio that
happens to respond to pitch register and to the mix of notes, but it was never trained on
listener data, so it says nothing about musical quality. The examples show the mechanics —
tokens -> audio -> APEX reward -> policy update — and that the optimisers really move the reward.
Pass ``--model DIR`` with a trained APEX checkpoint to optimise a meaningful reward.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 24000  # the encoder rate: no resampling
NOTE_SECONDS = 0.125
REST = "_"
#: note name -> semitones above C4 (a two-octave major scale)
NOTES: dict[str, int] = {
    "C4": 0, "D4": 2, "E4": 4, "F4": 5, "G4": 7, "A4": 9, "B4": 11,
    "C5": 12, "D5": 14, "E5": 16, "F5": 17, "G5": 19,
}  # fmt: skip
STYLES = ("<calm>", "<bright>", "<dance>", "<dark>")
SPECIALS = ("<pad>", "<eos>", "<unk>")


def note_waveform(tokens: list[str], sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Synthesise note tokens (``"C4"``, ..., ``"G5"``, rest ``"_"``) to a mono float32 ``[T]``
    waveform: each token lasts :data:`NOTE_SECONDS`."""
    n = int(round(NOTE_SECONDS * sample_rate))
    t = np.arange(n) / sample_rate
    env = np.exp(-6.0 * t) * (1.0 - np.exp(-200.0 * t))
    out = []
    for tok in tokens:
        if tok == REST:
            out.append(np.zeros(n))
            continue
        f = 261.63 * 2.0 ** (NOTES[tok] / 12.0)
        out.append(0.5 * env * (np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t)))
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


class NoteDecoder:
    """Completion text (``"C4 E4 _ G4"``) -> ``(waveform [T], sample_rate)``.

    Tokens that are not notes (e.g. a style token the policy emits mid-phrase) are played as
    rests. Raises ``ValueError`` for a completion without a single note; the reward function
    turns that into ``None``. Phrases shorter than the reward model's minimum duration (fewer
    than four tokens for the demo model) are rejected by the model, also as ``None``.
    Picklable (a plain class), as TRL reward functions should be.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self.sample_rate = sample_rate

    def __call__(self, completion: str) -> tuple[np.ndarray, int]:
        tokens = [t if t in NOTES else REST for t in completion.split()]
        if not any(t in NOTES for t in tokens):
            raise ValueError(f"no notes in the completion {completion!r}")
        return note_waveform(tokens, self.sample_rate), self.sample_rate


def decode_notes(completion: str) -> tuple[np.ndarray, int]:
    """:class:`NoteDecoder` at 24 kHz as a module-level function, the ``module:function`` form
    that ``apex-reward serve --decoder note_lm:decode_notes`` and the verl/OpenRLHF reward
    functions import."""
    return NoteDecoder()(completion)


def build_tokenizer():
    """A word-level tokenizer over the note vocabulary, built locally (nothing downloaded)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *STYLES, REST, *NOTES))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # split on whitespace and around "<...>" tokens, so "<calm>C4 E4<eos>" (how TRL joins prompt,
    # completion and EOS) is "<calm>", "C4", "E4", "<eos>"
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex("<[^>]+>"), behavior="isolated"),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_policy(tokenizer, seed: int = 0, n_embd: int = 32, n_layer: int = 2):
    """A tiny GPT-2 causal LM built from a config (random weights, no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_reward_model(tokenizer, seed: int = 0, n_embd: int = 32):
    """A tiny one-layer GPT-2 sequence scorer (one output) for TRL's RewardTrainer."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=n_embd,
        n_layer=1,
        n_head=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2ForSequenceClassification(config)


def random_phrases(n: int, length: int = 8, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    vocab = [*NOTES, REST]
    return [[vocab[i] for i in rng.integers(0, len(vocab), length)] for _ in range(n)]


def build_demo_reward_model(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny demo APEX checkpoint (see the module docstring) to ``directory``."""
    from apex_reward import ApexConfig, ApexRewardModel, FrontendConfig

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(seed)
    config = ApexConfig.from_preset("tiny")
    config.frontend = FrontendConfig(segment_seconds=1.0, min_duration_s=0.5)
    model = ApexRewardModel.from_config(config, encoder="random")
    songs = [torch.from_numpy(note_waveform(p)) for p in random_phrases(32, seed=seed + 1)]
    with torch.no_grad():  # calibrate the head's BatchNorm statistics on synthesiser output
        emb = model.head.embed(model.encode(songs, SAMPLE_RATE).layer_features)
        for m in model.head.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.momentum = None
        model.head.train()
        model.head.predict(emb)
    model.eval().save_pretrained(directory)
    return directory


def offline() -> None:
    """No network: everything here is built locally."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
