"""The ``tipr`` console script: model commands without Lightning, training commands with it.

``tipr index``, ``tipr search``, ``tipr convert`` and ``tipr export-onnx`` use a
trained model outside a Trainer. Each is a plain function whose signature and
docstring are its options (jsonargparse), so it reads ``--config file.yaml`` like
``tipr fit``, and none of them imports Lightning. A bool option is also a switch
(``--int8``, ``--no_int8``). ``tipr serve`` serves a gallery over HTTP (:mod:`tipr.serve`). Every other command (``fit``, ``validate``,
``test``) goes to :mod:`tipr.cli` (LightningCLI). ``tipr`` and ``tipr --help`` list
every command. A usage error is one usage line with "did you mean" (:mod:`tipr.usage`),
and a configuration error while a command runs is one line, printed once
(``TIPR_TRACEBACK=1`` for the traceback).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Sequence

from tipr.usage import ShortErrors, one_line_error, tracebacks_wanted

#: the training commands (LightningCLI), with what they do
TRAINING_COMMANDS = {
    "fit": "train a model (tipr fit --config experiments/synthetic.yaml: the offline synthetic job)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split and print the results table",
}

#: ``tipr <name>``: ``(module:function, one-line description)``, imported on use.
MODEL_COMMANDS = {
    "index": ("tipr.search.commands:index", "encode a folder of images into a gallery index"),
    "search": ("tipr.search.commands:search", "rank a gallery index by text queries"),
    "convert": ("tipr.convert.command:convert", "turn an IRRA/SEN or OpenAI CLIP checkpoint into a pretrained folder"),
    "export-onnx": ("tipr.search.onnx:export_onnx", "export the image encoder to ONNX (fp32, int8) for fast CPU indexing"),
    "serve": ("tipr.serve.command:serve", "serve a gallery as a web page and JSON API (search by text or photo)"),
}


def command_parser(prog: str, function: Callable):
    """A jsonargparse parser of ``function``'s signature, with ``--config``."""
    from jsonargparse import ArgumentParser

    class Parser(ShortErrors, ArgumentParser):
        pass

    doc = (function.__doc__ or "").strip().split("\n\n")[0]
    parser = Parser(prog=prog, description=doc)
    parser.add_argument("--config", action="config", help="a YAML file of these options (command-line values win)")
    parser.add_function_arguments(function, as_positional=False)
    return parser


def repeatable(function: Callable, argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--name V`` of a list-typed option written ``--name+ V`` (append), so
    ``--query a --query b`` gives both, as argparse's ``append`` would."""
    import inspect

    lists = {f"--{p.name}" for p in inspect.signature(function).parameters.values() if "list[" in str(p.annotation)}
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        out.append(f"{flag}+{eq}{value}" if flag in lists else arg)
    return out


def switches(function: Callable, argv: Sequence[str]) -> list[str]:
    """``argv`` with each bool option written as a switch given its value: ``--name`` alone (last,
    or before another option) is ``--name true``, ``--no_name`` / ``--no-name`` is ``--name false``."""
    import inspect

    parameters = inspect.signature(function).parameters.values()
    flags = {p.name for p in parameters if p.annotation in (bool, "bool")}
    out = []
    for i, arg in enumerate(argv):
        name = arg[2:] if arg.startswith("--") and "=" not in arg else None
        negated = name[3:].replace("-", "_") if name and name[:3] in ("no_", "no-") else None
        if negated in flags:
            out += [f"--{negated}", "false"]
        elif name in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out += [arg, "true"]
        else:
            out.append(arg)
    return out


def run_command(name: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` for ``tipr <name>`` and run it: its return code; 1 with a one-line error
    for a bad file or value (``OSError``, ``ValueError``) or a missing optional package (``ImportError``:
    ``tipr[onnx]``, ``tipr[ann]`` say which extra to install); 2 for a usage error."""
    module, function = MODEL_COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module), function)
    parser = command_parser(f"tipr {name}", function)
    options = parser.parse_args(repeatable(function, switches(function, argv)))
    kwargs = {key: value for key, value in vars(options).items() if key != "config"}
    try:
        return int(function(**kwargs) or 0)
    except (OSError, ValueError, ImportError) as e:
        print(f"tipr {name}: error: {e}", file=sys.stderr)
        return 1


def overview() -> str:
    """``tipr --help``: every command with what it does."""
    width = max(map(len, [*TRAINING_COMMANDS, *MODEL_COMMANDS]))
    lines = ["usage: tipr <command> [--config CONFIG] [options]", "", "Training (PyTorch Lightning):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in TRAINING_COMMANDS.items()]
    lines += ["", "Using a trained model (no Lightning):"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in MODEL_COMMANDS.items()]
    lines += ["", "'tipr <command> --help' lists a command's options."]
    return "\n".join(lines)


def main(args: Sequence[str] | None = None) -> int | None:
    """Entry point of the ``tipr`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in MODEL_COMMANDS:
        return run_command(argv[0], argv[1:])
    if not argv[0].startswith("-") and argv[0] not in TRAINING_COMMANDS:
        close = difflib.get_close_matches(argv[0], [*TRAINING_COMMANDS, *MODEL_COMMANDS], n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        print(f"tipr: error: unknown command {argv[0]!r}{hint}\n'tipr --help' lists the commands.", file=sys.stderr)
        return 2
    from tipr.cli import main as lightning_main

    try:
        return lightning_main(None if args is None else argv)  # None: LightningCLI reads sys.argv
    except (ValueError, OSError) as e:  # a configuration error raised while the run was set up or started
        if tracebacks_wanted():
            raise
        given = any(arg in ("-c", "--config") or arg.startswith("--config=") for arg in argv)
        hint = None if given else "no --config was given: the recipes are in experiments/ (tipr fit --config experiments/synthetic.yaml runs offline)"
        return one_line_error(argv[0], e, hint)


if __name__ == "__main__":
    sys.exit(main())
