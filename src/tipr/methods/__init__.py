"""The methods tipr implements, one folder each, and the registry that names them.

A method folder (``tipr/methods/<name>/``) holds the method's config (a
:class:`~tipr.model.MethodConfig`), its network and objective (a
:class:`~tipr.model.TIPRModel`), its per-sample data needs and the conversion
table of its authors' checkpoints, and exposes them as ``SPEC``, a
:class:`MethodSpec`. :data:`METHODS` below is the only list of methods:
everything else (the training module, the CLI, ``from_pretrained``, ``tipr
convert``) asks the registry, so adding a method is one folder and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

#: Registered methods: name -> the package defining ``SPEC``. Imported on first use.
METHODS: dict[str, str] = {
    "sen": "tipr.methods.sen",
    "irra": "tipr.methods.irra",
}


@dataclass(frozen=True)
class MethodSpec:
    """What the shared code needs to know of a method.

    Attributes:
        name: the registered name (``config.json``'s ``model_type``, ``--model.method=<name>``).
        model_class: its :class:`~tipr.model.TIPRModel` subclass.
        config_class: its :class:`~tipr.model.MethodConfig` subclass.
        reference_markers: key prefixes that only this method's (or its extensions')
            checkpoints from the authors' code hold: how ``load_reference_checkpoint``
            tells the method of a file.
        extends: methods whose markers this method's checkpoints also carry (SEN's
            files hold IRRA's MLM modules): when several match, the extension wins.
        convert_heads: ``(state_dict, model) -> HeadConversion``: loads the method's
            own heads from the authors' layout (see :mod:`tipr.convert.reference`).
        reference_settings: ``(state_dict) -> dict`` of config fields read off an
            authors' checkpoint (head depth, mask id...).
        legacy_format / read_legacy_config: a config ``format`` written by an older
            tipr, and the reader turning it into ``(EncoderConfig, MethodConfig)``.
    """

    name: str
    model_class: type
    config_class: type
    reference_markers: tuple[str, ...] = ()
    extends: tuple[str, ...] = ()
    convert_heads: Callable[..., Any] | None = None
    reference_settings: Callable[..., dict[str, Any]] | None = None
    legacy_format: str | None = None
    read_legacy_config: Callable[..., Any] | None = None


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def method_spec(name: str, source: str = "method") -> MethodSpec:
    """The :class:`MethodSpec` of a registered method; an unknown name is an error naming ``source``."""
    if name not in METHODS:
        raise ValueError(f"{source}: unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return import_module(METHODS[name]).SPEC


def all_specs() -> list[MethodSpec]:
    return [method_spec(name) for name in METHODS]


def spec_for_legacy_format(fmt: Any) -> MethodSpec | None:
    return next((spec for spec in all_specs() if fmt is not None and spec.legacy_format == fmt), None)


def spec_of_config(config: Any) -> MethodSpec:
    """The spec whose config class ``config`` is (an instance of a registered MethodConfig)."""
    for spec in all_specs():
        if type(config) is spec.config_class:
            return spec
    raise TypeError(f"{type(config).__name__} is not the config of a registered method ({', '.join(METHODS)})")


def detect_reference_method(keys: Iterable[str]) -> str | None:
    """The method whose authors' checkpoint has these keys, or None (a bare CLIP).

    A method matches when a key starts with one of its ``reference_markers``;
    among several matches, one that ``extends`` the others wins.
    """
    keys = list(keys)
    matches = [s for s in all_specs() if any(k.startswith(m) for m in s.reference_markers for k in keys)]
    for spec in matches:
        if all(other is spec or other.name in spec.extends for other in matches):
            return spec.name
    if matches:
        raise ValueError(f"the checkpoint carries the heads of several methods ({[s.name for s in matches]}); "
                         f"give method= explicitly")
    return None


def config_class_path(name: str) -> str:
    """``module.ClassName`` of a method's config, as LightningCLI's ``class_path`` takes it."""
    cls = method_spec(name).config_class
    return f"{cls.__module__}.{cls.__qualname__}"
