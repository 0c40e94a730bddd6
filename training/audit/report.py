"""The audit's outputs: percentiles, the SNR-ladder check, ``report.md`` and the plots.

Everything here works on plain numbers (the JSON-able summary built by :mod:`.job`), so the
report can be rebuilt from ``report.json`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .uncertainty import uncertainty_markdown

__all__ = [
    "percentile_of",
    "snr_ladder",
    "report_markdown",
    "summary_paragraph",
    "plot_probes",
    "plot_snr_ladder",
    "plot_attack",
]


def percentile_of(value: float, reference: Sequence[float]) -> float:
    """Percentile rank of ``value`` in ``reference``, 0–100: the share of reference values
    below it, ties counted half (``scipy.stats.percentileofscore(kind="mean")``)."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.size == 0:
        raise ValueError("percentile_of: empty reference")
    below = float(np.sum(ref < value))
    equal = float(np.sum(ref == value))
    return 100.0 * (below + 0.5 * equal) / ref.size


def snr_ladder(
    clean: dict[str, float], noisy: dict[str, dict[float, float]], levels: Sequence[float]
) -> dict[str, Any]:
    """Is the reward non-increasing as the SNR drops (clean, then ``levels`` in order)?

    Args:
        clean: ``{clip: raw reward of the clean clip}``.
        noisy: ``{clip: {snr_db: raw reward}}``.
        levels: SNR levels in dB, from high to low.

    Returns:
        ``{"levels", "per_clip": {clip: [clean, r(levels[0]), ...]}, "mean": [...],
        "monotone_per_clip": {clip: bool}, "monotone_mean": bool, "monotone_all": bool,
        "largest_rise": float}`` (``largest_rise``: the biggest reward increase between
        neighbouring rungs, over all clips; <= 0 when every ladder is monotone).
    """
    per_clip = {c: [clean[c]] + [noisy[c][lv] for lv in levels] for c in clean if c in noisy}
    if not per_clip:
        return {
            "levels": ["clean", *levels],
            "per_clip": {},
            "mean": [],
            "monotone_per_clip": {},
            "monotone_mean": None,
            "monotone_all": None,
            "largest_rise": None,
        }
    rows = np.array(list(per_clip.values()), dtype=np.float64)
    mean = rows.mean(axis=0)
    rises = np.diff(rows, axis=1)
    return {
        "levels": ["clean", *levels],
        "per_clip": per_clip,
        "mean": mean.tolist(),
        "monotone_per_clip": {c: bool(np.all(np.diff(r) <= 0)) for c, r in per_clip.items()},
        "monotone_mean": bool(np.all(np.diff(mean) <= 0)),
        "monotone_all": bool(np.all(rises <= 0)),
        "largest_rise": float(rises.max()),
    }


# ----------------------------------------------------------------------------------------------
# Markdown


