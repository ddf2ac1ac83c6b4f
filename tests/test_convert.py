"""Importing IRRA/SEN reference checkpoints and OpenAI CLIP weights: ``tipr.convert`` and ``tipr convert``."""

import argparse
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from tipr.cli import main
from tipr.convert import (
    ConversionReport,
    convert_openai_clip_state_dict,
    load_reference_checkpoint,
    read_state_dict,
)
from tipr.model import SENNetwork, TIPRModule, build_clip, resize_position_embedding

IMAGE_SIZE = (32, 16)  # patch 8: a 4 x 2 grid
CONTEXT = 16
NUM_CLASSES = 5
SOT, EOT = 49406, 49407
# OpenAI shapes (width // 64 heads, QuickGELU) where every size differs: vision 128 wide
# (2 heads, MLP 2x, 2 layers), text 64 wide (1 head, MLP 4x, 3 layers), embedding 32; a
# swapped, untransposed or mis-split tensor cannot fit.
CONFIG = {
    "vision_config": {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "patch_size": 8, "image_size": 32, "hidden_act": "quick_gelu",
    },
    "text_config": {
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 1,
        "max_position_embeddings": CONTEXT, "hidden_act": "quick_gelu",
    },
    "projection_dim": 32,
}
# IRRA's MLM modules: no tipr counterpart.
IRRA_HEADS = {
    "cross_attn.in_proj_weight": (96, 32),
    "cross_attn.in_proj_bias": (96,),
    "cross_attn.out_proj.weight": (32, 32),
    "cross_attn.out_proj.bias": (32,),
    "mlm_head.fc.weight": (10, 32),
}


def to_openai(clip) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPModel`` in OpenAI's layout, written out by hand (the inverse of the conversion)."""
    hf = {key: value.detach().clone() for key, value in clip.state_dict().items()}
    openai = {
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].t().contiguous(),  # used as x @ proj
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].t().contiguous(),
        "logit_scale": hf["logit_scale"],
    }
    towers = (("visual.transformer", "vision_model.encoder", 2), ("transformer", "text_model.encoder", 3))
    for ours, theirs, layers in towers:
        for i in range(layers):
            a, b = f"{ours}.resblocks.{i}.", f"{theirs}.layers.{i}."
            for kind in ("weight", "bias"):
                openai[f"{a}attn.in_proj_{kind}"] = torch.cat([hf[f"{b}self_attn.{x}_proj.{kind}"] for x in "qkv"])
                for old, new in (
                    ("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"), ("ln_2", "layer_norm2"),
                ):
                    openai[f"{a}{old}.{kind}"] = hf[f"{b}{new}.{kind}"]
    return openai


