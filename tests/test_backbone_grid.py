"""GridVisionEmbeddings refuses ``interpolate_pos_encoding=True`` instead of ignoring it."""

import pytest
import torch

from tipr.model.backbone import build_clip, set_image_size

MESSAGE = r"interpolate_pos_encoding=True.*once, at construction, to the 6x2 patch grid of 48x16 images.*set_image_size"


def test_interpolate_pos_encoding_true_is_an_error_naming_grid_and_image_size():
    model = build_clip("tiny")  # patch size 8
    embeddings = set_image_size(model, (48, 16))
    pixels = torch.randn(2, 3, 48, 16)
    with pytest.raises(ValueError, match=MESSAGE):
        embeddings(pixels, interpolate_pos_encoding=True)
    # Also when it comes through the CLIP vision tower, which passes the flag on.
    with pytest.raises(ValueError, match=MESSAGE):
        model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
    # False (what CLIP passes by default) is the table as built: CLS + position 0, patch i + position i.
    tokens = embeddings(pixels, interpolate_pos_encoding=False)
    patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, 12, D)
    table = embeddings.position_embedding.weight  # (1 + 12, D)
    assert tokens.shape == (2, 13, 64)
    assert torch.allclose(tokens[:, 0], (embeddings.class_embedding + table[0]).expand(2, -1))
    assert torch.allclose(tokens[:, 1:], patches + table[1:])
    assert torch.equal(tokens, embeddings(pixels))


def test_another_size_goes_through_set_image_size():
    model = build_clip("tiny")
    set_image_size(model, (48, 16))
    embeddings = set_image_size(model, (32, 32))  # what the error message asks for
    with pytest.raises(ValueError, match="4x4 patch grid of 32x32 images"):
        embeddings(torch.zeros(1, 3, 32, 32), interpolate_pos_encoding=True)
    assert embeddings(torch.zeros(1, 3, 32, 32)).shape == (1, 17, 64)
