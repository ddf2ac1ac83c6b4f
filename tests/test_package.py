"""The package imports offline, cheaply, and ships its assets."""

import subprocess
import sys
from importlib import resources


def test_version_without_network_or_heavy_imports():
    code = "import sys, tipr; print(tipr.__version__); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "0.1.0"
    assert out[1] == "False", "importing tipr must not import torch"


def test_assets_are_package_data():
    root = resources.files("tipr") / "assets"
    for name in ("clip_bpe/vocab.json", "clip_bpe/merges.txt", "pos_tagger/ewt_perceptron.json.gz"):
        assert (root / name).is_file(), name


def test_nltk_never_downloads(monkeypatch):
    import nltk

    def forbidden(*args, **kwargs):
        raise AssertionError("nltk.download must never be called")

    monkeypatch.setattr(nltk, "download", forbidden)
    from tipr.data.pruning import load_pos_tagger, prune_caption

    load_pos_tagger.cache_clear()
    assert prune_caption("a man in a red coat") == "man red coat"
