"""tipr: text-to-image person retrieval (SEN) with PyTorch Lightning.

Importing ``tipr`` is cheap and never touches the network: heavy modules
(torch models, Lightning) are imported by the subpackages that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
