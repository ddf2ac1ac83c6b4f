"""``RetrievalRanks``: the rank metrics as a ``torchmetrics.Metric`` that gathers embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from tipr.metrics.functional import _EMPTY_TARGET_ACTIONS, _check_ks, retrieval_ranks

__all__ = ["RetrievalRanks"]


class RetrievalRanks(Metric):
    """Rank-k, mAP and mINP of text-to-image retrieval (and optionally image-to-text).

    Accumulates query (caption) and gallery (image) embeddings with their
    identities and their sample index, and at ``compute()`` calls
    :func:`tipr.metrics.retrieval_ranks` on them. Queries and gallery may arrive
    through separate dataloaders (``update_queries`` for one, ``update_gallery``
    for the other) or through one (call both in the same step, or ``update``
    with both).

    ``index`` is the position of the sample in its evaluation set (0..n-1 for the
    queries, 0..m-1 for the gallery). Under DDP the states are gathered from all
    processes, then samples whose index was already seen are dropped (keeping
    one copy), which removes the duplicates a ``DistributedSampler`` pads in and
    an image fed once per caption in a single query+image loader; the rest is
    ordered by index, so the result equals a single-process run exactly. Two
    copies of one index with different identities raise a ``ValueError``.

    Args:
        ks: the k of each Rank-k to report.
        image_to_text: also report image-to-text retrieval (gallery embeddings
            as queries against the query embeddings), under ``i2t_`` keys.
        chunk_size: passed to :func:`retrieval_ranks`.
        max_chunk_bytes: passed to :func:`retrieval_ranks`.
        empty_target_action: passed to :func:`retrieval_ranks`: ``"error"``
            raises when a query's identity is absent from the gallery,
            ``"skip"`` leaves such queries out with a warning. (A Lightning
            sanity check sees only a few batches of each loader; skip
            ``compute`` there, or use ``"skip"``.)
        kwargs: ``torchmetrics.Metric`` options (``compute_on_cpu``,
            ``process_group``, ...).

    ``compute()`` returns a dict of 0-dim float32 tensors in percent: ``R1``,
    ``R5``, ``R10`` (one per k), ``mAP``, ``mINP`` and, with ``image_to_text``,
    ``i2t_R1``, ..., ``i2t_mINP``.

    Example (a LightningModule with ``[query_loader, gallery_loader]``)::

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            if dataloader_idx == 0:
                feats = self.network.encode_text(batch["input_ids"])
                self.retrieval.update_queries(feats, batch["pids"], batch["index"])
            else:
                feats = self.network.encode_image(batch["pixel_values"])
                self.retrieval.update_gallery(feats, batch["pids"], batch["index"])

        def on_validation_epoch_end(self):
            self.log_dict({f"val/{k}": v for k, v in self.retrieval.compute().items()})
            self.retrieval.reset()
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    query_features: list[Tensor]
    query_pids: list[Tensor]
    query_index: list[Tensor]
    gallery_features: list[Tensor]
    gallery_pids: list[Tensor]
    gallery_index: list[Tensor]

    def __init__(
        self,
        ks: Sequence[int] = (1, 5, 10),
        image_to_text: bool = False,
        chunk_size: int | None = None,
        max_chunk_bytes: int | None = None,
        empty_target_action: str = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ks = _check_ks(ks)
        if empty_target_action not in _EMPTY_TARGET_ACTIONS:
            raise ValueError(
                f"empty_target_action must be one of {_EMPTY_TARGET_ACTIONS}, got {empty_target_action!r}"
            )
        self.image_to_text = bool(image_to_text)
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        self.empty_target_action = empty_target_action
        for role in ("query", "gallery"):
            for field in ("features", "pids", "index"):
                self.add_state(f"{role}_{field}", default=[], dist_reduce_fx="cat")

    def update(
        self,
        query_features: Tensor | None = None,
        query_pids: Tensor | None = None,
        query_index: Tensor | None = None,
        gallery_features: Tensor | None = None,
        gallery_pids: Tensor | None = None,
        gallery_index: Tensor | None = None,
    ) -> None:
        """Add a batch of queries, of gallery items, or of both.

        Each group is all-or-nothing: features (N, D), pids (N,) and index (N,).
        """
        queries = (query_features, query_pids, query_index)
        gallery = (gallery_features, gallery_pids, gallery_index)
        if all(x is None for x in queries + gallery):
            raise ValueError("update() got nothing: give query_* and/or gallery_* features, pids and index")
        for role, group in (("query", queries), ("gallery", gallery)):
            if all(x is None for x in group):
                continue
            features, pids, index = self._check_batch(role, *group)
            getattr(self, f"{role}_features").append(features)
            getattr(self, f"{role}_pids").append(pids)
            getattr(self, f"{role}_index").append(index)

    def update_queries(self, features: Tensor, pids: Tensor, index: Tensor) -> None:
        """Add a batch of query (caption) embeddings (N, D), identities (N,) and sample indices (N,)."""
        self.update(query_features=features, query_pids=pids, query_index=index)

    def update_gallery(self, features: Tensor, pids: Tensor, index: Tensor) -> None:
        """Add a batch of gallery (image) embeddings (M, D), identities (M,) and sample indices (M,)."""
        self.update(gallery_features=features, gallery_pids=pids, gallery_index=index)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as ``update``: rank metrics of a single batch mean nothing, so none are computed."""
        self.update(*args, **kwargs)

    def compute(self) -> dict[str, Tensor]:
        """Gather (under DDP), drop duplicate indices, order by index, then rank."""
        query_features, query_pids = self._unique("query")
        gallery_features, gallery_pids = self._unique("gallery")
        options = {
            "ks": self.ks,
            "chunk_size": self.chunk_size,
            "max_chunk_bytes": self.max_chunk_bytes,
            "empty_target_action": self.empty_target_action,
        }
        result = retrieval_ranks(
            query_pids=query_pids,
            gallery_pids=gallery_pids,
            query_features=query_features,
            gallery_features=gallery_features,
            **options,
        )
        if self.image_to_text:
            swapped = retrieval_ranks(
                query_pids=gallery_pids,
                gallery_pids=query_pids,
                query_features=gallery_features,
                gallery_features=query_features,
                **options,
            )
            result.update({f"i2t_{name}": value for name, value in swapped.items()})
        return result

    def _unique(self, role: str) -> tuple[Tensor, Tensor]:
        """The accumulated (features, pids) of ``role``, one row per distinct index, by ascending index."""
        index = getattr(self, f"{role}_index")  # a list, or after a DDP sync one gathered tensor
        if (len(index) if isinstance(index, list) else index.numel()) == 0:
            method = "update_queries" if role == "query" else "update_gallery"
            raise ValueError(f"{type(self).__name__} has no {role} embeddings: call {method}(...) before compute()")
        features = dim_zero_cat(getattr(self, f"{role}_features"))
        pids = dim_zero_cat(getattr(self, f"{role}_pids")).long()
        index = dim_zero_cat(getattr(self, f"{role}_index")).long()
        order = torch.argsort(index, stable=True)
        index, pids = index[order], pids[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        conflict = ~first[1:] & (pids[1:] != pids[:-1])
        if conflict.any():
            at = int(conflict.nonzero()[0, 0]) + 1
            raise ValueError(
                f"{role} index {int(index[at])} was given twice with different identities "
                f"({int(pids[at - 1])} and {int(pids[at])}); `index` must name one sample of the {role} set"
            )
        return features[order[first]], pids[first]

    @staticmethod
    def _check_batch(role: str, features: Tensor | None, pids: Tensor | None, index: Tensor | None):
        names = (f"{role}_features", f"{role}_pids", f"{role}_index")
        missing = [name for name, x in zip(names, (features, pids, index)) if x is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing: give {role} features, pids and index together")
        if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"{names[0]} must be a 2-D float tensor (N, D), got {shape}")
        n = features.shape[0]
        checked = []
        for name, x in ((names[1], pids), (names[2], index)):
            x = torch.as_tensor(x, device=features.device)
            if x.dim() != 1 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(x.shape)} dtype {x.dtype}")
            if x.numel() != n:
                raise ValueError(f"{name} has {x.numel()} entries but {names[0]} has {n} rows")
            checked.append(x.long())
        return features.detach(), checked[0], checked[1]
