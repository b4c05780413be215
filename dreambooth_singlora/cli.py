"""`dreambooth-singlora <command> ...`: train, generate, export, eval.

Each command is the module of the same name (`python -m dreambooth_singlora.train_dreambooth`,
`... .generate`, `... .export`, `python -m dreambooth_singlora.eval`, which a checkout also runs as
`python -m eval`); this entry point only dispatches.
"""

from __future__ import annotations

import inspect
import pkgutil
import sys

COMMANDS = {
    "train": ("dreambooth_singlora.train_dreambooth",
              "train adapters: --subject, --subjects ... or your photos (accelerate launch for many GPUs)"),
    "train-multi": ("dreambooth_singlora.train_dreambooth",
                    "the same command as train (its earlier name for --subjects)"),
    "generate": ("dreambooth_singlora.generate", "render images from a saved adapter"),
    "generate-many": ("dreambooth_singlora.generate:main_many",
                      "render many subjects' adapters, subjects mixed in each batch"),
    "export": ("dreambooth_singlora.export", "export an adapter as a standard (kohya / diffusers) LoRA"),
    "eval": ("dreambooth_singlora.eval.cli", "render, score and report the DreamBooth fidelity benchmark"),
    "demo": ("dreambooth_singlora.demo", "every command once on a tiny random-weight model: checks the install"),
    "ui": ("dreambooth_singlora.ui.app", "a local web app over a workspace folder: train, watch, generate, export, "
           "evaluate (needs the [ui] extra)"),
}

#: the parser of each command, built without importing the command's module (which imports torch)
HELP = {"train": "dreambooth_singlora.config:train_parser", "train-multi": "dreambooth_singlora.config:train_parser",
        "generate": "dreambooth_singlora.config:generate_parser",
        "generate-many": "dreambooth_singlora.config:generate_many_parser",
        "export": "dreambooth_singlora.export:build_parser", "eval": "dreambooth_singlora.eval.cli:build_parser",
        "demo": "dreambooth_singlora.demo:build_parser", "ui": "dreambooth_singlora.ui.app:build_parser"}


def main(argv=None):
    own = argv is None  # the process's own command line: the console script, or python -m dreambooth_singlora.cli
    argv = list(sys.argv[1:] if own else argv)
    if not argv or argv[0] not in COMMANDS:
        unknown = bool(argv) and argv[0] not in ("-h", "--help")
        lines = [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: dreambooth-singlora <command> [flags]   (<command> --help for its flags)\n\ncommands:\n"
              + "\n".join(lines), file=sys.stderr if unknown else sys.stdout)
        if unknown:
            print(f"error: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
            raise SystemExit(2)
        return
    rest = argv[1:]
    if argv[0] in HELP and ("-h" in rest or "--help" in rest):  # answered from the parser alone: no torch import
        pkgutil.resolve_name(HELP[argv[0]])().parse_args(rest)
    target = COMMANDS[argv[0]][0]  # "module:function", or "module" for its main
    command = pkgutil.resolve_name(target if ":" in target else f"{target}:main")
    if own and "own_process" in inspect.signature(command).parameters:  # a command that may end its own process
        return command(rest, own_process=True)
    return command(rest)


if __name__ == "__main__":
    main()
