"""The ``apex-reward`` command line.

One command with subcommands. Each subcommand lives next to the code it drives and is imported
only when it is the one being run, so ``apex-reward score`` never imports the trainer or server.
Bad input is reported per item; expected failures (missing files, invalid configs) print one line
on stderr without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import ApexError, ConfigError

logger = logging.getLogger("apex_reward")

#: name -> (module, function that adds the arguments, function that runs it, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "init": ("apex_reward.cli", "add_init_arguments", "run_init", "write an untrained APEX model"),
    "score": ("apex_reward.cli", "add_score_arguments", "run_score", "score audio files"),
    "compare": (
        "apex_reward.cli",
        "add_compare_arguments",
        "run_compare",
        "P(A > B) and its logit for two audio files",
    ),
}


def register_command(name: str, module: str, add: str, run: str, help: str) -> None:
    """Register a subcommand implemented in ``module`` (imported lazily)."""
    COMMANDS[name] = (module, add, run, help)


def _extra_commands() -> None:
    # Subcommands provided by apex_reward.training / apex_reward.integrations, each in the module
    # that implements it (which defines add_<name>_arguments and run_<name>). Listed here rather
    # than discovered so that `apex-reward --help` stays instant; a module that is not there yet
    # (or not installed) simply does not add its command.
    extra = {
        "synth": (
            "apex_reward.training.synthetic",
            "generate a synthetic corpus of songs + manifest",
        ),
        "prepare": ("apex_reward.training.prepare", "filter, balance, score and split a manifest"),
        "extract": (
            "apex_reward.training.extract",
            "extract MERT layer embeddings (distributed, resumable)",
        ),
        "train": ("apex_reward.training.trainer", "train APEX heads on extracted embeddings"),
        "grid": (
            "apex_reward.training.grid",
            "run the 24-condition grid and write the paper's tables",
        ),
        "demo": (
            "apex_reward.training.demo",
            "offline end-to-end demo: synthetic corpus -> trained model -> scores",
        ),
        "arena": (
            "apex_reward.training.arena",
            "Music Arena preference evaluation and preference head",
        ),
        "pairs": (
            "apex_reward.integrations.pairs",
            "build DPO preference pairs from scored candidates",
        ),
        "serve": ("apex_reward.integrations.server", "HTTP reward server for RL workers"),
    }
    for name, (module, help) in extra.items():
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and name not in COMMANDS:
            COMMANDS[name] = (module, f"add_{name}_arguments", f"run_{name}", help)


# ----------------------------------------------------------------------------------------------
# shared helpers


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str, device: str | None, encoder: str | None = None, dtype: str = "auto"):
    """Load a checkpoint for a CLI command (eval mode, frozen, on ``device``, ``--dtype``)."""
    from .model import ApexRewardModel

    model = ApexRewardModel.from_pretrained(
        path, device=device or default_device(), encoder_source=encoder
    ).set_precision(dtype)
    if model.untrained:
        print(
            f"warning: {path} is an UNTRAINED model (random heads): its scores show the pipeline "
            "works, they say nothing about the music",
            file=sys.stderr,
        )
    return model


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory or hub id")
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--encoder",
        default=None,
        metavar="ID_OR_PATH",
        help="override where the MERT weights come from (hub id or local directory)",
    )
    p.add_argument("--dtype", **DTYPE_ARGUMENT)


#: ``--dtype`` of every command that runs the encoder (one meaning everywhere: set_precision)
DTYPE_ARGUMENT: dict = {
    "default": "auto",
    "choices": ["auto", "fp32", "fp16", "bf16"],
    "help": "encoder precision: auto = the GPU fast path (fp16 weights, fast kernels) on CUDA "
    "and exact float32 on CPU; fp32 = exact float32 (turns the fast path off); fp16/bf16 = the "
    "fast path in that dtype (default: auto)",
}


# ----------------------------------------------------------------------------------------------
# init


def add_init_arguments(p: argparse.ArgumentParser) -> None:
    from .config import ENCODER_PRESETS

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
    from .encoder import MertEncoder, looks_like_path
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
        encoder = MertEncoder(config.encoder)  # random weights, stored in the checkpoint
    elif args.include_encoder:
        encoder = MertEncoder.from_pretrained(config.encoder)
    else:
        with torch.device("meta"):  # referenced, not stored: no need to materialise weights
            encoder = MertEncoder(config.encoder)
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


def _check_output_path(path: str) -> Path:
    """Fail before any work if ``--output`` cannot be written (not after scoring everything)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--output {path}: is a directory")
    if not p.parent.is_dir():
        raise ConfigError(f"--output {path}: directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"--output {path}: not writable")
    return p


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    p.add_argument(
        "files", nargs="+", metavar="FILE", help="audio files (WAV, FLAC, Ogg, Opus, MP3)"
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
    header = ["file"] + [short.get(n, n) for n in names] + ["reward"]
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
                + [f"{r['reward']:.4f}"]
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
        w.writerow(["path", *names, "reward", "error"])
        for r in rows:
            if "error" in r:
                w.writerow([r["path"], *[""] * len(names), "", f"{r['error_type']}: {r['error']}"])
            else:
                w.writerow([r["path"], *[r["scores"][n] for n in names], r["reward"], ""])
    else:
        stream.write(_format_table(rows, names) + "\n")


def run_score(args: argparse.Namespace) -> int:
    output = _check_output_path(args.output) if args.output else None
    model = load_model(args.model, args.device, args.encoder, args.dtype)
    results = model.score(
        args.files, batch_size=args.batch_size, num_workers=args.num_workers, progress=True
    )
    rows = []
    for r in results:
        d = r.to_dict()
        if model.untrained:
            d["untrained"] = True
        rows.append(d)
    # file names need not be valid UTF-8: surrogateescape writes them back as their raw bytes
    buffer = io.StringIO()
    if args.format == "table" and model.untrained:
        buffer.write("# UNTRAINED model: scores are not meaningful\n")
    write_results(rows, model.score_names, args.format, buffer)
    if output is None:
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="surrogateescape")
        sys.stdout.write(buffer.getvalue())
    else:  # complete or not at all: an existing file is replaced only once the new one is whole
        from .files import atomic_write_text

        atomic_write_text(output, buffer.getvalue(), errors="surrogateescape")
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} inputs failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r.input}: {r.error_type}: {r.error}", file=sys.stderr)
        return 1
    return 0


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


