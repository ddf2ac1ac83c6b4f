"""SENModel: features, text-guided restoration, gradients, input errors."""

import pytest
import torch

from tipr.methods.sen import SENModel
from tipr.model.losses import masked_patch_mse
from tipr.methods.sen.restoration import (
    num_visible_patches,
    patchify,
    random_patch_masking,
    sincos_position_table,
    to_grayscale,
    unpatchify,
)
from tipr.tokenization import tokenize
from tiny import Tiny


IMAGE_SIZE = Tiny.image_size  # patch 8 -> 4 x 2 grid
TEXT_LENGTH = Tiny.text_length
CAPTIONS = ["a man in a red shirt", "a woman with blue jeans and a black bag", "red shirt", "person"]


def _network(**kwargs):
    return Tiny.network(**{"num_classes": 3, **kwargs})


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, *IMAGE_SIZE, generator=g)
    return images, tokenize(CAPTIONS, context_length=TEXT_LENGTH), torch.tensor([0, 1, 0, 2])


@pytest.fixture(scope="module")
def network():
    return _network()


def test_helpers_by_hand():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(images, 2)  # (2, 2*3, 2*2*3)
    assert patches.shape == (2, 6, 12)
    # Patch (row 1, col 2) of image 1, pixel (0, 1), channel 2.
    assert patches[1, 1 * 3 + 2, (0 * 2 + 1) * 3 + 2] == images[1, 2, 2, 5]
    assert torch.equal(unpatchify(patches, 2, (2, 3)), images)
    gray = to_grayscale(torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert torch.allclose(gray, torch.full((1, 3, 2, 2), 0.2989 + 2 * 0.5870 + 3 * 0.1140))
    assert num_visible_patches(192, 0.7) == 56  # the reference's count on a 24 x 8 grid
    assert num_visible_patches(8, 0.7) == 1
    table = sincos_position_table((24, 8), 512)
    assert table.shape == (193, 512) and torch.count_nonzero(table[0]) == 0
    assert len({tuple(r.tolist()) for r in table[1:]}) == 192  # every grid position distinct


def test_random_masking_keeps_lowest_noise():
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.4, 0.0]])
    ids_keep, ids_restore, mask = random_patch_masking(noise, 2)
    assert ids_keep.tolist() == [[1, 3], [3, 0]]
    assert mask.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]
    assert torch.equal(torch.argsort(noise, 1).gather(1, ids_restore), torch.arange(4).expand(2, 4))


def test_global_features_are_cls_and_first_end_of_text(network):
    images, token_ids, _ = _batch()
    network.eval()
    with torch.no_grad():
        image_tokens = network.image_tokens(images)
        text_tokens, eot = network.text_tokens(token_ids)
        assert torch.equal(network.encode_image(images), image_tokens[:, 0])
        assert eot.tolist() == [int((row == 49407).nonzero()[0]) for row in token_ids]
        # encode_text stops at the batch's last end-of-text: the same up to summation order.
        assert torch.allclose(network.encode_text(token_ids), text_tokens[torch.arange(4), eot], rtol=0, atol=1e-5)
        # The same numbers as transformers' own pooled + projected features.
        hf_image = network.clip.get_image_features(pixel_values=images).pooler_output
        hf_text = network.clip.get_text_features(input_ids=token_ids).pooler_output
    assert torch.allclose(network.encode_image(images), hf_image, atol=1e-5)
    assert torch.allclose(network.encode_text(token_ids), hf_text, atol=1e-5)
    assert image_tokens.shape == (4, 1 + 8, 64) and text_tokens.shape == (4, TEXT_LENGTH, 64)


