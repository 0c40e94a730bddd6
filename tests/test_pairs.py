"""The preference-pair builder and ``apex-reward pairs``."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import REPO, synth_music

from apex_reward import ApexConfig, ApexRewardModel, FrontendConfig
from apex_reward.cli import build_parser, main
from apex_reward.errors import ConfigError
from apex_reward.integrations.pairs import (
    PAIR_COLUMNS,
    PairStats,
    build_preference_pairs,
    score_and_build_pairs,
    select_pairs,
)
from apex_reward.integrations.pairs_job import read_candidates

# ----------------------------------------------------------------------------------------------
# strategies


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_values(rng: np.random.Generator) -> list[float | None]:
    n = int(rng.integers(0, 9))
    vals: list[float | None] = [float(v) for v in rng.choice([0.0, 0.1, 0.25, 0.5, 0.9, 1.0], n)]
    for i in range(n):  # failures and non-finite scores
        r = rng.random()
        if r < 0.15:
            vals[i] = None
        elif r < 0.2:
            vals[i] = math.nan
    return vals


@pytest.mark.parametrize("strategy", ["best_vs_worst", "all_pairs", "top_k"])
def test_every_pair_respects_the_margin_and_skips_ties_and_failures(strategy):
    rng = np.random.default_rng(0)
    for _ in range(300):
        vals = _random_values(rng)
        margin = float(rng.choice([0.0, 0.1, 0.3]))
        k = int(rng.integers(1, 4))
        stats = PairStats()
        pairs = select_pairs(vals, strategy=strategy, min_margin=margin, top_k=k, stats=stats)
        valid = [i for i, v in enumerate(vals) if v is not None and math.isfinite(v)]
        for a, b in pairs:
            assert a in valid and b in valid and a != b
            assert vals[a] >= vals[b] + margin
            assert vals[a] - vals[b] > 1e-6  # never a tie
        assert len(set(pairs)) == len(pairs)
        assert stats.failed_candidates == len(vals) - len(valid)
        assert stats.pairs == 0  # select_pairs counts candidates; the builder counts pairs
        if len(valid) < 2:
            assert pairs == [] and stats.prompts_too_few_valid == 1
            continue
        v = {i: vals[i] for i in valid}
        if strategy == "best_vs_worst":
            assert len(pairs) <= 1
            hi, lo = max(v.values()), min(v.values())
            considered = 1
            if hi - lo > 1e-6 and hi - lo >= margin:
                assert len(pairs) == 1 and vals[pairs[0][0]] == hi and vals[pairs[0][1]] == lo
        elif strategy == "all_pairs":
            expected = {
                (a, b) if v[a] > v[b] else (b, a)
                for a, b in itertools.combinations(valid, 2)
                if abs(v[a] - v[b]) > 1e-6 and abs(v[a] - v[b]) >= margin
            }
            assert set(pairs) == expected
            considered = len(valid) * (len(valid) - 1) // 2
        else:
            kk = min(k, len(valid) // 2)
            order = sorted(valid, key=lambda i: (-v[i], i))
            top, bottom = set(order[:kk]), set(order[-kk:])
            assert not top & bottom
            assert all(a in top and b in bottom for a, b in pairs)
            considered = kk * kk
        # every candidate pair considered is emitted, a tie, or below the margin
        assert len(pairs) + stats.ties + stats.below_margin == considered


def test_best_vs_worst_gives_one_pair_per_prompt():
    prompts = ["a", "b", "c"]
    cands = [["x1", "x2", "x3"], ["y1", "y2"], ["z1", "z2", "z3", "z4"]]
    values = [[0.2, 0.9, 0.5], [0.4, 0.1], [0.3, 0.3, 0.8, 0.1]]
    ds, stats = build_preference_pairs(prompts, cands, values, strategy="best_vs_worst")
    assert ds.column_names == list(PAIR_COLUMNS)
    assert ds["prompt"] == prompts
    assert ds["chosen"] == ["x2", "y1", "z3"] and ds["rejected"] == ["x1", "y2", "z4"]
    assert ds["margin"] == pytest.approx([0.7, 0.3, 0.7])
    assert ds["score_chosen"] == pytest.approx([0.9, 0.4, 0.8])
    assert stats.pairs == 3 and stats.prompts_with_pairs == 3
    assert stats.mean_margin == pytest.approx((0.7 + 0.3 + 0.7) / 3)


def test_ties_and_failures_are_excluded_and_counted():
    values = [[0.5, 0.5, None], [None, math.nan], [0.3, 0.7, 0.7, None], [0.2, 0.25]]
    cands = [["a", "b", "c"], ["d", "e"], ["f", "g", "h", "i"], ["j", "k"]]
    ds, stats = build_preference_pairs(
        ["p0", "p1", "p2", "p3"], cands, values, strategy="all_pairs", min_margin=0.1
    )
    assert stats.to_dict() == {
        "prompts": 4,
        "prompts_with_pairs": 1,
        "prompts_too_few_valid": 1,  # p1: both failed
        "candidates": 11,
        "failed_candidates": 4,
        "pairs": 2,  # p2: g>f, h>f
        "ties": 2,  # p0: a=b; p2: g=h
        "below_margin": 1,  # p3: 0.05 < 0.1
        "capped": 0,
        "mean_margin": pytest.approx(0.4),
    }
    assert sorted(zip(ds["chosen"], ds["rejected"])) == [("g", "f"), ("h", "f")]
    # top_k=2 on p2: 2 valid in the top half, 1 in the bottom -> k is capped at 3 // 2 = 1
    _, st = build_preference_pairs(["p2"], [cands[2]], [values[2]], strategy="top_k", top_k=2)
    assert st.pairs == 1


class _DigitTokenizer:
    """Token ids -> their digits joined by spaces (what a tokenizer's ``decode`` does)."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


def test_cap_margin_scale_and_types():
    ds, stats = build_preference_pairs(
        ["p"],
        [[[1, 2], [3], [4, 5, 6], [7]]],  # token ids, decoded to text for TRL's trainers
        [[0.1, 0.4, 0.9, 0.2]],
        strategy="all_pairs",
        max_pairs_per_prompt=2,
        margin_scale=10.0,
        tokenizer=_DigitTokenizer(),
    )
    assert stats.pairs == 2 and stats.capped == 4
    assert ds["chosen"] == ["4 5 6", "4 5 6"] and ds["rejected"] == ["1 2", "7"]
    assert ds["margin"] == pytest.approx([8.0, 7.0])  # largest first, scaled
    empty, st = build_preference_pairs(["p"], [["a", "b"]], [[None, 0.3]])
    assert len(empty) == 0 and empty.column_names == list(PAIR_COLUMNS)
    with pytest.raises(ConfigError, match="one type"):
        build_preference_pairs(["p", "q"], [["a", "b"], [[1], [2]]], [[1.0, 0.0], [1.0, 0.0]])
    # token ids and no tokenizer: TRL's trainers would fail on them ('list' has no 'endswith')
    with pytest.raises(ConfigError, match=r"chosen/rejected would hold token ids.*tokenizer="):
        build_preference_pairs(["p"], [[[1, 2], [3]]], [[1.0, 0.0]])
    with pytest.raises(ConfigError, match="strategy"):
        select_pairs([1.0, 0.0], strategy="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min_margin"):
        select_pairs([1.0, 0.0], min_margin=-1.0)
    with pytest.raises(ConfigError, match="2 candidates but 1 values"):
        build_preference_pairs(["p"], [["a", "b"]], [[1.0]])


# ----------------------------------------------------------------------------------------------
# APEX-scored pairs in TRL's trainers


@pytest.fixture(scope="module")
def fast_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    cfg = ApexConfig.from_preset("tiny")
    cfg.frontend = FrontendConfig(segment_seconds=2.0, min_duration_s=0.5)
    d = tmp_path_factory.mktemp("fast") / "ckpt"
    ApexRewardModel.from_config(cfg, encoder="random").save_pretrained(d)
    return d


def _note_lm():
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    import note_lm

    return note_lm


def test_reward_trainer_trains_on_the_pairs_and_reads_margin(fast_checkpoint, tmp_path):
    """TRL's RewardTrainer accepts the builder's dataset and feeds its margin to the loss."""
    from trl import RewardConfig, RewardTrainer

    note_lm = _note_lm()
    phrases = [" ".join(p) for p in note_lm.random_phrases(16, seed=3)]
    groups = [phrases[i : i + 4] for i in range(0, 16, 4)]
    prompts = ["<calm>", "<dark>", "<dance>", "<bright>"]
    ds, stats = score_and_build_pairs(
        fast_checkpoint,
        prompts,
        groups,
        strategy="top_k",
        top_k=2,
        margin_scale=5.0,
        decoder=note_lm.NoteDecoder(),
    )
    assert stats.pairs == len(ds) >= 8
    assert all(m > 0 for m in ds["margin"])
    tok = note_lm.build_tokenizer()
    model = note_lm.build_reward_model(tok, seed=0, n_embd=16)
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
        ),
        train_dataset=ds,
        processing_class=tok,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["margin"].tolist() == pytest.approx(ds["margin"][:2])
    # with the margin, the Bradley-Terry loss is -logsigmoid(r_c - r_r - margin): larger
    with torch.no_grad():
        loss_with = trainer.compute_loss(model, batch)
        batch.pop("margin")
        loss_without = trainer.compute_loss(model, batch)
    assert loss_with > loss_without


