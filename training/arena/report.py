"""``report.md`` of ``apex-reward arena``: the summary of a run as one Markdown page."""

from __future__ import annotations

from typing import Any

__all__ = ["format_number", "report_markdown"]


def format_number(x: Any) -> str:
    """``x`` with three decimals, or ``n/a`` for a missing value."""
    return "n/a" if x is None else f"{x:.3f}"


def report_markdown(summary: dict[str, Any], battles_md: str, main_md: str, rules_md: str) -> str:
    """``report.md``: every number of ``summary`` on one page, with the battle filters
    (``battles_md``), Table 3 (``main_md``) and the rule baseline by score subset (``rules_md``)."""
    s = summary["scoring"]
    lines = ["# Music Arena preference evaluation", ""]
    if summary.get("untrained_model"):
        lines += ["**The scoring model is UNTRAINED: these numbers say nothing about music.**", ""]
    if "synthetic" in summary:
        lines += [
            f"Synthetic arena (hidden preference known): AUC of the true function on the A/B "
            f"battles = {format_number(summary['synthetic']['true_auc'])}.",
            "",
        ]
    lines += ["## Battles", "", battles_md]
    lines += [
        "## Scoring",
        "",
        f"{s['files']} audio files, {s['contents']} distinct contents: {s['cache_hits']} from "
        f"the cache, {s['scored']} scored now, {s['failed']} failed "
        f"(cache: {s['cache_path'] or 'disabled'}; model fingerprint {s['fingerprint'][:12]}).",
        "",
        "## Results (Table 3)",
        "",
        main_md,
        "![ROC](roc.png)",
        "",
        "## Rule baseline by score subset",
        "",
        rules_md,
        "## Calibration of the logistic model",
        "",
        f"Out-of-fold probabilities: ECE {summary['calibration']['ece']:.3f}, Brier "
        f"{summary['calibration']['brier']:.3f}, log loss {summary['calibration']['log_loss']:.3f}.",
        "",
        "![reliability](calibration.png)",
        "",
        "## Preference head (fitted on all battles)",
        "",
        f"{summary['head']['features']} features; torch vs scikit-learn max |Δlogit| "
        f"{summary['head']['max_abs_diff_torch_vs_sklearn']:.2e}; mean |P(A>B) + P(B>A) - 1| "
        f"{summary['head']['order_inconsistency']:.3f} (swap augmentation "
        f"{'on' if summary['head']['swap_augment'] else 'off'}).",
        "",
    ]
    so = summary.get("system_offsets")
    if so:
        cvr = so["cross_validated"]
        lines += [
            "## Per-system offsets",
            "",
            f"Base: {so['base']}; L2 {so['l2']}. Cross-validated log loss "
            f"{cvr['log_loss_without']:.4f} → {cvr['log_loss_with']:.4f}, AUC "
            f"{cvr['auc_without']:.3f} → {cvr['auc_with']:.3f}.",
            "",
            "| system | battles | offset |",
            "|---|---:|---:|",
        ]
        for name, off in sorted(so["offsets"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {so['battles_per_system'].get(name, 0)} | {off:+.3f} |")
        lines.append("")
    if "export" in summary:
        lines += ["## Export", "", f"Written to {summary['export']['checkpoint']}/config.json.", ""]
    return "\n".join(lines)
