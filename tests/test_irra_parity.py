"""IRRA checkpoints from the authors' code (anosorae/IRRA): ``load_reference_checkpoint`` gives an
``IRRAModel`` whose training losses equal the reference forward, written here in plain torch."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tipr.convert import load_reference_checkpoint
from tipr.methods.irra import IRRAConfig, IRRAModel
from tipr.model import TIPRModel
from openai_reference import (
    _attention, _layers, _linear, _ln, openai_block, openai_tokens, random_irra_heads, reference_sdm_and_id,
    reference_state_dict,
)

IMAGE_SIZE = (32, 16)  # patch 8: a 4 x 2 grid, 8 patches + CLS
CONTEXT = 16
NUM_CLASSES = 3
VOCAB = 1000  # not OpenAI's 49,408: the three highest ids are mask, start and end (as IRRA's tokenizer)
MASK, SOT, EOT = VOCAB - 3, VOCAB - 2, VOCAB - 1  # 997, 998, 999
WIDTH = 128  # the projection width: the cross-modal modules' width, 128 // 64 = 2 heads, MLP 512
DEPTH = 4  # IRRA's cmt_depth
TEMPERATURE = 0.02
# OpenAI shapes (width // 64 heads, QuickGELU) where the sizes differ: vision 128 wide (2 heads, MLP 2x,
# 2 layers), text 64 wide (1 head, MLP 4x, 2 layers), projection 128.
CLIP_CONFIG = {
    "vision_config": {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "patch_size": 8, "image_size": 32, "hidden_act": "quick_gelu",
    },
    "text_config": {
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 1,
        "max_position_embeddings": CONTEXT, "hidden_act": "quick_gelu", "vocab_size": VOCAB,
        "bos_token_id": SOT, "eos_token_id": EOT,
    },
    "projection_dim": WIDTH,
}


def irra_inputs():
    """Four images, captions (end-of-text at 5, 3, 15 and 9), person ids (0 twice) and the MLM inputs:
    positions replaced by the mask id, one by another word and one kept, labelled with the original
    ids; every other label 0 (ignored)."""
    g = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, *IMAGE_SIZE, generator=g)
    words = torch.randint(1, MASK, (4, CONTEXT), generator=g)
    input_ids = torch.zeros(4, CONTEXT, dtype=torch.long)
    for row, end in enumerate((5, 3, CONTEXT - 1, 9)):
        input_ids[row, 0], input_ids[row, 1:end], input_ids[row, end] = SOT, words[row, 1:end], EOT
    mlm_input_ids, mlm_labels = input_ids.clone(), torch.zeros_like(input_ids)
    for row, col in ((0, 1), (0, 3), (1, 2), (2, 1), (2, 7), (2, 14), (3, 4)):
        mlm_input_ids[row, col], mlm_labels[row, col] = MASK, input_ids[row, col]
    mlm_input_ids[2, 10], mlm_labels[2, 10] = int(input_ids[2, 10]) % (MASK - 1) + 1, input_ids[2, 10]  # another word
    mlm_labels[3, 6] = input_ids[3, 6]  # chosen, left unchanged
    return images, input_ids, torch.tensor([0, 1, 0, 2]), mlm_input_ids, mlm_labels


def irra_reference_losses(model, images, input_ids, pids, mlm_input_ids, mlm_labels, temperature=TEMPERATURE):
    """IRRA's training losses (``sdm+id+mlm``, weights 1, 1, 1) on its own state dict, in plain torch."""
    w = {key: value.float() for key, value in model.items()}
    clip = {key.removeprefix("base_model."): value for key, value in w.items() if key.startswith("base_model.")}
    image_tokens, text_tokens = openai_tokens(clip, images, input_ids)  # (B, 1 + 8, E), (B, L, E)
    i_feats = image_tokens[:, 0]
    t_feats = text_tokens[torch.arange(len(input_ids)), input_ids.argmax(dim=-1)]

    sdm, id_loss, _, _ = reference_sdm_and_id(w, i_feats, t_feats, pids, temperature)

    # MLM (IRRA.cross_former + mlm_head): every token of the masked caption (final norm + projection)
    # queries every image token (CLS included) of the retrieval pass; no residual, no padding mask.
    _, mlm_tokens = openai_tokens(clip, images, mlm_input_ids)
    q_in, kv_in = _ln(w, mlm_tokens, "ln_pre_t"), _ln(w, image_tokens, "ln_pre_i")
    q, k, v = (
        x @ weight.t() + bias
        for x, weight, bias in zip(
            (q_in, kv_in, kv_in), w["cross_attn.in_proj_weight"].chunk(3), w["cross_attn.in_proj_bias"].chunk(3)
        )
    )
    scores, values, shape = _attention(q, k, v, heads=WIDTH // 64)
    x = _linear(w, (scores.softmax(dim=-1) @ values).transpose(1, 2).reshape(shape), "cross_attn.out_proj")
    for i in range(_layers(w, "cross_modal_transformer.resblocks.")):
        x = openai_block(w, x, f"cross_modal_transformer.resblocks.{i}")  # no attention mask
    x = _linear(w, _ln(w, x, "ln_post"), "mlm_head.dense")
    x = _linear(w, _ln(w, x * torch.sigmoid(1.702 * x), "mlm_head.ln"), "mlm_head.fc")  # QuickGELU
    mlm = F.cross_entropy(x.reshape(-1, x.shape[-1]), mlm_labels.reshape(-1), ignore_index=0)

    return {"sdm": sdm, "id": id_loss, "mlm": mlm, "loss": sdm + id_loss + mlm}


def losses(network, inputs) -> dict[str, torch.Tensor]:
    images, input_ids, pids, mlm_input_ids, mlm_labels = inputs
    with torch.no_grad():
        out = network(
            pixel_values=images, input_ids=input_ids, pids=pids, mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels
        )
    return {name: getattr(out, name) for name in ("sdm", "id", "mlm", "loss")}


@pytest.fixture(scope="module")
def irra_ckpt(tmp_path_factory):
    """An IRRA ``best.pth``: the CLIP in OpenAI's layout under ``base_model.`` (no logit_scale, as
    IRRA saves it), the ID classifier and the MLM modules, every tensor random."""
    torch.manual_seed(8)
    source = IRRAModel.from_backbone(CLIP_CONFIG, NUM_CLASSES, image_size=IMAGE_SIZE, text_length=CONTEXT)
    with torch.no_grad():
        for param in source.clip.parameters():  # no tensor keeps an init (ones, zeros) that would hide a swap
            param.add_(0.05 * torch.randn_like(param))
    heads = random_irra_heads(torch.Generator().manual_seed(9), WIDTH, VOCAB, NUM_CLASSES, DEPTH)
    model = reference_state_dict(source.clip, heads)
    path = tmp_path_factory.mktemp("irra") / "best.pth"
    torch.save({"model": model}, path)
    return path


@pytest.fixture(scope="module")
def irra_converted(irra_ckpt):
    model, report = load_reference_checkpoint(irra_ckpt, image_size=IMAGE_SIZE)
    assert isinstance(model, IRRAModel) and isinstance(model.config, IRRAConfig)
    return model.eval(), report


def test_irra_checkpoint_losses_match_the_reference_forward(irra_ckpt, irra_converted):
    inputs = irra_inputs()
    ours = losses(irra_converted[0], inputs)
    model = torch.load(irra_ckpt, weights_only=True)["model"]
    with torch.no_grad():
        expected = irra_reference_losses(model, *inputs)
    for name, value in expected.items():  # measured: at most 4e-6 (SDM, about 22), float32 rounding
        assert_close(ours[name], value, atol=1e-5, rtol=1e-6, msg=name)
    # Every term is live: the MLM reads 9 labelled positions out of 64, none of the losses is trivially 0.
    assert int((inputs[4] > 0).sum()) == 9 and inputs[3].eq(MASK).sum() == 7
    assert expected["mlm"] > 1 and expected["sdm"] > 0.1 and expected["id"] > 0.1


def test_irra_mlm_loss_depends_on_the_image_and_the_masked_caption(irra_ckpt, irra_converted):
    images, input_ids, pids, mlm_input_ids, mlm_labels = inputs = irra_inputs()
    base = losses(irra_converted[0], inputs)
    other_images = losses(irra_converted[0], (images.flip(0), input_ids, pids, mlm_input_ids, mlm_labels))
    unmasked = losses(irra_converted[0], (images, input_ids, pids, input_ids, mlm_labels))
    assert not torch.allclose(other_images["mlm"], base["mlm"], atol=1e-4)  # the cross-attention reads the image
    assert not torch.allclose(unmasked["mlm"], base["mlm"], atol=1e-4)  # the second text pass reads mlm_input_ids
    assert torch.equal(unmasked["sdm"], base["sdm"])  # the retrieval pass reads input_ids only


def test_irra_report_names_no_reinitialised_head_and_no_unused_key(irra_converted):
    report = irra_converted[1]
    assert report.reinitialised == {}
    assert report.unused == []  # every IRRA tensor has a home
    printed = str(report)
    assert "re-initialised" not in printed and "unused source keys (0): none" in printed
    assert "ID classifier (3 classes)" in printed and f"cross-modal MLM head (cross_attn, {DEPTH} blocks" in printed
    network = irra_converted[0]
    assert (network.config.cross_modal_depth, network.config.temperature) == (DEPTH, TEMPERATURE)
    assert (network.vocab_size, network.mask_token_id, network.eot_token_id) == (VOCAB, MASK, EOT)


def test_irra_conversion_reloads_through_a_pretrained_folder(tmp_path, irra_converted):
    network = irra_converted[0]
    network.save_pretrained(tmp_path / "irra")
    reloaded = TIPRModel.from_pretrained(tmp_path / "irra")
    assert type(reloaded) is IRRAModel and reloaded.config == network.config
    assert sorted(reloaded.state_dict()) == sorted(network.state_dict())
    before, after = losses(network, irra_inputs()), losses(reloaded.eval(), irra_inputs())
    for name, value in before.items():
        assert torch.equal(after[name], value), name