class _IdsDecoder:
    """Token ids of the note LM -> audio (what a codec-token model's decoder does)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.notes = _note_lm().NoteDecoder()

    def __call__(self, ids):
        return self.notes(self.tokenizer.decode(ids, skip_special_tokens=True))


def test_dpo_and_reward_trainers_train_on_pairs_of_token_id_candidates(fast_checkpoint, tmp_path):
    """Token-id candidates (a codec-token generator's completion_ids) used to land in
    chosen/rejected as lists, and DPOTrainer/RewardTrainer failed on them ('list' object has no
    attribute 'endswith'). With the policy's tokenizer they are decoded to text; both trainers
    train on the pairs and DPO's loss moves."""
    import copy

    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    note_lm = _note_lm()
    tok = note_lm.build_tokenizer()
    phrases = [" ".join(p) for p in note_lm.random_phrases(16, seed=3)]
    ids = [tok(p, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in phrases]
    groups = [ids[i : i + 4] for i in range(0, 16, 4)]
    prompts = ["<calm>", "<dark>", "<dance>", "<bright>"]
    kwargs = dict(strategy="top_k", top_k=2, decoder=_IdsDecoder(tok), decode_from="completion_ids")
    with pytest.raises(ConfigError, match="tokenizer="):
        score_and_build_pairs(fast_checkpoint, prompts, groups, **kwargs)
    ds, stats = score_and_build_pairs(fast_checkpoint, prompts, groups, tokenizer=tok, **kwargs)
    assert stats.pairs == len(ds) >= 8
    assert all(isinstance(c, str) for c in list(ds["chosen"]) + list(ds["rejected"]))
    assert set(list(ds["chosen"]) + list(ds["rejected"])) <= set(
        phrases
    )  # the phrases, EOS dropped

    torch.manual_seed(0)
    policy = note_lm.build_policy(tok, seed=0, n_layer=1)
    trainer = DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy).eval(),
        args=DPOConfig(
            output_dir=str(tmp_path / "dpo"),
            per_device_train_batch_size=len(ds),
            max_steps=4,
            learning_rate=5e-3,
            max_length=32,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            seed=0,
            lr_scheduler_type="constant",
            disable_tqdm=True,
        ),
        train_dataset=ds,
        processing_class=tok,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    assert losses[-1] < losses[0] - 0.01

    model = note_lm.build_reward_model(tok, seed=0, n_embd=16)
    rm = RewardTrainer(
        model=model,
        args=RewardConfig(
            output_dir=str(tmp_path / "rm"),
            per_device_train_batch_size=4,
            max_steps=2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
        ),
        train_dataset=ds,
        processing_class=tok,
    )
    rm.train()
    assert rm.state.global_step == 2


def test_audio_candidates_need_allow_audio_paths(fast_checkpoint, tmp_path):
    """Without a decoder the candidates are audio, and so would chosen/rejected be: a text
    trainer reads the paths as text and trains on nothing. Refused unless asked for."""
    import soundfile as sf

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"c{i}.wav"))
        sf.write(paths[-1], synth_music(1.0 + 0.25 * i, 16000, seed=i).T, 16000)
    with pytest.raises(ConfigError, match="allow_audio_paths=True"):
        score_and_build_pairs(fast_checkpoint, ["p"], [paths], tie_tolerance=0.0)
    ds, stats = score_and_build_pairs(
        fast_checkpoint, ["p"], [paths], tie_tolerance=0.0, allow_audio_paths=True
    )
    assert stats.pairs == len(ds) == 1 and {ds["chosen"][0], ds["rejected"][0]} <= set(paths)