def run_compare(args: argparse.Namespace) -> int:
    import torch

    from .audio import load_audio

    model = load_model(args.model, args.device, args.encoder, args.dtype)
    max_s = model.config.frontend.max_duration_s
    wa, sra = load_audio(args.a, max_duration_s=max_s)
    wb, srb = load_audio(args.b, max_duration_s=max_s)
    for path, wav, sr in ((args.a, wa, sra), (args.b, wb, srb)):
        model.frontend.check(wav, sr, path)  # errors name the file, not waveforms[i]
    with torch.inference_mode():
        out = model([wa, wb], [sra, srb])
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
        "method": "preference_head" if model.preference_head is not None else "bradley_terry",
    }
    if model.untrained:
        result["untrained"] = True
    print(json.dumps(result))
    return 0


def _split_output(out):
    from .model import ApexOutput

    a = ApexOutput(scores={k: v[:1] for k, v in out.scores.items()}, reward=out.reward[:1])
    b = ApexOutput(scores={k: v[1:] for k, v in out.scores.items()}, reward=out.reward[1:])
    return a, b


# ----------------------------------------------------------------------------------------------
# entry point


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported to add its arguments."""
    _extra_commands()
    parser = argparse.ArgumentParser(
        prog="apex-reward",
        description="APEX reward model: score music, build preference pairs, train, serve.",
    )
    parser.add_argument("--version", action="version", version=f"apex-reward {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add, run, help) in COMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help)
        if name == command:
            mod = importlib.import_module(module)
            getattr(mod, add)(sp)
            sp.set_defaults(_run=getattr(mod, run))
    return parser


def _first_command(argv: Sequence[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``apex-reward``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
