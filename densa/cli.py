"""The `densa` command: a table of subcommands, whose names are fixed (docs/design-notes.md, 'Command names').

Each command lives in a module with `add_arguments(parser)` and `main(args)`; this file only wires them up and
turns errors into one line on stderr with a non-zero exit. Modules are imported lazily so `densa --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from densa import malloc

# name -> (module, one-line help). `bench` and `study` have their own sub-tables in their modules.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("densa.quickstart", "the main job on embedded defaults: build, run and measure a small model"),
    "init": ("densa.commands.init", "write an untrained model checkpoint from a preset / recipe"),
    "tokenizer": ("densa.commands.tokenizer", "train a byte-level BPE tokenizer (Hugging Face format)"),
    "prepare": ("densa.commands.prepare", "tokenize a corpus into token shards with a train/validation split"),
    "train": ("densa.commands.train", "train a model from a recipe (model: and train: sections), resumable"),
    "inspect-routing": ("densa.commands.inspect_routing", "print how many FFN experts each token uses per MoE layer"),
    "export": ("densa.hf.export", "export a model as a Hugging Face folder (optionally loadable without densa)"),
    "sft": ("densa.commands.sft", "supervised fine-tuning on chat data, loss on assistant tokens only"),
    "align": ("densa.commands.align", "token-value reinforcement learning (GRPO) or preference tuning"),
    "eval": ("densa.eval.command", "the Intelligence Density x Token Value report card for one or more models"),
    "audit": ("densa.eval.audit", "audits of benchmark data, e.g. 13-gram contamination against a corpus"),
    "serve": ("densa.serve.command", "an OpenAI-compatible HTTP server with streaming, batching and metering"),
    "moefy": ("densa.commands.moefy", "convert a dense Llama-architecture model into dynamic experts"),
    "bench": ("densa.bench", "micro-benchmarks that print measured ratios (attention, decode, moe, train, serve)"),
    "study": ("densa.study", "studies that test densa's claims at equal compute and write their evidence"),
}

# commands left on glibc's default malloc: a long-lived server with varying shapes would hold its peak and fragment
SYSTEM_MALLOC = {"serve"}

EPILOG = """\
Every command explains its flags with --help, e.g. `densa init --help`.
Errors are one line on stderr naming the bad input, with exit status 1 (2 for usage errors)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line: `densa init: error: ... (see densa init --help)`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="densa", description="Build, train, measure and serve intelligence-dense "
                           "language models.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    # second pass: the chosen command's module adds its own flags
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    command_parser = OneLineParser(prog=f"densa {name}", description=COMMANDS[name][1],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(command_parser)
    command_parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = command_parser.parse_args(argv[1:])
    if name not in SYSTEM_MALLOC:
        malloc.tune()  # reuse freed memory instead of page-faulting it back every step (densa/malloc.py)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print(f"densa {name}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"densa {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
