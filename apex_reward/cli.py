"""The ``apex-reward`` command line.

One command with subcommands. Each subcommand lives next to the code it drives and is imported
only when it is the one being run, so ``apex-reward score`` never imports the trainer or server.
Bad input is reported per item; expected failures (missing files, invalid configs) print one line
on stderr without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import ApexError, ConfigError

logger = logging.getLogger("apex_reward")


@dataclass(frozen=True)
class Command:
    """One ``apex-reward`` subcommand, defined in the module it drives.

    ``add_arguments(parser)`` adds its flags; ``run(args)`` runs it and returns the exit status.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: Every subcommand, in ``--help`` order, as ``"module:attribute"`` of its :class:`Command`.
#: The modules are imported when the command line runs, never by ``import apex_reward``.
COMMANDS: tuple[str, ...] = (
    "apex_reward.cli:INIT",
    "apex_reward.cli:SCORE",
    "apex_reward.cli:COMPARE",
    "apex_reward.publish:COMMAND",
    "apex_reward.training.synthetic:COMMAND",
    "apex_reward.training.prepare:COMMAND",
    "apex_reward.training.extract:COMMAND",
    "apex_reward.training.label:COMMAND",
    "apex_reward.training.trainer.command:COMMAND",
    "apex_reward.training.grid:COMMAND",
    "apex_reward.training.demo:COMMAND",
    "apex_reward.training.arena.command:COMMAND",
    "apex_reward.training.audit.command:COMMAND",
    "apex_reward.training.recipe:COMMAND",
    "apex_reward.training.calibrate:COMMAND",
    "apex_reward.training.ood_stats:COMMAND",
    "apex_reward.integrations.pairs_job:COMMAND",
    "apex_reward.integrations.serving.command:COMMAND",
)


def load_commands() -> list[Command]:
    """Import every command's module and return the :class:`Command` objects in order."""
    commands = []
    for target in COMMANDS:
        module, _, attribute = target.partition(":")
        commands.append(getattr(importlib.import_module(module), attribute))
    return commands


# ----------------------------------------------------------------------------------------------
# shared helpers


def model_from_args(args: argparse.Namespace):
    """Load the model named by the ``ModelOptions`` flags of a command (see :func:`load_model`)."""
    from .dataclass_io import dataclass_from_args
    from .loading import ModelOptions, load_model

    return load_model(dataclass_from_args(ModelOptions, args))


def add_guard_argument(p: argparse.ArgumentParser, default: str) -> None:
    """``--guard off|flag|penalize`` (see :mod:`apex_reward.guard`) with this command's default."""
    p.add_argument(
        "--guard",
        choices=("off", "flag", "penalize"),
        default=default,
        help="reward guards: off = no signal checks; flag = report signals and flags next to "
        "the scores; penalize = also give a flagged clip the floor reward "
        f"(default: {default})",
    )


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    from .dataclass_io import add_dataclass_arguments
    from .loading import ModelOptions

    add_dataclass_arguments(p, ModelOptions, config_flag=False)
    # the model is required by every command that takes these flags
    for action in p._actions:
        if action.dest == "model":
            action.required = True


# ----------------------------------------------------------------------------------------------
# init


