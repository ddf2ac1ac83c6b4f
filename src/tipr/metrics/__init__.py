"""Retrieval metrics: Rank-k, mAP and mINP, exact, chunked and distributed.

- :func:`retrieval_ranks`: pure function on a similarity matrix or on features.
- :class:`RetrievalRanks`: ``torchmetrics.Metric`` that gathers embeddings across
  processes and calls it.
"""

from tipr.metrics.functional import retrieval_ranks
from tipr.metrics.retrieval import RetrievalRanks

__all__ = ["RetrievalRanks", "retrieval_ranks"]