def test_pairs_cli_refuses_bare_paths_and_decodes_token_ids(fast_checkpoint, tmp_path, capsys):
    import soundfile as sf
    from datasets import load_from_disk

    note_lm = _note_lm()
    tok = note_lm.build_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    for i in range(4):
        sf.write(tmp_path / f"c{i}.wav", synth_music(1.0 + 0.25 * i, 16000, seed=i).T, 16000)
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "p", "candidates": ["c0.wav", "c1.wav"]}) + "\n")
    phrases = ["C4 E4 G4 C5", "D4 D4 D4 D4"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in phrases]
    with_ids = tmp_path / "ids.jsonl"
    with_ids.write_text(
        json.dumps(
            {
                "prompt": "<calm>",
                "candidates": [
                    {"audio": "c2.wav", "completion": ids[0]},
                    {"audio": "c3.wav", "completion": ids[1]},
                ],
            }
        )
        + "\n"
    )

    def argv(f, out):
        base = ["pairs", "--model", str(fast_checkpoint), "--candidates", str(f)]
        return [*base, "--out", str(tmp_path / out), "--tie-tolerance", "0"]

    assert main(argv(bare, "a")) == 1
    err = capsys.readouterr().err
    assert "without a 'completion'" in err and "--allow-audio-paths" in err
    assert not (tmp_path / "a").exists()
    assert main(argv(bare, "a") + ["--allow-audio-paths"]) == 0

    assert main(argv(with_ids, "b")) == 1
    assert "--tokenizer" in capsys.readouterr().err
    assert main(argv(with_ids, "b") + ["--tokenizer", str(tmp_path / "tok")]) == 0
    ds = load_from_disk(str(tmp_path / "b" / "dataset"))
    assert {ds["chosen"][0], ds["rejected"][0]} == set(phrases)