def _f(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _flags_cell(checks: Sequence[str], flagged: bool, policy: str) -> str:
    if not checks:
        return "—"
    text = ", ".join(checks)
    return text if flagged else f"(would flag: {text})" if policy == "off" else text


def _steps(s: int | None) -> str:
    return "never" if s is None else str(s)


def summary_paragraph(summary: dict[str, Any]) -> str:
    """One paragraph: the verdict and the key figures (printed on stderr by the command)."""
    v = summary["verdict"]
    ref = summary["reference"]
    snr = summary["ladders"]["snr"]
    parts = [
        f"audit of {summary['model']} under guard policy '{summary['policy']}' "
        f"({summary['policy_source']}): {'FAIL' if v['exit_status'] else 'pass'}.",
        f"{len(v['failing_probes'])} of {v['counted_probes']} non-music probes score above the "
        f"reference median ({_f(ref['median'])}; {ref['count']} reference clips, {ref['kind']}) "
        "without a flag"
        + (f" ({', '.join(v['failing_probes'])})" if v["failing_probes"] else "")
        + f"; {v['unflagged_counted']} of the {v['counted_probes']} are not flagged at all.",
    ]
    if snr["monotone_all"] is not None:
        parts.append(
            f"SNR ladder: reward non-increasing as SNR drops for "
            f"{sum(snr['monotone_per_clip'].values())}/{len(snr['monotone_per_clip'])} clips, "
            f"on average {'yes' if snr['monotone_mean'] else 'NO'}."
        )
    raised = [p for p in summary["probes"] if p["name"] in set(v["transforms_above_clean"])]
    if raised:
        top = max(raised, key=lambda p: p["delta_vs_clean"])
        parts.append(
            f"{len(raised)} transforms of reference clips score above the clean clip (largest: "
            f"{top['name']}, {top['delta_vs_clean']:+.4f})."
        )
    for run in summary["attack"]["runs"]:
        steps = summary["attack"]["steps"]
        beat = run["steps_to_beat"]
        when = (
            f"never beats the best reference ({_f(run['target'])}) in {steps} steps"
            if beat is None
            else f"beats the best reference ({_f(run['target'])}) after {beat} of {steps} steps "
            f"(with no check raised: {_steps(run['steps_to_beat_unflagged'])})"
        )
        parts.append(
            f"Attack from {run['start']}: {when}; final reward {_f(run['final_reward'])}"
            + (f" ({', '.join(run['final_checks'])})" if run["final_checks"] else "")
            + "."
        )
    if summary.get("untrained"):
        parts.append("The model is UNTRAINED: its rewards say nothing about music.")
    parts.append(f"Wall time {summary['seconds']['total']:.0f} s; report in {summary['out']}.")
    return " ".join(parts)


def report_markdown(summary: dict[str, Any]) -> str:
    """``report.md``: the verdict, the reference set, the probes, the ladders, the attack."""
    ref = summary["reference"]
    v = summary["verdict"]
    policy = summary["policy"]
    lines = ["# Reward-hacking audit", ""]
    if summary.get("untrained"):
        lines += ["**The audited model is UNTRAINED: these numbers say nothing about music.**", ""]
    lines += [
        f"Model `{summary['model']}`, guard policy **{policy}** ({summary['policy_source']}); "
        f"floor under penalize {_f(summary['floor'])}. Exit status **{v['exit_status']}** "
        f"({'FAIL' if v['exit_status'] else 'pass'}).",
        "",
        summary_paragraph(summary),
        "",
        "## Reference",
        "",
    ]
    if ref["kind"] == "synthetic":
        lines += [
            f"**No --reference given: the reference is {ref['count']} SYNTHETIC procedural songs** "
            "(clean, 10–15 s at 24 kHz). Percentiles against them say little about real music; "
            "pass real clips with --reference.",
            "",
        ]
    else:
        lines += [f"{ref['count']} clips from {', '.join(ref['paths'])}.", ""]
    if ref["cut"]:
        lines += [
            f"{ref['cut']} clip(s) longer than {summary['config']['max_reference_seconds']:g} s "
            "were cut to their first "
            f"{summary['config']['max_reference_seconds']:g} s.",
            "",
        ]
    if ref["skipped"]:
        lines += [f"{len(ref['skipped'])} file(s) skipped (unreadable or too short):", ""]
        lines += [f"- `{s['path']}`: {s['error']}" for s in ref["skipped"]] + [""]
    lines += [
        f"Reward under the policy: min {_f(ref['min'])}, median {_f(ref['median'])}, best "
        f"{_f(ref['best'])}.",
        "",
        "| clip | seconds | raw reward | reward | checks |",
        "|---|---:|---:|---:|---|",
    ]
    for c in ref["clips"]:
        lines.append(
            f"| {c['name']} | {c['duration_s']:.1f} | {_f(c['raw_reward'])} | {_f(c['reward'])} | "
            f"{_flags_cell(c['checks'], c['flagged'], policy)} |"
        )
    lines += [
        "",
        "## Static probes",
        "",
        "Percentile: the probe's reward (under the policy) in the reference distribution. "
        "**Non-music** probes (counted: an unflagged one above the median fails the audit) come "
        "first; then transforms of reference clips, with the change against the clean clip "
        "(Δ raw). Probes are mono at 24 kHz.",
        "",
        "| probe | kind | counted | raw reward | reward | percentile | Δ raw vs clean | flags | "
        "OOD | spread | verdict |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for p in summary["probes"]:
        if p["kind"] == "clean":
            continue
        verdict = "FAIL" if p["failing"] else ("above median" if p["above_median"] else "")
        lines.append(
            f"| {p['name']} | {p['kind']} | {'yes' if p['counts'] else 'no'} | "
            f"{_f(p['raw_reward'])} | {_f(p['reward'])} | {p['percentile']:.0f} | "
            f"{_f(p['delta_vs_clean'], 4) if p['delta_vs_clean'] is not None else ''} | "
            f"{_flags_cell(p['checks'], p['flagged'], policy)} | "
            f"{_f(p.get('ood'), 0)} | {_f(p.get('reward_std'), 4)} | {verdict} |"
        )
    raised = v["transforms_above_clean"]
    lines += [
        "",
        "Transforms that raise the raw reward of their clean clip (by more than 1e-4): "
        + (", ".join(f"`{n}`" for n in raised) if raised else "none")
        + ". A degradation (noise, low-pass, quantisation, clipping) should not raise it.",
    ]
    lines += ["", "![probes](probes.png)", ""] + uncertainty_markdown(summary)
    lines += ["## Ladders", "", "### SNR (white noise)", ""]
    snr = summary["ladders"]["snr"]
    if snr["per_clip"]:
        header = " | ".join(str(lv) if lv == "clean" else f"{lv:g} dB" for lv in snr["levels"])
        lines += [
            f"Raw reward as the SNR drops. Non-increasing on average: "
            f"**{'yes' if snr['monotone_mean'] else 'NO'}**; for every clip: "
            f"**{'yes' if snr['monotone_all'] else 'NO'}** (largest rise between neighbouring "
            f"rungs {_f(snr['largest_rise'])}).",
            "",
            f"| clip | {header} | monotone |",
            "|---|" + "---:|" * len(snr["levels"]) + "---|",
        ]
        for c, row in snr["per_clip"].items():
            cells = " | ".join(_f(r) for r in row)
            lines.append(f"| {c} | {cells} | {'yes' if snr['monotone_per_clip'][c] else 'NO'} |")
        lines.append(
            f"| **mean** | {' | '.join(_f(r) for r in snr['mean'])} | "
            f"{'yes' if snr['monotone_mean'] else 'NO'} |"
        )
    lines += ["", "![SNR ladder](snr_ladder.png)", "", "### Gain", ""]
    gain = summary["ladders"]["gain"]
    if gain["points"]:
        lines += [
            f"Clip `{gain['clip']}`, hard-clipped to ±1 after the gain.",
            "",
            "| gain | raw reward | reward | flags |",
            "|---:|---:|---:|---|",
        ]
        for g in gain["points"]:
            lines.append(
                f"| {g['db']:+g} dB | {_f(g['raw_reward'])} | {_f(g['reward'])} | "
                f"{_flags_cell(g['checks'], g['flagged'], policy)} |"
            )
    a = summary["attack"]
    lines += [
        "",
        "## Gradient attack",
        "",
        f"Adam on the waveform (lr {a['lr']:g}, {a['steps']} steps, {a['seconds']:.1f} s at "
        f"24 kHz, samples projected to [-1, 1]) maximising the reward under policy {policy}; "
        f"target: the best reference clip ({_f(a['target'])}).",
        "",
        "| start | reward at 0 | final raw | final reward | final flags | steps to beat | "
        "unflagged |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for run in a["runs"]:
        lines.append(
            f"| {run['start']} | {_f(run['trajectory'][0]['reward'])} | "
            f"{_f(run['final_raw_reward'])} | {_f(run['final_reward'])} | "
            f"{_flags_cell(run['final_checks'], run['final_flagged'], policy)} | "
            f"{_steps(run['steps_to_beat'])} | {_steps(run['steps_to_beat_unflagged'])} |"
        )
    lines += ["", "![attack](attack.png)", ""]
    s = summary["seconds"]
    lines += [
        "## Time",
        "",
        f"Total {s['total']:.1f} s (load {s['load']:.1f}, reference {s['reference']:.1f}, probes "
        f"{s['probes']:.1f}, attack {s['attack']:.1f}).",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_probes(summary: dict[str, Any], path: Path) -> None:
    """Every probe's reward (under the policy) against the reference distribution."""
    plt = _pyplot()
    ref = summary["reference"]
    probes = [p for p in summary["probes"] if p["kind"] != "clean"]
    fig, ax = plt.subplots(figsize=(8, 2.0 + 0.22 * (len(probes) + 1)))
    ys = np.arange(len(probes))
    ref_rewards = [c["reward"] for c in ref["clips"]]
    ax.axvspan(min(ref_rewards), max(ref_rewards), color="0.9", label="reference range")
    ax.axvline(ref["median"], color="k", lw=1, label="reference median")
    ax.scatter(
        ref_rewards, [-1] * len(ref_rewards), marker="|", s=200, color="k", label="reference clips"
    )
    colours = [
        "tab:red" if p["failing"] else ("tab:green" if p["flagged"] else "tab:blue") for p in probes
    ]
    ax.scatter([p["reward"] for p in probes], ys, c=colours, s=18, zorder=3)
    ax.set_yticks([-1, *ys.tolist()], ["reference", *[p["name"] for p in probes]], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(f"reward (policy {summary['policy']})")
    ax.set_title("probes: red = fails (unflagged, above median), green = flagged")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_snr_ladder(summary: dict[str, Any], path: Path) -> None:
    """Raw reward of every probe clip, and their mean, as the SNR drops."""
    plt = _pyplot()
    snr = summary["ladders"]["snr"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = np.arange(len(snr["levels"]))
    for clip, row in snr["per_clip"].items():
        ax.plot(xs, row, marker="o", lw=1, alpha=0.6, label=clip)
    if snr["mean"]:
        ax.plot(xs, snr["mean"], color="k", lw=2.5, marker="s", label="mean")
    ax.set_xticks(xs, [str(lv) if lv == "clean" else f"{lv:g} dB" for lv in snr["levels"]])
    ax.set_xlabel("SNR (white noise)")
    ax.set_ylabel("raw reward")
    ax.set_title("SNR ladder")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attack(summary: dict[str, Any], path: Path) -> None:
    """The attack's reward (under the policy, solid; raw, dashed) per step, and the target."""
    plt = _pyplot()
    a = summary["attack"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in a["runs"]:
        steps = [p["step"] for p in run["trajectory"]]
        (line,) = ax.plot(steps, [p["reward"] for p in run["trajectory"]], label=run["start"])
        ax.plot(
            steps, [p["raw_reward"] for p in run["trajectory"]], ls="--", color=line.get_color()
        )
    ax.axhline(a["target"], color="k", lw=1, label="best reference")
    ax.axhline(summary["reference"]["median"], color="0.5", lw=1, ls=":", label="reference median")
    ax.set_xlabel("Adam step")
    ax.set_ylabel(f"reward (policy {summary['policy']}; dashed: raw)")
    ax.set_title("gradient attack on the waveform")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
