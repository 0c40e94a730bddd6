"""How the OOD flag and the ensemble spread see the audit's probes against held-out songs.

On a checkpoint trained with OOD statistics (any ``train`` export), preferably an ensemble
(``train --ensemble K``), and the embeddings store + ``prepared.parquet`` it was trained on:

* held-out songs of the training distribution: the test split, scored from the store (the same
  features the model computes from audio), and the training split for reference;
* the audit's counted static probes (``training/audit/probes.py``): the non-music signal probes
  and 2 s loops of the audit's synthetic reference songs (the audit without ``--reference``);
* optionally real clips (``--audio-dir``), which a model trained on synthetic songs has never seen.

Prints, per group, the share the ``ood`` flag fires on, the median OOD percentile and (ensembles)
the median standard deviation of the reward over the heads, and the ratio probes / held-out. With
``--single`` (the metrics.json of a single-head run on the same data) it also prints the ensemble
mean's and the single head's test metrics side by side.

    python benchmarks/ood_ensemble_demo.py --model runs/ens/model --embeddings runs/demo/embeddings \
        --prepared runs/demo/prepared/prepared.parquet --single runs/single/metrics.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from apex_reward import ApexRewardModel
from apex_reward.ood import beyond_threshold, needs_dynamics


def _group(model: ApexRewardModel, out) -> dict[str, float | None]:
    beyond = beyond_threshold(model, out) or []
    return {
        "n": len(beyond),
        "ood_flagged": float(np.mean(beyond)) if beyond else None,
        "median_ood": float(out.ood.median()) if out.ood is not None else None,
        "median_reward_std": float(out.std["reward"].median()) if out.std is not None else None,
    }


def _from_store(model: ApexRewardModel, store, ids: list[str], paths: dict[str, str]):
    if needs_dynamics(model):  # the store lacks the frames' dynamics: encode the audio again
        from apex_reward.audio import load_audio

        waves, rates = zip(*(load_audio(paths[i]) for i in ids))
        return _from_audio(model, list(waves), [int(r) for r in rates])
    with torch.inference_mode():
        return model.predict_from_features(store.segments(ids))


def _from_audio(model: ApexRewardModel, waves: list[torch.Tensor], rate: int | list[int]):
    outs = []
    rates = rate if isinstance(rate, list) else [rate] * len(waves)
    with torch.inference_mode():
        for i in range(0, len(waves), 8):
            outs.append(model(waves[i : i + 8], rates[i : i + 8], guard="off"))
    from apex_reward.model import ApexOutput

    return ApexOutput(
        scores={k: torch.cat([o.scores[k] for o in outs]) for k in outs[0].scores},
        reward=torch.cat([o.reward for o in outs]),
        ood=None if outs[0].ood is None else torch.cat([o.ood for o in outs]),
        ood_distance=None
        if outs[0].ood_distance is None
        else torch.cat([o.ood_distance for o in outs]),
        std=None
        if outs[0].std is None
        else {k: torch.cat([o.std[k] for o in outs]) for k in outs[0].std},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--embeddings", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--single", default=None, help="metrics.json of a single-head run")
    p.add_argument("--audio-dir", default=None)
    p.add_argument("--probe-seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pandas as pd

    from apex_reward.audio import load_audio
    from apex_reward.training.audit.probes import (
        PROBE_RATE,
        clip_probes,
        signal_probes,
        synthetic_reference_clips,
        to_probe_rate,
    )
    from apex_reward.training.embeddings import EmbeddingStore

    model = ApexRewardModel.from_pretrained(args.model)
    store = EmbeddingStore(args.embeddings)
    prepared = pd.read_parquet(args.prepared)
    have = set(store.song_ids)
    split_ids = {
        s: [i for i in prepared.loc[prepared["split"] == s, "id"] if i in have]
        for s in ("train", "val", "test")
    }
    paths = dict(zip(prepared["id"], prepared["audio_path"]))
    rows = {
        "training songs": _group(model, _from_store(model, store, split_ids["train"], paths)),
        "held-out songs (val split)": _group(
            model, _from_store(model, store, split_ids["val"], paths)
        ),
        "held-out songs (test split)": _group(
            model, _from_store(model, store, split_ids["test"], paths)
        ),
    }
    # the audit without --reference: 8 synthetic songs; its counted probes: signals + 2 s loops of
    # the 4 best-scoring reference clips
    clips = synthetic_reference_clips(8, seed=0)
    ref_out = _from_audio(model, [c.waveform for c in clips], PROBE_RATE)
    best = np.argsort(-ref_out.reward.numpy(), kind="stable")[:4]
    probes = signal_probes(args.probe_seconds, seed=0) + [
        q
        for q in clip_probes(
            [(clips[i].name, to_probe_rate(clips[i])) for i in best],
            probe_seconds=args.probe_seconds,
            loop_seconds=2.0,
            seed=0,
        )
        if q.counts
    ]
    probe_out = _from_audio(model, [q.waveform for q in probes], PROBE_RATE)
    rows["audit reference songs (synthetic)"] = _group(model, ref_out)
    rows["audit static probes (counted)"] = _group(model, probe_out)
    beyond = beyond_threshold(model, probe_out) or [None] * len(probes)
    per_probe = [
        (
            q.name,
            b,
            None if probe_out.ood is None else float(probe_out.ood[i]),
            None if probe_out.std is None else float(probe_out.std["reward"][i]),
        )
        for i, (q, b) in enumerate(zip(probes, beyond))
    ]
    if args.audio_dir:
        files = sorted(
            f for f in Path(args.audio_dir).iterdir() if f.suffix.lower() in (".wav", ".flac")
        )
        waves, rates = [], []
        for f in files:
            w, sr = load_audio(f, max_duration_s=30.0)
            waves.append(w[..., : int(30 * sr)])
            rates.append(int(sr))
        rows[f"real clips ({args.audio_dir})"] = _group(model, _from_audio(model, waves, rates))

    cfg = model.config
    print(
        f"model {args.model}: {cfg.ensemble_size} head(s), OOD statistics of "
        f"{cfg.ood.fitted_on.get('songs')} songs ({cfg.ood.features} features, flag above the "
        f"{cfg.ood.flag_percentile}th percentile"
        + (" and below the lower one)" if cfg.ood.lower_tail else ")")
    )
    print("| group | n | OOD flag | median OOD percentile | median reward std |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        flag = "n/a" if r["ood_flagged"] is None else f"{100 * r['ood_flagged']:.1f} %"
        ood = "n/a" if r["median_ood"] is None else f"{r['median_ood']:.1f}"
        std = "n/a" if r["median_reward_std"] is None else f"{r['median_reward_std']:.4f}"
        print(f"| {name} | {r['n']} | {flag} | {ood} | {std} |")
    held = rows["held-out songs (test split)"]["median_reward_std"]
    prb = rows["audit static probes (counted)"]["median_reward_std"]
    if held and prb:
        print(f"\nreward std ratio, probes / held-out songs (medians): {prb / held:.2f}")
    print("\n| probe | ood flag | OOD percentile | reward std |\n|---|---|---:|---:|")
    for name, b, o, s in per_probe:
        print(
            f"| {name} | {b} | {o if o is None else f'{o:.0f}'} | {s if s is None else f'{s:.4f}'} |"
        )
    if args.single:
        ens = json.loads((Path(args.model).parent / "metrics.json").read_text())["metrics"]["test"]
        single = json.loads(Path(args.single).read_text())["metrics"]["test"]
        print("\n| task | single MSE | mean MSE | single Pearson | mean Pearson |")
        print("|---|---:|---:|---:|---:|")
        for t in ens:
            print(
                f"| {t} | {single[t]['mse']:.4g} | {ens[t]['mse']:.4g} | "
                f"{single[t]['pearson']:.3f} | {ens[t]['pearson']:.3f} |"
            )
        mp = statistics.mean(m["pearson"] for m in ens.values())
        sp = statistics.mean(m["pearson"] for m in single.values())
        print(f"\nmean Pearson over tasks: single {sp:.3f}, ensemble mean {mp:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