def add_init_arguments(p: argparse.ArgumentParser) -> None:
    from .presets import ENCODER_PRESETS

    p.add_argument(
        "--preset", required=True, choices=sorted(ENCODER_PRESETS), help="encoder preset"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
    p.add_argument(
        "--encoder",
        default=None,
        metavar="ID_OR_PATH",
        help="MERT weights: hub id or local directory (default: the preset's hub id)",
    )
    p.add_argument(
        "--revision", default=None, help="hub revision of the encoder (commit hash recommended)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for the random head (and tiny encoder) weights"
    )
    p.add_argument("--trunk-layers", type=int, choices=(2, 3), default=2, help="shared trunk depth")
    p.add_argument("--tasks", choices=("full", "popularity"), default="full", help="task heads")
    p.add_argument("--mode", choices=("song", "segment"), default="song", help="input mode")
    p.add_argument(
        "--include-encoder",
        action="store_true",
        help="store the encoder weights in the checkpoint (always done for the random tiny encoder)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")


def run_init(args: argparse.Namespace) -> int:
    import torch

    from .config import ApexConfig
    from .encoder import looks_like_path
    from .encoders import build_encoder, load_encoder
    from .model import ApexRewardModel

    out = Path(args.out)
    if (out / "config.json").exists() and not args.force:
        raise ApexError(f"{out} already holds a checkpoint; pass --force to overwrite it")
    source = args.encoder if args.encoder is not None else "preset"
    if args.encoder is not None and looks_like_path(args.encoder):
        if not Path(args.encoder).expanduser().is_dir():
            raise ConfigError(f"--encoder {args.encoder}: no such directory")
    config = ApexConfig.from_preset(
        args.preset,
        encoder_source=source,
        revision=args.revision,
        trunk_layers=args.trunk_layers,
        tasks=args.tasks,
        mode=args.mode,
    )
    torch.manual_seed(args.seed)
    if config.encoder.source is None:
        encoder = build_encoder(config.encoder)  # random weights, stored in the checkpoint
    elif args.include_encoder:
        encoder = load_encoder(config.encoder)
    else:
        with torch.device("meta"):  # referenced, not stored: no need to materialise weights
            encoder = build_encoder(config.encoder)
    model = ApexRewardModel(config, encoder)
    model.save_pretrained(
        out, include_encoder=args.include_encoder or config.encoder.source is None
    )
    enc = (
        "random encoder stored in the checkpoint"
        if config.encoder.source is None
        else f"encoder {config.encoder.source}@{config.encoder.revision or 'main'}"
        + (" (stored)" if args.include_encoder else " (referenced)")
    )
    print(f"wrote UNTRAINED {args.preset} model to {out} ({enc})", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# score


def int_at_least(low: int):
    """An argparse ``type`` for integers ``>= low`` (a usage error names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="audio files (WAV, FLAC, Ogg, Opus, MP3), directories (searched recursively), glob "
        'patterns, or .jsonl lists of {"path": ...} objects',
    )
    p.add_argument(
        "--format",
        choices=("jsonl", "csv", "table"),
        default="jsonl",
        help="output format (default: jsonl)",
    )
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=8,
        help="encoder segments (30 s for the MERT presets) per encoder call (default: 8)",
    )
    p.add_argument(
        "--num-workers", type=int_at_least(0), default=2, help="decoding threads (default: 2)"
    )
    p.add_argument(
        "--output", "-o", default=None, metavar="FILE", help="write results here instead of stdout"
    )
    add_guard_argument(p, "flag")
    p.add_argument(
        "--windows",
        action="store_true",
        help="also score time windows (jsonl only): the 30 s segments, or see --window-seconds",
    )
    p.add_argument(
        "--window-seconds",
        type=float,
        default=None,
        metavar="S",
        help="with --windows: windows of S seconds instead of the segments",
    )
    p.add_argument(
        "--window-hop",
        type=float,
        default=None,
        metavar="S",
        help="with --window-seconds: seconds between window starts (default: no overlap)",
    )
    p.add_argument(
        "--condition",
        default=None,
        metavar="VALUE",
        help="a conditioned checkpoint's audience, one of the values it was trained on (e.g. a "
        "platform); default: its learned average",
    )


def _format_table(rows: list[dict[str, Any]], names: Sequence[str]) -> str:
    short = {
        "streams": "strm",
        "likes": "like",
        "coherence": "coh",
        "musicality": "mus",
        "memorability": "mem",
        "clarity": "clar",
        "naturalness": "nat",
        "popularity": "pop",
        "songeval": "seval",
        "overall": "overall",
    }
    header = ["file"] + [short.get(n, n) for n in names] + ["reward", "flags"]
    table = []
    for r in rows:
        name = Path(r["path"]).name if not r["path"].startswith("array[") else r["path"]
        if "error" in r:
            table.append([name, f"ERROR {r['error_type']}: {r['error']}"])
        else:
            s = r["scores"]
            table.append(
                [name]
                + [f"{s[n]:.2f}" if n != "overall" else f"{s[n]:.3f}" for n in names]
                + [f"{r['reward']:.4f}", ",".join(r.get("flags") or []) or "-"]
            )
    ok_rows = [header] + [t for t in table if len(t) == len(header)]
    widths = [max(len(row[i]) for row in ok_rows) for i in range(len(header))]
    widths[0] = max(len(t[0]) for t in [header] + table)
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))
        )
    ]
    for t in table:
        if len(t) == 2 and t[1].startswith("ERROR"):
            lines.append(t[0].ljust(widths[0]) + "  " + t[1])
        else:
            lines.append(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths))
                )
            )
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], names: Sequence[str], fmt: str, stream) -> None:
    """Write score records as jsonl, csv or an aligned table."""
    if fmt == "jsonl":
        for r in rows:
            stream.write(json.dumps(r) + "\n")
    elif fmt == "csv":
        import csv

        w = csv.writer(stream)
        w.writerow(["path", *names, "reward", "flags", "error", "untrained"])
        for r in rows:
            untrained = "true" if r.get("untrained") else "false"
            if "error" in r:
                err = f"{r['error_type']}: {r['error']}"
                w.writerow([r["path"], *[""] * len(names), "", "", err, untrained])
            else:
                flags = ";".join(r.get("flags") or [])
                scores = [r["scores"][n] for n in names]
                w.writerow([r["path"], *scores, r["reward"], flags, "", untrained])
    else:
        stream.write(_format_table(rows, names) + "\n")


def run_score(args: argparse.Namespace) -> int:
    from .inputs import check_output, expand_inputs, write_output, write_stdout

    files = expand_inputs(args.files)
    output = check_output(args.output, files) if args.output else None
    windows = None
    if args.windows:
        from .windows import WindowSpec

        if args.format != "jsonl":
            raise ConfigError(f"--windows needs --format jsonl, not {args.format}")
        windows = WindowSpec(args.window_seconds, args.window_hop)
    elif args.window_seconds is not None or args.window_hop is not None:
        raise ConfigError("--window-seconds and --window-hop need --windows")
    model = model_from_args(args)
    results = model.score(
        files,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=True,
        guard=args.guard,
        windows=windows,
        condition=args.condition,
    )
    rows = []
    for r in results:
        d = r.to_dict()
        if r.duration_s is not None:
            d["duration_s"] = r.duration_s
        if model.untrained:
            d["untrained"] = True
        rows.append(d)
    # file names need not be valid UTF-8: surrogateescape writes them back as their raw bytes
    buffer = io.StringIO()
    if args.format == "table" and model.untrained:
        buffer.write("# UNTRAINED model: scores are not meaningful\n")
    write_results(rows, model.score_names, args.format, buffer)
    # complete or not at all: an existing file is replaced only once the new one is whole, and
    # if it cannot be written the results go to stdout
    written = write_output(output, buffer.getvalue()) if output else write_stdout(buffer.getvalue())
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} inputs failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r.input}: {r.error_type}: {r.error}", file=sys.stderr)
        return 1
    return 0 if written is not False else 1


# ----------------------------------------------------------------------------------------------
# compare


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    p.add_argument("a", metavar="A", help="first audio file")
    p.add_argument("b", metavar="B", help="second audio file")
    p.add_argument(
        "--instrumental",
        action="store_true",
        help="mark the pair as instrumental (used by a fitted preference head)",
    )
    add_guard_argument(p, "flag")


def run_compare(args: argparse.Namespace) -> int:
    import torch

    from .audio import load_audio

    model = model_from_args(args)
    max_s = model.config.frontend.max_duration_s
    wa, sra = load_audio(args.a, max_duration_s=max_s)
    wb, srb = load_audio(args.b, max_duration_s=max_s)
    for path, wav, sr in ((args.a, wa, sra), (args.b, wb, srb)):
        model.frontend.check(wav, sr, path)  # errors name the file, not waveforms[i]
    with torch.inference_mode():
        out = model([wa, wb], [sra, srb], guard=args.guard)
        a_out, b_out = _split_output(out)
        logit = model.preference_logits_from_outputs(
            a_out, b_out, is_instrumental=1.0 if args.instrumental else 0.0
        )
    logit_v = float(logit[0])
    result = {
        "a": args.a,
        "b": args.b,
        "logit": logit_v,
        "probability": float(torch.sigmoid(logit[0])),
        "reward_a": float(out.reward[0]),
        "reward_b": float(out.reward[1]),
        **model.preference_calibration,
    }
    if out.flags is not None:
        result["flags_a"], result["flags_b"] = out.flags
    if model.untrained:
        result["untrained"] = True
    print(json.dumps(result))
    return 0


def _split_output(out):
    from .outputs import ApexOutput

    a = ApexOutput(scores={k: v[:1] for k, v in out.scores.items()}, reward=out.reward[:1])
    b = ApexOutput(scores={k: v[1:] for k, v in out.scores.items()}, reward=out.reward[1:])
    return a, b


INIT = Command("init", "write an untrained APEX model", add_init_arguments, run_init)
SCORE = Command("score", "score audio files", add_score_arguments, run_score)
COMPARE = Command(
    "compare", "P(A > B) and its logit for two audio files", add_compare_arguments, run_compare
)


# ----------------------------------------------------------------------------------------------
# entry point


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s flags are added (the others show their help)."""
    parser = argparse.ArgumentParser(
        prog="apex-reward",
        description="APEX reward model: score music, build preference pairs, train, serve.",
    )
    parser.add_argument("--version", action="version", version=f"apex-reward {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in load_commands():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.name == command:
            cmd.add_arguments(sp)
            sp.set_defaults(_run=cmd.run)
    return parser


def _first_command(argv: Sequence[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``apex-reward``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv and _first_command(argv) is None:
        # answered before the commands (and torch) are imported
        print(f"apex-reward {__version__}")
        return 0
    parser = build_parser(_first_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except ApexError as e:
        print(f"apex-reward {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