def test_encode_text_runs_only_up_to_the_last_end_of_text_and_gives_the_full_context_features():
    """CLIP's text attention is causal: truncating after the batch's last end-of-text changes no feature.

    Not bit for bit: the kernels sum in another order at another length. Measured on the tiny
    model: 7.7e-7 in float32, 2.7e-15 in float64 (bounds 1e-5 and 1e-12).
    """
    network = _network(text_length=77).eval()
    ids = tokenize(["a man in a red coat", "a woman with a long black skirt and a white bag"], context_length=77)
    last_eot = int((ids == network.eot_token_id).int().argmax(dim=1).max())
    lengths = []
    hook = network.clip.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        network.to(dtype)
        with torch.inference_mode():
            fast = network.encode_text(ids)
            full = network.pooled(*network.text_tokens(ids))  # all 77 positions
        assert torch.allclose(fast, full, rtol=0, atol=atol), (fast - full).abs().max()
    hook.remove()
    assert lengths == [last_eot + 1, 77, last_eot + 1, 77] and last_eot + 1 < 20


def test_forward_losses_and_weighted_sum(network):
    images, token_ids, pids = _batch()
    network.train()
    torch.manual_seed(1)
    losses = network(images, token_ids, pids)
    assert set(losses) == {"sdm", "id", "triplet", "restoration", "loss"}
    expected = losses["sdm"] + losses["id"] + 10 * losses["triplet"] + 10 * losses["restoration"]
    assert torch.allclose(losses["loss"], expected)
    # The TIR term is the masked MSE of restore() with the same masking noise.
    torch.manual_seed(1)
    noise = torch.rand(4, 8)
    text_tokens, eot = network.text_tokens(token_ids)
    restored = network.restore(images, text_tokens, eot, noise=noise)
    assert restored["mask"].sum(1).tolist() == [7.0] * 4  # 1 of 8 patches visible at 0.7
    assert torch.allclose(restored["target"], patchify(images, 8))
    tir = masked_patch_mse(restored["prediction"], restored["target"], restored["mask"])
    assert torch.allclose(tir, losses["restoration"], atol=1e-6)


