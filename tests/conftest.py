"""Shared test scaffolding: one tiny model shape and one tiny synthetic benchmark.

Fixtures:

- ``tiny``: the :class:`tiny.Tiny` sizes and builders (a fresh network, module or data module;
  test files may also ``from tiny import Tiny``);
- ``tiny_network``: one ``SENModel`` for the whole session, in eval mode (read it, do not train it);
- ``tiny_pretrained``: a pretrained folder of ``tiny_network`` (model and processor);
- ``synthetic_root``: a root holding ``Tiny.synthetic``'s benchmark and its token cache, made once.
"""

from __future__ import annotations

import pytest
import torch
from tiny import Tiny


@pytest.fixture(scope="session")
def tiny():
    return Tiny


@pytest.fixture(scope="session")
def tiny_network():
    return Tiny.network().eval()


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, tiny_network):
    from tipr.pretrained import save_pretrained
    from tipr.processing import TIPRProcessor

    folder = tmp_path_factory.mktemp("pretrained") / "sen-tiny"
    save_pretrained(tiny_network, TIPRProcessor.for_model(tiny_network), folder)
    return folder


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-root")
    Tiny.data(root).prepare_data()  # generates <root>/synthetic and its token cache once
    return root


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads; on a shared 2-core CPU they only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
