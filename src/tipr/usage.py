"""Command-line errors for people: one usage line, the error, "did you mean", and one-line failures.

jsonargparse prints a command's whole usage before an error (about 110 lines
for ``tipr fit``). A parser with :class:`ShortErrors` prints one usage line, the
error, the closest option names for a misspelt one and where the full help is.
:func:`one_line_error` turns a configuration error raised while a command runs
(a missing data root, a mask ratio out of range) into one line, printed once
across processes; ``TIPR_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterable

__all__ = ["ShortErrors", "one_line_error", "suggest_options"]

#: what a misspelt option looks like in jsonargparse's messages: ``unrecognized arguments: --model.mask_ratoi=0.5``,
#: and under a class option ``Parser key "model.method": ... Option 'mask_ratoi' is not accepted``
_UNKNOWN = re.compile(r"(--[\w.\-]+)|Parser key \"([\w.]+)\":[\s\S]*?Option '([\w.]+)' is not accepted")


def suggest_options(unknown: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The option names of ``known`` closest to ``unknown``: for a nested name (``--model.mask_ratoi``), those
    under the same first part whose last part is close (``--model.method.mask_ratio``); for a flat one
    (``--gallry``), the close flat names (``--gallery``). Closest first."""
    parts = unknown.lstrip("-").split(".")
    scored = []
    for name in set(known):
        theirs = name.lstrip("-").split(".")
        if (len(parts) > 1) != (len(theirs) > 1) or (len(parts) > 1 and theirs[0] != parts[0]):
            continue
        score = difflib.SequenceMatcher(None, theirs[-1], parts[-1]).ratio()
        if score >= 0.8:
            scored.append((-score, -difflib.SequenceMatcher(None, name, unknown).ratio(), name))
    return [name for *_, name in sorted(scored)[:n]]


class ShortErrors:
    """Mixin for a jsonargparse ``ArgumentParser``: a usage error is one usage line, the message and suggestions.

    ``extra_options``: names a misspelling may be meant for that the parser adds only
    once a class is chosen (a method's ``--model.method.<field>``).
    """

    extra_options: tuple[str, ...] = ()

    def error(self, message: str, ex: Exception | None = None):
        from jsonargparse._common import debug_mode_active

        if not getattr(self, "exit_on_error", True) or debug_mode_active():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
        known += list(getattr(parser, "extra_options", ()))
        lines = [f"usage: {prog} [--config CONFIG] [options]", f"{prog}: error: {message.strip()}"]
        for match in _UNKNOWN.finditer(message):
            name = match.group(1) or f"--{match.group(2)}.{match.group(3)}"
            if name in known:
                continue
            close = suggest_options(name, known)
            if close:
                lines.append(f"  {name}: did you mean {' or '.join(close)}?")
        lines.append(f"'{prog} --help' lists every option.")
        sys.stderr.write("\n".join(lines) + "\n")
        self.exit(2)


def one_line_error(command: str, error: BaseException, hint: str | None = None) -> int:
    """Print ``error`` as ``tipr <command>: error: <message>`` (plus ``hint``) on rank 0 only, and return 1.

    Other ranks of a multi-process run print nothing: each would print the same line.
    """
    from tipr.messages import _rank

    if _rank() == 0:
        text = f"tipr {command}: error: {error}"
        if hint:
            text += f"\n  {hint}"
        print(text + "\n  (TIPR_TRACEBACK=1 shows where it was raised)", file=sys.stderr, flush=True)
    return 1


def tracebacks_wanted() -> bool:
    """Whether ``TIPR_TRACEBACK`` asks for full tracebacks instead of one-line errors."""
    return os.environ.get("TIPR_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no")