def openai_forward(weights: dict[str, torch.Tensor], images: torch.Tensor, token_ids: torch.Tensor):
    """OpenAI CLIP's forward on its own tensors: image features (B, E) and text features (B, E)."""
    w = {key: value.float() for key, value in weights.items()}

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)

    def linear(x, name):
        return x @ w[f"{name}.weight"].t() + w[f"{name}.bias"]

    def block(x, name, causal):
        b, n, width = x.shape
        heads = width // 64
        qkv = ln(x, f"{name}.ln_1") @ w[f"{name}.attn.in_proj_weight"].t() + w[f"{name}.attn.in_proj_bias"]
        q, k, v = (t.reshape(b, n, heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, h, N, d)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, width)
        x = x + linear(attended, f"{name}.attn.out_proj")
        hidden = linear(ln(x, f"{name}.ln_2"), f"{name}.mlp.c_fc")
        return x + linear(hidden * torch.sigmoid(1.702 * hidden), f"{name}.mlp.c_proj")  # QuickGELU

    def layers(prefix):
        return sum(key.startswith(prefix) and key.endswith(".attn.in_proj_weight") for key in w)

    patch = w["visual.conv1.weight"].shape[-1]
    x = F.conv2d(images, w["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)  # (B, N, W)
    x = torch.cat([w["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = ln(x + w["visual.positional_embedding"], "visual.ln_pre")
    for i in range(layers("visual.transformer.resblocks.")):
        x = block(x, f"visual.transformer.resblocks.{i}", causal=False)
    image = ln(x[:, 0], "visual.ln_post") @ w["visual.proj"]

    t = w["token_embedding.weight"][token_ids] + w["positional_embedding"][: token_ids.shape[1]]
    for i in range(layers("transformer.resblocks.")):
        t = block(t, f"transformer.resblocks.{i}", causal=True)
    t = ln(t, "ln_final")
    text = t[torch.arange(t.shape[0]), token_ids.argmax(dim=-1)] @ w["text_projection"]
    return image, text


def inputs():
    """Three images and three captions: end-of-text early, right after the start, at the last position."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, *IMAGE_SIZE, generator=g)
    words = torch.randint(1, SOT, (3, CONTEXT), generator=g)
    token_ids = torch.zeros(3, CONTEXT, dtype=torch.long)  # zero padding after end-of-text
    for row, end in enumerate((5, 1, CONTEXT - 1)):
        token_ids[row, 0], token_ids[row, 1:end], token_ids[row, end] = SOT, words[row, 1:end], EOT
    return images, token_ids


def encode(network, images, token_ids):
    with torch.no_grad():
        return network.encode_image(images), network.encode_text(token_ids)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    network = SENNetwork(
        build_clip(CONFIG, CONTEXT), NUM_CLASSES, image_size=IMAGE_SIZE, text_length=CONTEXT,
        loss_weights={"sdm": 1.0, "id": 1.0},
    )
    with torch.no_grad():
        for param in network.parameters():  # no tensor keeps an init (ones, zeros) that would hide a swap
            param.add_(0.05 * torch.randn_like(param))
    return network.eval()


@pytest.fixture(scope="module")
def openai_weights(source):
    return to_openai(source.clip)


@pytest.fixture(scope="module")
def reference_ckpt(source, openai_weights, tmp_path_factory):
    """An IRRA-style ``best.pth``: CLIP under ``base_model.`` (no logit_scale, as IRRA), classifier, MLM heads."""
    model = {"base_model." + key: value for key, value in openai_weights.items() if key != "logit_scale"}
    model["classifier.weight"] = source.classifier.weight.detach().clone()
    model["classifier.bias"] = source.classifier.bias.detach().clone()
    model.update({key: torch.randn(shape) for key, shape in IRRA_HEADS.items()})
    path = tmp_path_factory.mktemp("reference") / "best.pth"
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}
    torch.save({"model": model, "optimizer": optimizer, "num_epoch": 60, "iteration": 0, "epoch": 37}, path)
    return path


@pytest.fixture(scope="module")
def converted(reference_ckpt):
    module, report = load_reference_checkpoint(reference_ckpt, image_size=IMAGE_SIZE)
    return module.eval(), report


def test_mapping_inverts_the_hand_written_inverse(source, openai_weights):
    result = convert_openai_clip_state_dict(openai_weights, IMAGE_SIZE)
    expected = source.clip.state_dict()
    assert sorted(result.state_dict) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(result.state_dict[key], value), key
    assert (result.unused, result.notes) == ([], [])
    with pytest.raises(ValueError, match=r"image_size \(30, 16\) must be positive multiples of the patch size 8"):
        convert_openai_clip_state_dict(openai_weights, (30, 16))


def test_reference_checkpoint_gives_the_source_embeddings(source, converted):
    module, _ = converted
    images, token_ids = inputs()
    image, text = encode(module.network, images, token_ids)
    source_image, source_text = encode(source, images, token_ids)
    assert_close(image, source_image, atol=1e-5, rtol=1e-5)
    assert_close(text, source_text, atol=1e-5, rtol=1e-5)
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_embeddings_match_openai_clip_run_on_the_source_tensors(openai_weights, converted):
    module, _ = converted
    images, token_ids = inputs()
    image, text = encode(module.network, images, token_ids)
    reference_image, reference_text = openai_forward(openai_weights, images, token_ids)
    assert_close(image, reference_image, atol=1e-5, rtol=1e-5)
    assert_close(text, reference_text, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(text[0], text[1], atol=1e-3)  # the pooled position matters


def test_config_classifier_and_report(source, converted):
    module, report = converted
    config = module.network.clip.config
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        128, 256, 2, 2,
    )
    assert (vision.patch_size, vision.hidden_act, vision.layer_norm_eps) == (8, "quick_gelu", 1e-5)
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads) == (
        64, 256, 3, 1,
    )
    assert (text.max_position_embeddings, text.vocab_size, config.projection_dim) == (CONTEXT, 49408, 32)
    assert (module.hparams.num_classes, module.hparams.text_length) == (NUM_CLASSES, CONTEXT)
    assert torch.equal(module.network.classifier.weight, source.classifier.weight)
    assert torch.equal(module.network.classifier.bias, source.classifier.bias)

    assert report.layout == "IRRA/SEN checkpoint, CLIP under 'base_model.'"
    assert report.reinitialised == {"restoration": "TIR head: no counterpart in the source"}
    assert report.unused == sorted(IRRA_HEADS)
    assert report.notes == []
    printed = str(report)
    assert "loaded: CLIP backbone (" in printed and "ID classifier (5 classes)" in printed
    assert "re-initialised: restoration (TIR head: no counterpart in the source)" in printed
    assert "unused source keys (5): cross_attn.* (4), mlm_head.fc.weight" in printed


def test_classifier_of_another_size_is_reinitialised(reference_ckpt):
    module = TIPRModule.from_reference_checkpoint(reference_ckpt, image_size=IMAGE_SIZE, num_classes=7, tir_weight=0)
    report = module.conversion_report
    assert isinstance(report, ConversionReport)
    assert report.reinitialised == {"classifier": "ID classifier: the source's has 5 classes, num_classes is 7"}
    assert module.network.classifier.out_features == 7 and module.network.restoration is None
    assert report.unused == sorted([*IRRA_HEADS, "classifier.weight", "classifier.bias"])


def test_plain_openai_state_dict_with_a_square_position_table(tmp_path, openai_weights):
    # As OpenAI's clip saves it: no prefix, fp16, the square table of its pretraining size (4 x 4).
    plain = {key: value.half() for key, value in openai_weights.items()}
    square = torch.randn(1 + 4 * 4, 128, generator=torch.Generator().manual_seed(2))
    plain["visual.positional_embedding"] = square.half()
    path = tmp_path / "ViT-tiny.pt"
    torch.save(plain, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: has no ID classifier") + ".*give num_classes"):
        load_reference_checkpoint(path, image_size=IMAGE_SIZE)

    module, report = load_reference_checkpoint(path, image_size=IMAGE_SIZE, num_classes=3)
    assert report.layout == "OpenAI CLIP state dict"
    assert report.notes == ["vision position table resized from the square 4x4 grid to 4x2"]
    assert set(report.reinitialised) == {"classifier", "restoration"}
    assert report.reinitialised["classifier"] == "ID classifier: the source has none; 3 classes"
    assert report.unused == []
    table = resize_position_embedding(plain["visual.positional_embedding"].float(), (4, 2))  # (1 + 8, 128)
    assert torch.equal(module.network.embeddings.position_embedding.weight, table)
    assert module.network.clip.config.vision_config.image_size == 32
    assert torch.equal(module.network.clip.logit_scale, plain["logit_scale"].float())

    images, token_ids = inputs()
    image, text = encode(module.eval().network, images, token_ids)
    reference_image, reference_text = openai_forward({**plain, "visual.positional_embedding": table}, images, token_ids)
    assert_close(image, reference_image, atol=1e-5, rtol=1e-5)
    assert_close(text, reference_text, atol=1e-5, rtol=1e-5)


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _module_tree(weights: dict[str, torch.Tensor]) -> nn.Module:
    """Modules nested as the dotted names say, holding ``weights``: scripted, an OpenAI-style archive."""
    root = _Holder()
    for key, value in weights.items():
        *path, leaf = key.split(".")
        node = root
        for name in path:
            if not hasattr(node, name):
                node.add_module(name, _Holder())
            node = getattr(node, name)
        node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    return root


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notice
def test_ddp_prefixed_and_torchscript_sources(tmp_path, openai_weights, converted):
    bare = tmp_path / "bare.pth"  # a bare state dict saved from a DDP-wrapped IRRA model
    torch.save({"module.base_model." + key: value for key, value in openai_weights.items()}, bare)
    state = read_state_dict(bare)
    assert sorted(state) == sorted("base_model." + key for key in openai_weights)

    archive = tmp_path / "ViT-tiny.pt"  # OpenAI's published files are TorchScript archives
    torch.jit.script(_module_tree(openai_weights)).save(str(archive))
    module, report = load_reference_checkpoint(archive, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
    assert report.layout == "OpenAI CLIP state dict" and report.unused == []
    expected = converted[0].network.clip.state_dict()
    for key, value in module.network.clip.state_dict().items():
        assert torch.equal(value, openai_weights["logit_scale"] if key == "logit_scale" else expected[key]), key


def test_tensors_that_do_not_fit_are_listed_in_one_error(tmp_path, reference_ckpt):
    checkpoint = torch.load(reference_ckpt, weights_only=True)
    model = checkpoint["model"]
    del model["base_model.visual.transformer.resblocks.1.ln_2.bias"]
    model["base_model.text_projection"] = torch.zeros(64, 31)
    model["base_model.transformer.resblocks.2.mlp.c_fc.weight"] = torch.zeros(100, 64)
    model["base_model.visual.positional_embedding"] = torch.zeros(1 + 10, 128)  # neither 4 x 2 nor square
    model["classifier.weight"] = torch.zeros(NUM_CLASSES, 31)
    path = tmp_path / "broken.pth"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError) as error:
        load_reference_checkpoint(path, image_size=IMAGE_SIZE)
    message = str(error.value)
    assert message.startswith(f"{path}: 5 tensor(s) do not fit the model the checkpoint's shapes describe (ViT CLIP")
    for line in (
        "base_model.visual.transformer.resblocks.1.ln_2.bias: missing, expected (128,)",
        "base_model.text_projection: expected (64, 32), found (64, 31)",
        "base_model.transformer.resblocks.2.mlp.c_fc.weight: expected (256, 64), found (100, 64)",
        "base_model.visual.positional_embedding: expected (9, 128) (the 4x2 patch grid of image_size (32, 16) "
        "with patch 8) or a square OpenAI table (1 + n*n, 128), found (11, 128)",
        "classifier.weight: expected (5, 32), found (5, 31)",
    ):
        assert f"\n  {line}" in message


def test_files_that_are_not_clip_checkpoints_are_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: no such file; expected a torch.save'd")):
        load_reference_checkpoint(missing)
    cases = {
        "notes.txt": ("text", "not a checkpoint torch.load can read"),
        "list.pth": ([1, 2], "holds a list; expected"),
        "args.pth": ({"model": {}, "args": argparse.Namespace(lr=1)}, "pickled Python objects"),
        "other.pth": ({"fc.weight": torch.zeros(2, 2)}, "no ViT CLIP weights in OpenAI's layout: missing"),
        "rn50.pth": ({"visual.layer1.0.conv1.weight": torch.zeros(2, 2)}, "holds a ResNet CLIP"),
        "tipr.ckpt": ({"state_dict": {}, "pytorch-lightning_version": "2.6"}, "already a Lightning checkpoint"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            torch.save(content, path)
        with pytest.raises(ValueError, match=re.escape(f"{path}: ") + ".*" + re.escape(expected)):
            load_reference_checkpoint(path)


def test_tipr_convert_writes_a_checkpoint_that_reloads_offline(tmp_path, reference_ckpt, converted, capsys):
    out = tmp_path / "irra" / "model.ckpt"
    assert main(["convert", "--ckpt", str(reference_ckpt), "--out", str(out), "--image-size", "32", "16"]) == 0
    printed = capsys.readouterr().out
    assert f"converted {reference_ckpt} (IRRA/SEN checkpoint" in printed
    assert "re-initialised: restoration (TIR head" in printed and "cross_attn.* (4)" in printed
    assert f"wrote {out}" in printed

    reloaded = TIPRModule.load_from_checkpoint(out).eval()
    assert reloaded.hparams.backbone["model_type"] == "clip" and reloaded.hparams.image_size == IMAGE_SIZE
    images, token_ids = inputs()
    expected = encode(converted[0].network, images, token_ids)
    for ours, theirs in zip(encode(reloaded.network, images, token_ids), expected):
        assert torch.equal(ours, theirs)
    assert torch.equal(reloaded.network.classifier.weight, converted[0].network.classifier.weight)

    assert main(["convert", "--ckpt", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.ckpt")]) == 1
    assert f"tipr convert: error: {tmp_path / 'missing.pth'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()
