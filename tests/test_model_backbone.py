"""The CLIP backbone: presets, position-table resize, grid embeddings, loading errors."""

import pytest
import torch
import torch.nn.functional as F

from tipr.model.backbone import (
    GridVisionEmbeddings,
    build_clip,
    clip_config,
    eot_token_id,
    resize_position_embedding,
    set_image_size,
)


def test_tiny_preset_uses_the_clip_vocabulary_and_text_length():
    config = clip_config("tiny", text_length=24)
    assert config.text_config.vocab_size == 49408
    assert (config.text_config.bos_token_id, config.text_config.eos_token_id) == (49406, 49407)
    assert config.text_config.max_position_embeddings == 24
    assert eot_token_id(config) == 49407
    model = build_clip("tiny", text_length=24)
    assert model.config._attn_implementation == "sdpa"
    assert not model.logit_scale.requires_grad
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_legacy_eos_id_maps_to_clip_end_of_text():
    config = clip_config({"text_config": {"eos_token_id": 2}, "projection_dim": 8})
    assert eot_token_id(config) == 49407


def test_resize_square_table_to_non_square_grid_keeps_cls():
    # A "pretrained" 4x4 table whose patch rows vary along the height only.
    d = 3
    rows = torch.arange(4, dtype=torch.float32)[:, None, None].expand(4, 4, d)  # (h, w, d)
    cls = torch.tensor([[7.0, -1.0, 0.5]])
    table = torch.cat([cls, rows.reshape(16, d)])  # (1 + 16, d)
    resized = resize_position_embedding(table, (6, 2))
    assert resized.shape == (1 + 12, d)
    assert torch.equal(resized[0], cls[0])
    grid = resized[1:].reshape(6, 2, d)
    assert torch.allclose(grid[:, 0], grid[:, 1])  # constant along the width
    assert grid[-1, 0, 0] > grid[0, 0, 0]  # still increasing along the height
    # Bilinear, align_corners off, as the reference code: row i samples source row
    # (i + 0.5) * 4 / 6 - 0.5, clamped to the table, so the values are known exactly.
    expected = torch.tensor([0.0, 0.5, 7 / 6, 11 / 6, 2.5, 3.0])
    assert torch.allclose(grid[:, 0, 0], expected, atol=1e-6)
    # Bicubic on request: the same as F.interpolate done by hand (and not the bilinear table).
    bicubic = resize_position_embedding(table, (6, 2), interpolation="bicubic")[1:].reshape(6, 2, d)
    by_hand = F.interpolate(rows.permute(2, 0, 1)[None], size=(6, 2), mode="bicubic", align_corners=False)
    assert torch.allclose(bicubic, by_hand[0].permute(1, 2, 0), atol=1e-6)
    assert not torch.allclose(bicubic, grid, atol=1e-3)
    with pytest.raises(ValueError, match="position_interpolation.*'nearest'"):
        resize_position_embedding(table, (6, 2), interpolation="nearest")
    # Same grid: untouched; non-square source needs old_grid.
    assert resize_position_embedding(table, (4, 4)) is table
    with pytest.raises(ValueError, match="12 patch rows"):
        resize_position_embedding(resized, (4, 4))
    back = resize_position_embedding(resized, (6, 2), old_grid=(6, 2))
    assert back is resized


def test_set_image_size_resizes_the_table_once_and_keeps_state_dict_keys():
    model = build_clip("tiny")
    square = model.vision_model.embeddings.position_embedding.weight.detach().clone()  # (1 + 4*4, 64)
    keys = set(model.state_dict())
    embeddings = set_image_size(model, (48, 16))
    assert isinstance(model.vision_model.embeddings, GridVisionEmbeddings)
    assert embeddings.grid_size == (6, 2) and embeddings.num_patches == 12
    assert torch.allclose(embeddings.position_embedding.weight, resize_position_embedding(square, (6, 2)))
    assert set(model.state_dict()) == keys  # same parameter names, loadable either way


def test_forward_never_interpolates(monkeypatch):
    model = build_clip("tiny")
    embeddings = set_image_size(model, (48, 16))

    def forbidden(*args, **kwargs):
        raise AssertionError("interpolation inside a forward pass")

    monkeypatch.setattr(F, "interpolate", forbidden)
    tokens = embeddings(torch.randn(2, 3, 48, 16))
    assert tokens.shape == (2, 13, 64)
    # CLS + position 0, patches + their positions.
    patches = embeddings.patch_embedding(torch.zeros(1, 3, 48, 16)).flatten(2).transpose(1, 2)
    zero = embeddings(torch.zeros(1, 3, 48, 16))
    assert torch.allclose(zero[0, 0], embeddings.class_embedding + embeddings.position_embedding.weight[0])
    assert torch.allclose(zero[0, 1:], patches[0] + embeddings.position_embedding.weight[1:])


def test_bad_image_sizes_and_backbones_name_the_value(tmp_path):
    model = build_clip("tiny")
    with pytest.raises(ValueError, match=r"\(30, 16\).*patch size 8"):
        set_image_size(model, (30, 16))
    embeddings = set_image_size(model, (32, 16))
    with pytest.raises(ValueError, match=r"\(2, 3, 40, 16\)"):
        embeddings(torch.zeros(2, 3, 40, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 16\).*\(2, 1, 32, 16\)"):
        embeddings(torch.zeros(2, 1, 32, 16))
    with pytest.raises(FileNotFoundError, match="no-such-clip"):
        build_clip(str(tmp_path / "no-such-clip"))
    with pytest.raises(ValueError, match="unknown backbone preset 'huge'"):
        clip_config("huge")
    with pytest.raises(ValueError, match="not_a_key"):
        build_clip({"not_a_key": 1})
    with pytest.raises(ValueError, match="text_length 100"):
        build_clip({"projection_dim": 8}, text_length=100)


def test_local_folder_loads_without_network(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = build_clip("tiny")
    source.save_pretrained(tmp_path / "clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = build_clip(str(tmp_path / "clip"))
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config._attn_implementation == "sdpa"


def test_hub_id_goes_to_from_pretrained_and_failures_name_it(monkeypatch):
    from transformers import CLIPModel

    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        raise OSError("not cached and offline")

    from tipr.model import hub

    monkeypatch.setattr(CLIPModel, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)  # as with a network: the cache, then the hub
    with pytest.raises(OSError, match="'openai/clip-vit-base-patch16'.*hub id"):
        build_clip("openai/clip-vit-base-patch16")
    assert [name for name, _ in calls] == ["openai/clip-vit-base-patch16"] * 2
    assert [kwargs["local_files_only"] for _, kwargs in calls] == [True, False]
    assert all(kwargs["dtype"] == torch.float32 and kwargs["attn_implementation"] == "sdpa" for _, kwargs in calls)
