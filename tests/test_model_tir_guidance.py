"""Text guides the restoration: a light run of experiments/tir_text_guidance.py.

On images whose colours only the caption tells (isoluminant palette, so the
grayscale input holds no colour), a short SEN training run restores masked
patches much better with the true captions than with captions shuffled across
the batch or a caption without colours.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from tipr.model.restoration import to_grayscale

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "tir_text_guidance.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("tir_text_guidance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_images_hold_colour_only_in_the_caption(experiment):
    data = experiment.ColourOnlyInText(8, seed=0)
    palette = experiment.isoluminant_palette()
    assert torch.allclose(to_grayscale(palette.view(-1, 3, 1, 1)), torch.zeros(len(palette), 3, 1, 1), atol=1e-6)
    assert torch.cdist(palette, palette).add(torch.eye(len(palette))).min() > 0.5  # distinct colours
    # Recolouring the shirt with any other palette colour leaves the grayscale input unchanged.
    image = data.images[:1]
    recoloured = image.clone()
    h = image.shape[2] // 2
    recoloured[:, :, :h] += (palette[(int(data.upper[0]) + 1) % len(palette)] - palette[data.upper[0]]).view(3, 1, 1)
    assert not torch.allclose(recoloured, image)
    assert torch.allclose(to_grayscale(recoloured), to_grayscale(image), atol=1e-5)
    for i in range(8):
        assert experiment.COLOURS[int(data.upper[i])] in data.captions[i]
        assert experiment.COLOURS[int(data.lower[i])] in data.captions[i]


def test_true_captions_restore_better_than_shuffled_ones(experiment):
    threads = torch.get_num_threads()
    try:
        errors = experiment.main(
            ["--steps", "100", "--batch-size", "16", "--train-size", "256", "--eval-size", "64", "--lr", "1e-3",
             "--image-size", "32", "16", "--threads", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    assert errors["true captions"] < 0.7 * errors["shuffled captions"]
    assert errors["true captions"] < 0.8 * errors["colourless caption"]
    assert errors["true captions"] < 0.8 * errors["predict zero colour"]