def test_restoration_reads_only_visible_patches_of_a_grayscale_image(network):
    images, token_ids, _ = _batch()
    network.eval()
    noise = torch.rand(4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        text_tokens, eot = network.text_tokens(token_ids)
        base = network.restore(images, text_tokens, eot, noise=noise)
        hidden = base["mask"].bool()
        # Changing hidden patches, or the colour at constant gray, changes no prediction.
        changed = patchify(images, 8).clone()
        changed[hidden] += torch.randn_like(changed[hidden])
        changed = unpatchify(changed, 8, (4, 2))
        hue = torch.tensor([0.5870, -0.2989, 0.0]).view(1, 3, 1, 1)  # zero luminance change
        changed = changed + hue
        again = network.restore(changed, text_tokens, eot, noise=noise)
    assert torch.allclose(base["prediction"], again["prediction"], atol=1e-5)


def test_text_padding_mask_and_residual_options():
    images, token_ids, _ = _batch()
    noisy_padding = token_ids.clone()
    after_eot = torch.arange(TEXT_LENGTH)[None] > (token_ids == 49407).int().argmax(1)[:, None]
    noisy_padding[after_eot] = 320  # some BPE id instead of 0 after the end token
    noise = torch.rand(4, 8, generator=torch.Generator().manual_seed(3))
    results = {}
    for masked in (True, False):
        network = _network(restoration_text_padding_mask=masked).eval()
        with torch.no_grad():
            preds = [network.restore(images, *network.text_tokens(ids), noise=noise)["prediction"]
                     for ids in (token_ids, noisy_padding)]
        results[masked] = torch.allclose(preds[0], preds[1], atol=1e-6)
    assert results == {True: True, False: False}  # the reference variant attends to the padding
    residual = _network(restoration_residual=True).eval()
    plain = _network(restoration_residual=False).eval()
    with torch.no_grad():
        args = (images, *plain.text_tokens(token_ids))
        assert not torch.allclose(residual.restore(*args, noise=noise)["prediction"],
                                  plain.restore(*args, noise=noise)["prediction"])


def test_tir_gradients_reach_vision_encoder_text_encoder_and_decoder():
    network = _network(loss_weights={"restoration": 1.0}).train()
    images, token_ids, pids = _batch()
    losses = network(images, token_ids, pids)
    assert set(losses) == {"restoration", "loss"}
    losses["loss"].backward()
    must_move = [
        "clip.vision_model.embeddings.patch_embedding.weight",
        "clip.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "clip.visual_projection.weight",
        "clip.text_model.embeddings.token_embedding.weight",  # only via the cross-attention
        "clip.text_model.encoder.layers.0.mlp.fc1.weight",
        "clip.text_projection.weight",
        "restoration.decoder_embed.weight",
        "restoration.cross_attn.in_proj_weight",
        "restoration.transformer.3.mlp.fc2.weight",
        "restoration.pixel_head.weight",
    ]
    params = dict(network.named_parameters())
    for name in must_move:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    # No retrieval loss here, so the CLS-only post-norm path to the global feature is unused
    # but CLIP's logit scale is frozen and never receives a gradient.
    assert params.get("clip.logit_scale") is None or params["clip.logit_scale"].grad is None
    assert params["classifier.weight"].grad is None  # the head exists; its loss is off


def test_heads_exist_because_the_method_has_them_not_because_a_weight_is_above_zero():
    full = _network()
    off = _network(loss_weights={"sdm": 1.0})
    assert list(full.state_dict()) == list(off.state_dict())
    assert any(k.startswith("restoration.") for k in off.state_dict()) and "classifier.weight" in off.state_dict()
    images, token_ids, pids = _batch()
    assert set(off(images, token_ids, pids)) == {"sdm", "loss"}


def test_every_loss_gives_gradients_to_both_encoders():
    network = _network(loss_weights={"sdm": 1, "id": 1, "triplet": 10, "itc": 1}).train()
    images, token_ids, pids = _batch()
    network(images, token_ids, pids)["loss"].backward()
    assert network.restoration.pixel_head.weight.grad is None  # TIR off: its head gets nothing
    for name in ("clip.vision_model.encoder.layers.1.mlp.fc2.weight", "clip.text_model.encoder.layers.1.mlp.fc2.weight",
                 "classifier.weight"):
        assert dict(network.named_parameters())[name].grad.abs().sum() > 0, name


def test_bad_inputs_name_the_value(network):
    images, token_ids, pids = _batch()
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 16\), got \(4, 3, 16, 32\)"):
        network.encode_image(images.transpose(2, 3))
    with pytest.raises(ValueError, match=r"got \(4, 1, 32, 16\)"):
        network.encode_image(images[:, :1])
    long_ids = tokenize(CAPTIONS, context_length=20)
    with pytest.raises(ValueError, match="20 positions, more than the text context \\(16\\)"):
        network.encode_text(long_ids)
    no_eot = token_ids.clone()
    no_eot[2][no_eot[2] == 49407] = 0
    with pytest.raises(ValueError, match="row 2 has no end-of-text token"):
        network.encode_text(no_eot)
    out_of_vocab = token_ids.clone()
    out_of_vocab[0, 1] = 50000
    with pytest.raises(ValueError, match="outside 0..49407: min 0, max 50000"):
        network.encode_text(out_of_vocab)
    with pytest.raises(ValueError, match=r"pids range 0..3 does not fit the ID classifier's 3 classes"):
        network(images, token_ids, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="batch sizes differ"):
        network(images, token_ids, pids[:3])
    with pytest.raises(TypeError, match="mlm_weight"):
        _network(loss_weights={"sdm": 1, "mlm": 1})
    with pytest.raises(ValueError, match="sen triplet_weight=-1.0 must be >= 0"):
        _network(loss_weights={"triplet": -1})
    with pytest.raises(ValueError, match="every loss weight is 0"):
        _network(loss_weights={})
    with pytest.raises(ValueError, match="id_weight > 0 needs num_classes >= 1"):
        _network(num_classes=0)
    with pytest.raises(ValueError, match=r"image_size \(30, 16\)"):
        _network(image_size=(30, 16))
    with pytest.raises(ValueError, match="mask_ratio must be in \\(0, 1\\), got 1.0"):
        _network(mask_ratio=1.0)
    with pytest.raises(ValueError, match=r"text_length must be in 2..16 \(the text encoder's context\), got 40"):
        SENModel.from_backbone(network.clip, num_classes=3, image_size=IMAGE_SIZE, text_length=40)
