"""Stop a run cleanly when a loss term or the gradient norm stops being finite, without a host sync per step.

Every training step hands :meth:`NonFiniteWatch.update` its loss terms (and,
before the optimiser step, the gradient norm) as device tensors; the watch
folds them into device-side state: whether everything so far was finite, the
first step that was not, and which terms were non-finite then. Only
:meth:`NonFiniteWatch.raise_if_tripped` reads that state back to the host, which
the Lightning module does every ``interval`` steps and before writing any
checkpoint, so a NaN run stops within ``interval`` steps and never leaves a
checkpoint with NaN weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NonFiniteLossError", "NonFiniteWatch"]


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN or infinite."""


class NonFiniteWatch:
    """Device-side record of the first non-finite training step.

    Args:
        names: the watched quantities, in the order :meth:`update` receives them.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._state: dict[str, torch.Tensor] | None = None

    def _ensure(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._state is None or self._state["first_step"].device != device:
            self._state = {
                "first_step": torch.full((), -1, dtype=torch.long, device=device),
                "bad": torch.zeros(len(self.names), dtype=torch.bool, device=device),
            }
        return self._state

    def update(self, values: torch.Tensor, step: int, offset: int = 0) -> None:
        """Record ``values`` (the quantities ``names[offset:offset + len(values)]``) of step ``step``; no sync."""
        state = self._ensure(values.device)
        bad = torch.zeros_like(state["bad"])
        bad[offset : offset + values.numel()] = ~torch.isfinite(values.detach().reshape(-1))
        tripped = (state["first_step"] < 0) & bad.any()
        state["first_step"] = torch.where(tripped, torch.full_like(state["first_step"], step), state["first_step"])
        # Terms of the first bad step accumulate (its losses, then its gradient norm); later steps are ignored.
        state["bad"] = torch.where(state["first_step"] == step, state["bad"] | bad, state["bad"])

    @property
    def tripped_at(self) -> tuple[int, list[str]] | None:
        """``(step, names)`` of the first non-finite step, or None (one host sync)."""
        if self._state is None:
            return None
        step = int(self._state["first_step"])
        if step < 0:
            return None
        return step, [name for name, bad in zip(self.names, self._state["bad"].tolist()) if bad]

    def raise_if_tripped(self, last_good_checkpoint: str | None = None) -> None:
        """Raise :class:`NonFiniteLossError` naming the step, the terms and the last good checkpoint."""
        tripped = self.tripped_at
        if tripped is None:
            return
        step, names = tripped
        where = f"the last checkpoint written before it: {last_good_checkpoint}" if last_good_checkpoint else (
            "no checkpoint had been written before it"
        )
        raise NonFiniteLossError(
            f"training stopped: non-finite {', '.join(names)} at step {step} (NaN or Inf); {where}. "
            "Lower the learning rate, check the inputs of that step, or resume from that checkpoint."
        )