# ----------------------------------------------------------------------------------------------
# the candidates file and `apex-reward pairs`


def _write_candidates(tmp_path):
    import soundfile as sf

    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(6):
        sf.write(audio / f"c{i}.wav", synth_music(1.0 + 0.25 * i, 16000, seed=i).T, 16000)
    (audio / "broken.wav").write_bytes(b"RIFF....not audio")
    lines = [
        json.dumps(
            {"prompt": "calm piano", "candidates": ["audio/c0.wav", "audio/c1.wav", "audio/c2.wav"]}
        ),
        "",
        "{not json",
        json.dumps({"prompt": "drums", "candidates": ["audio/c3.wav"]}),  # one candidate
        json.dumps(
            {
                "prompt": "drums",
                "id": 7,
                "candidates": [
                    {"audio": "audio/c3.wav", "completion": "C4 E4"},
                    {"audio": "audio/c4.wav", "completion": "G4 G4"},
                    {"audio": "audio/broken.wav", "completion": "A4"},
                ],
            }
        ),
        json.dumps(
            {
                "prompt": "x",
                "candidates": [{"audio": "audio/c5.wav", "completion": "C4"}, "audio/c0.wav"],
            }
        ),
        json.dumps({"prompt": "bells", "candidates": ["audio/c5.wav", str(audio / "c0.wav")]}),
    ]
    f = tmp_path / "candidates.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_read_candidates_reports_bad_lines(tmp_path):
    f = _write_candidates(tmp_path)
    groups, bad = read_candidates(f)
    assert [g.line for g in groups] == [1, 5, 7]
    assert [b["line"] for b in bad] == [3, 4, 6]
    assert "invalid JSON" in bad[0]["error"]
    assert "at least 2" in bad[1]["error"]
    assert "for all candidates of a line or for none" in bad[2]["error"]
    assert groups[0].audio[0] == str(tmp_path / "audio" / "c0.wav")  # relative to the file
    assert groups[1].completions == ["C4 E4", "G4 G4", "A4"] and groups[1].id == 7


