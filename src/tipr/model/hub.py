"""Files of a pretrained folder: finding them (local folder or hub id) and loading weights strictly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def pretrained_files(
    name_or_path: str | Path,
    filenames: Sequence[str],
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> dict[str, Path]:
    """Local paths of ``filenames`` from a folder, or downloaded from a hub id.

    A value that exists on disk, looks like a path (starts with ``.``, ``/`` or
    ``~``) or cannot be a hub id (``outputs/run/pretrained``) is a folder and never
    touches the network; a missing file names the
    folder and the file.
    """
    text = str(name_or_path)
    folder = Path(text).expanduser()
    if folder.exists() or text.startswith((".", "/", "~")) or not _hub_id(text):
        if not folder.is_dir():
            what = "no such folder" if not folder.exists() else "not a folder"
            raise FileNotFoundError(f"{text}: {what}; expected a pretrained folder (with {', '.join(filenames)})")
        missing = [name for name in filenames if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"pretrained folder {text} lacks {', '.join(missing)}; expected a folder written by "
                f"save_pretrained, 'tipr fit' (<log_dir>/pretrained) or 'tipr convert'"
            )
        return {name: folder / name for name in filenames}
    from huggingface_hub import hf_hub_download

    def fetch(local: bool) -> dict[str, Path]:
        return {name: Path(hf_hub_download(text, name, revision=revision, cache_dir=cache_dir,
                                           local_files_only=local, token=token)) for name in filenames}

    try:
        return fetch(local=True)  # in the local cache: no request at all
    except Exception as e:
        if local_files_only:
            raise OSError(f"the hub model {text!r} is not in the local cache ({list(filenames)}): {e}") from e
    offline = hub_unreachable()
    if offline:
        raise OSError(f"the hub model {text!r} is not in the local cache and the hub cannot be reached ({offline}); "
                      f"expected a pretrained folder or a reachable hub id")
    try:
        return fetch(local=False)
    except Exception as e:  # unknown repo, missing file: name what was asked for
        raise OSError(f"could not fetch {list(filenames)} of the hub model {text!r}: {type(e).__name__}: {e}") from e


def _hub_id(text: str) -> bool:
    """Whether ``text`` can be a hub id (``name`` or ``namespace/name``); anything else is a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def load_weights(model: nn.Module, path: str | Path, map_location: str | torch.device = "cpu") -> None:
    """Load a safetensors file into ``model`` (see :func:`load_state`), then move it to ``map_location``."""
    from safetensors.torch import load_file

    load_state(model, load_file(str(path)), str(path))
    model.to(map_location)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` where every name and shape must match; errors name ``source``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                   f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                   f"shapes differ for {wrong[:3]}" if wrong else ""]
        raise ValueError(
            f"{source}: the weights do not fit the network its config describes: "
            + "; ".join(d for d in details if d)
        )
    model.load_state_dict(state, strict=True)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now (``HF_HUB_OFFLINE``, no route, no name service), or None.

    One request, no retries: ``huggingface_hub`` retries a failed download with
    back-off (about 30 s in all) before it gives up, so a model that is not in the
    local cache is looked up here first and the error comes at once.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # httpx's connection and timeout errors; the hub's own errors mean it answered
        if type(e).__module__.split(".")[0].startswith("httpx") or isinstance(e, OSError):
            return f"{constants.ENDPOINT}: {type(e).__name__}: {e}"
    return None
