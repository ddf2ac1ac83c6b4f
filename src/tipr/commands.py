"""The ``tipr`` console script: model commands without Lightning, training commands with it.

``tipr index``, ``tipr search``, ``tipr convert`` and ``tipr export-onnx`` use a
trained model outside a Trainer. Each is a plain function whose signature and
docstring are its options (jsonargparse), so it reads ``--config file.yaml`` like
``tipr fit``, and none of them imports Lightning. A bool option is also a switch
(``--int8``, ``--no_int8``). ``tipr serve`` serves a gallery over HTTP (:mod:`tipr.serve`). Every other command (``fit``, ``validate``,
``test``) goes to :mod:`tipr.cli` (LightningCLI).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

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

    doc = (function.__doc__ or "").strip().split("\n\n")[0]
    parser = ArgumentParser(prog=prog, description=doc)
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


def main(args: Sequence[str] | None = None) -> int | None:
    """Entry point of the ``tipr`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in MODEL_COMMANDS:
        return run_command(argv[0], argv[1:])
    from tipr.cli import main as lightning_main

    epilog = "Using a trained model: " + "; ".join(
        f"'tipr {name}' to {text}" for name, (_, text) in MODEL_COMMANDS.items()
    ) + "."
    return lightning_main(None if args is None else argv, epilog=epilog)  # None: LightningCLI reads sys.argv


if __name__ == "__main__":
    sys.exit(main())