def test_pairs_cli_end_to_end(fast_checkpoint, tmp_path, capsys):
    from datasets import load_from_disk

    f = _write_candidates(tmp_path)
    out = tmp_path / "out"
    argv = ["pairs", "--model", str(fast_checkpoint), "--candidates", str(f), "--out", str(out)]
    argv.append("--allow-audio-paths")  # lines 1 and 7 give bare audio paths
    assert main(argv + ["--strategy", "all_pairs", "--score", "overall", "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert "line 3: invalid JSON" in err and "broken.wav" in err
    ds = load_from_disk(str(out / "dataset"))
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(ds) == len(rows) == stats["pairs"] > 0
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin"} <= set(
        ds.column_names
    )
    assert [b["line"] for b in stats["bad_lines"]] == [3, 4, 6]
    assert stats["failed_candidates"] == 1 and stats["failed"][0]["line"] == 5
    assert stats["options"]["strategy"] == "all_pairs" and stats["untrained_model"] is True
    assert stats["options"]["model"]["dtype"] == "fp32"  # the shared model options
    assert len(scores) == 3 + 3 + 2
    # scores are the model's own, and every pair is consistent with them
    model = ApexRewardModel.from_pretrained(fast_checkpoint)
    c0 = model.score([str(tmp_path / "audio" / "c0.wav")])[0].scores["overall"]
    assert [s["value"] for s in scores if s["path"].endswith("c0.wav")] == [c0, c0]
    for r in rows:
        assert r["score_chosen"] > r["score_rejected"]
        assert r["margin"] == pytest.approx(r["score_chosen"] - r["score_rejected"])
    # the line with completions puts them in chosen/rejected, the paths in *_audio columns
    drums = [r for r in rows if r["prompt"] == "drums"]
    assert len(drums) == 1 and {drums[0]["chosen"], drums[0]["rejected"]} == {"C4 E4", "G4 G4"}
    assert drums[0]["chosen_audio"].endswith(("c3.wav", "c4.wav"))
    assert ds.to_list() == rows

    # an existing dataset is not replaced without --overwrite; --strict fails on bad input
    assert main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--strict"]) == 1
    assert main(argv + ["--overwrite", "--weights", '{"overall": 1.0, "clarity": 0.1}']) == 0
    assert json.loads((out / "stats.json").read_text())["options"]["weights"] == {
        "overall": 1.0,
        "clarity": 0.1,
    }


def test_out_of_range_candidate_is_listed_as_a_failed_candidate(fast_checkpoint, tmp_path, capsys):
    """A candidate that decodes but cannot be scored (float audio at 1e38; it used to score NaN)
    is counted in failed_candidates and listed in `failed` (and fails --strict); scores.jsonl
    stays valid JSON."""
    import soundfile as sf

    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(4):
        sf.write(audio / f"c{i}.wav", synth_music(1.0 + 0.25 * i, 16000, seed=i).T, 16000)
    loud = synth_music(1.5, 16000, seed=9).T.astype(np.float32)
    sf.write(audio / "huge.wav", loud / np.abs(loud).max() * 1e38, 16000, subtype="FLOAT")
    huge = str(audio / "huge.wav")

    f = tmp_path / "candidates.jsonl"
    f.write_text(
        json.dumps(
            {"prompt": "a", "candidates": ["audio/c0.wav", "audio/c1.wav", "audio/huge.wav"]}
        )
        + "\n"
        + json.dumps({"prompt": "b", "candidates": ["audio/c2.wav", "audio/c3.wav"]})
        + "\n"
    )
    out = tmp_path / "out"
    argv = ["pairs", "--model", str(fast_checkpoint), "--candidates", str(f), "--out", str(out)]
    argv.append("--allow-audio-paths")
    assert main(argv + ["--strategy", "all_pairs", "--tie-tolerance", "0", "--strict"]) == 1
    assert f"line 1: {huge}: AudioRangeError" in capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["failed_candidates"] == len(stats["failed"]) == 1
    (failed,) = stats["failed"]
    assert failed["audio"] == huge and failed["error_type"] == "AudioRangeError"
    assert "peak |sample| is 1e+38" in failed["error"]

    def no_nan(token):
        raise AssertionError(f"{token} in scores.jsonl is not valid JSON")

    scores = [
        json.loads(line, parse_constant=no_nan)
        for line in (out / "scores.jsonl").read_text().splitlines()
    ]
    row = next(r for r in scores if r["path"] == huge)
    assert row["value"] is None and row["error_type"] == "AudioRangeError"
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == stats["pairs"] == 2  # c0 vs c1 and c2 vs c3: huge.wav is in none
    assert all(huge not in (r["chosen"], r["rejected"]) for r in rows)


def test_overwrite_keeps_the_old_outputs_when_writing_the_new_ones_fails(
    fast_checkpoint, tmp_path, monkeypatch
):
    """--overwrite used to delete OUT/dataset before saving the new one: a failed save (here: the
    disk fills up halfway through) lost it. The new outputs are now staged next to the old ones
    and moved into place only when all of them are complete."""
    import datasets
    import soundfile as sf

    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(4):
        sf.write(audio / f"c{i}.wav", synth_music(1.0 + 0.25 * i, 16000, seed=i).T, 16000)
    old_f, new_f = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old_f.write_text(json.dumps({"prompt": "old", "candidates": ["audio/c0.wav", "audio/c1.wav"]}))
    new_f.write_text(json.dumps({"prompt": "new", "candidates": ["audio/c2.wav", "audio/c3.wav"]}))
    out = tmp_path / "out"
    outputs = ["dataset", "pairs.jsonl", "scores.jsonl", "stats.json"]

    def argv(f):
        return [
            *("pairs", "--model", str(fast_checkpoint), "--candidates", str(f), "--out", str(out)),
            "--allow-audio-paths",
        ]

    assert main(argv(old_f) + ["--tie-tolerance", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == outputs
    before = {n: (out / n).read_bytes() for n in outputs[1:]}
    old_rows = datasets.load_from_disk(str(out / "dataset")).to_list()
    assert [r["prompt"] for r in old_rows] == ["old"]

    real_save = datasets.Dataset.save_to_disk

    def save_then_disk_full(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)  # a partly written dataset is left behind ...
        raise OSError(28, "No space left on device")  # ... and the save fails

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        main(argv(new_f) + ["--tie-tolerance", "0", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == outputs  # no temporary left behind
    assert datasets.load_from_disk(str(out / "dataset")).to_list() == old_rows
    assert {n: (out / n).read_bytes() for n in outputs[1:]} == before

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    assert main(argv(new_f) + ["--tie-tolerance", "0", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == outputs
    new_rows = datasets.load_from_disk(str(out / "dataset")).to_list()
    assert [r["prompt"] for r in new_rows] == ["new"]
    assert [json.loads(x)["prompt"] for x in (out / "pairs.jsonl").read_text().splitlines()] == [
        "new"
    ]
    assert json.loads((out / "stats.json").read_text())["options"]["candidates"] == str(new_f)


def test_pairs_cli_errors(fast_checkpoint, tmp_path, capsys):
    assert main(["pairs", "--candidates", "x.jsonl", "--out", str(tmp_path)]) == 1
    assert "--model is required" in capsys.readouterr().err
    assert (
        main(
            [
                "pairs",
                "--model",
                str(fast_checkpoint),
                "--candidates",
                str(tmp_path / "no.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "cannot read candidates file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pairs", "--model", "m", "--candidates", "c", "--out", "o", "--strategy", "random"])
    cfg = tmp_path / "pairs.json"  # options from a --config file, flags override it
    cfg.write_text(json.dumps({"model": str(fast_checkpoint), "strategy": "best", "top_k": 2}))
    assert main(["pairs", "--config", str(cfg), "--candidates", "c", "--out", "o"]) == 1
    assert "strategy" in capsys.readouterr().err


def test_readme_pairs_usage_matches_the_parser():
    parser = build_parser("pairs")
    sub = next(a for a in parser._actions if a.dest == "command").choices["pairs"]
    flags = {opt for a in sub._actions for opt in a.option_strings}
    readme = (REPO / "README.md").read_text()
    blocks, current = [], None
    for line in readme.splitlines():  # fenced code blocks
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    usage = [b for b in blocks if b.startswith("apex-reward pairs ")]
    assert len(usage) == 1
    documented = set(re.findall(r"--[a-z][a-z-]+", usage[0]))
    assert {"--model", "--candidates", "--out", "--strategy", "--weights"} <= documented
    assert documented <= flags, documented - flags
    help_text = sub.format_help()
    for flag in ("--strategy", "--min-margin", "--top-k", "--weights", "--strict"):
        assert flag in help_text


def test_missing_datasets_names_the_extra(monkeypatch):
    import sys

    from apex_reward.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'apex-reward\[trl\]'"):
        build_preference_pairs(["p"], [["a", "b"]], [[1.0, 0.0]])
