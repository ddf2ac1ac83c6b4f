"""Importing IRRA/SEN reference checkpoints and OpenAI CLIP weights: ``tipr.convert`` and ``tipr convert``."""

import argparse
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from tipr.commands import main
from tipr.convert import ConversionReport, convert_openai_clip_state_dict, load_reference_checkpoint, read_state_dict
from tipr.methods.irra import IRRAConfig, IRRAModel
from tipr.methods.sen import SENConfig, SENModel
from tipr.methods.sen.restoration import num_visible_patches
from tipr.model import TIPRModel, resize_position_embedding
from tipr.model.backbone import eot_token_id
from tipr.pretrained import load_pretrained
from tipr.processing import TIPRProcessor
from openai_reference import (
    _attention, _layers, _linear, _ln, openai_block, openai_forward, openai_tokens, random_irra_heads,
    reference_sdm_and_id, reference_state_dict, to_openai,
)

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
# Modules beside the backbone that no tipr method claims (an experiment's own heads): the file
# has no method's heads, so it becomes a SEN model (the default) and these keys stay unused. (IRRA's
# own heads would make it an IRRA checkpoint: see test_tipr_convert_writes_an_irra_pretrained_folder.)
EXTRA_HEADS = {
    "aux_attn.in_proj_weight": (96, 32),
    "aux_attn.in_proj_bias": (96,),
    "aux_attn.out_proj.weight": (32, 32),
    "aux_attn.out_proj.bias": (32,),
    "aux_head.fc.weight": (10, 32),
}
#: SEN's defaults: the reference run's loss weights.
REFERENCE_LOSS_WEIGHTS = {"sdm": 1.0, "id": 1.0, "triplet": 10.0, "restoration": 10.0, "itc": 0.0}


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


def assert_same_weights(ours: nn.Module, theirs: nn.Module, fresh: str | None = None) -> None:
    """The same tensor names, dtypes and values (only names and dtypes under ``fresh``, a head
    that got no source weights and so has a random initialisation of its own in each conversion)."""
    expected = theirs.state_dict()
    got = ours.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        same = (fresh is not None and key.startswith(fresh)) or torch.equal(got[key], value)
        assert got[key].dtype == value.dtype and same, key


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    network = SENModel.from_backbone(
        CONFIG, NUM_CLASSES, config=SENConfig(triplet_weight=0.0, restoration_weight=0.0), image_size=IMAGE_SIZE,
        text_length=CONTEXT,
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
    """An authors'-layout ``best.pth`` without a method's heads: CLIP under ``base_model.`` (no logit_scale,
    as IRRA), classifier, modules no method claims."""
    model = {"base_model." + key: value for key, value in openai_weights.items() if key != "logit_scale"}
    model["classifier.weight"] = source.classifier.weight.detach().clone()
    model["classifier.bias"] = source.classifier.bias.detach().clone()
    model.update({key: torch.randn(shape) for key, shape in EXTRA_HEADS.items()})
    path = tmp_path_factory.mktemp("reference") / "best.pth"
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}
    torch.save({"model": model, "optimizer": optimizer, "num_epoch": 60, "iteration": 0, "epoch": 37}, path)
    return path


@pytest.fixture(scope="module")
def converted(reference_ckpt):
    model, report = load_reference_checkpoint(reference_ckpt, image_size=IMAGE_SIZE)
    assert isinstance(model, SENModel) and isinstance(report, ConversionReport)
    return model.eval(), report


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
    model, _ = converted
    images, token_ids = inputs()
    image, text = encode(model, images, token_ids)
    source_image, source_text = encode(source, images, token_ids)
    assert_close(image, source_image, atol=1e-5, rtol=1e-5)
    assert_close(text, source_text, atol=1e-5, rtol=1e-5)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_embeddings_match_openai_clip_run_on_the_source_tensors(openai_weights, converted):
    model, _ = converted
    images, token_ids = inputs()
    image, text = encode(model, images, token_ids)
    reference_image, reference_text = openai_forward(openai_weights, images, token_ids)
    assert_close(image, reference_image, atol=1e-5, rtol=1e-5)
    assert_close(text, reference_text, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(text[0], text[1], atol=1e-3)  # the pooled position matters


def test_config_classifier_and_report(source, converted):
    model, report = converted
    config = model.clip.config
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        128, 256, 2, 2,
    )
    assert (vision.patch_size, vision.hidden_act, vision.layer_norm_eps) == (8, "quick_gelu", 1e-5)
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads) == (
        64, 256, 3, 1,
    )
    assert (text.max_position_embeddings, text.vocab_size, config.projection_dim) == (CONTEXT, 49408, 32)
    encoder = model.encoder_config
    assert (encoder.num_classes, encoder.text_length, encoder.image_size) == (NUM_CLASSES, CONTEXT, IMAGE_SIZE)
    assert model.config == SENConfig()  # no TIR in the source: SEN's defaults
    assert model.config.loss_weights == REFERENCE_LOSS_WEIGHTS and model.config.restoration_depth == 4
    assert torch.equal(model.classifier.weight, source.classifier.weight)
    assert torch.equal(model.classifier.bias, source.classifier.bias)

    assert report.layout == "checkpoint with CLIP under 'base_model.' (as SEN)"  # no method's heads in it
    assert report.reinitialised == {"restoration": "TIR head: no counterpart in the source"}
    assert report.unused == sorted(EXTRA_HEADS)
    assert report.notes == []
    printed = str(report)
    assert "loaded: CLIP backbone (" in printed and "ID classifier (5 classes)" in printed
    assert "re-initialised: restoration (TIR head: no counterpart in the source)" in printed
    assert "unused source keys (5): aux_attn.* (4), aux_head.fc.weight" in printed


def test_classifier_of_another_size_is_reinitialised(reference_ckpt):
    weights = {**REFERENCE_LOSS_WEIGHTS, "restoration": 0.0}
    model, report = load_reference_checkpoint(
        reference_ckpt, image_size=IMAGE_SIZE, num_classes=7, restoration_weight=0.0
    )
    # A weight of 0 skips the loss; the TIR head is SEN's and stays (fresh: the source has none).
    assert report.reinitialised == {
        "classifier": "ID classifier: the source's has 5 classes, num_classes is 7",
        "restoration": "TIR head: no counterpart in the source",
    }
    assert model.classifier.out_features == 7 and model.restoration is not None
    assert model.config.loss_weights == weights and model.encoder_config.num_classes == 7
    assert report.unused == sorted([*EXTRA_HEADS, "classifier.weight", "classifier.bias"])
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['tir_depth'\]"):
        load_reference_checkpoint(reference_ckpt, image_size=IMAGE_SIZE, tir_depth=2)


def test_plain_openai_state_dict_with_a_square_position_table(tmp_path, openai_weights):
    # As OpenAI's clip saves it: no prefix, fp16, the square table of its pretraining size (4 x 4).
    plain = {key: value.half() for key, value in openai_weights.items()}
    square = torch.randn(1 + 4 * 4, 128, generator=torch.Generator().manual_seed(2))
    plain["visual.positional_embedding"] = square.half()
    path = tmp_path / "ViT-tiny.pt"
    torch.save(plain, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: has no ID classifier") + ".*give num_classes"):
        load_reference_checkpoint(path, image_size=IMAGE_SIZE)

    model, report = load_reference_checkpoint(path, image_size=IMAGE_SIZE, num_classes=3)
    assert report.layout == "OpenAI CLIP state dict (as SEN)"
    assert report.notes == ["vision position table resized (bilinear) from the square 4x4 grid to 4x2"]
    assert set(report.reinitialised) == {"classifier", "restoration"}
    assert report.reinitialised["classifier"] == "ID classifier: the source has none; 3 classes"
    assert report.unused == []
    table = resize_position_embedding(plain["visual.positional_embedding"].float(), (4, 2))  # (1 + 8, 128)
    assert torch.equal(model.embeddings.position_embedding.weight, table)
    assert model.clip.config.vision_config.image_size == 32
    assert torch.equal(model.clip.logit_scale, plain["logit_scale"].float())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 sources become fp32

    images, token_ids = inputs()
    image, text = encode(model.eval(), images, token_ids)
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
    model, report = load_reference_checkpoint(archive, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
    assert report.layout == "OpenAI CLIP state dict (as SEN)" and report.unused == []
    expected = converted[0].clip.state_dict()
    for key, value in model.clip.state_dict().items():
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
        "tipr.ckpt": ({"state_dict": {}, "pytorch-lightning_version": "2.6"}, "already a tipr (Lightning) checkpoint"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            torch.save(content, path)
        with pytest.raises(ValueError, match=re.escape(f"{path}: ") + ".*" + re.escape(expected)):
            load_reference_checkpoint(path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'folder'}: is a folder, not a checkpoint file")):
        load_reference_checkpoint(tmp_path / "folder")


def test_tipr_convert_writes_a_pretrained_folder(tmp_path, reference_ckpt, converted, capsys):
    out = tmp_path / "irra"
    assert main(["convert", "--checkpoint", str(reference_ckpt), "--out", str(out), "--image_size", "[32, 16]"]) == 0
    printed = capsys.readouterr().out
    assert f"converted {reference_ckpt} (checkpoint with CLIP under" in printed
    assert "re-initialised: restoration (TIR head" in printed and "aux_attn.* (4)" in printed
    assert f"wrote {out}: SENModel (TIPRModel.from_pretrained" in printed
    assert "note: the model's vocabulary" not in printed  # OpenAI's 49,408 ids: the shipped tokenizer's

    model, processor = SENModel.from_pretrained(out), TIPRProcessor.from_pretrained(out)
    assert model.config == converted[0].config and model.encoder_config == converted[0].encoder_config
    assert model.encoder_config.clip["model_type"] == "clip"
    assert_same_weights(model, converted[0], fresh="restoration.")  # IRRA has no TIR head
    assert (processor.image_size, processor.text_length) == (IMAGE_SIZE, CONTEXT)
    images, token_ids = inputs()
    for ours, theirs in zip(encode(model, images, token_ids), encode(converted[0], images, token_ids)):
        assert torch.equal(ours, theirs)
    assert torch.equal(processor.tokenize(["a man"]), TIPRProcessor.for_model(converted[0]).tokenize(["a man"]))
    assert_same_weights(load_pretrained(out)[0], model)

    # Over an earlier pretrained folder (another text length, from a --config file): rewritten.
    config = tmp_path / "convert.yaml"
    config.write_text(f"checkpoint: {reference_ckpt}\nout: {out}\nimage_size: [32, 16]\ntext_length: 12\n")
    assert main(["convert", "--config", str(config)]) == 0
    capsys.readouterr()
    rewritten = SENModel.from_pretrained(out)
    assert rewritten.encoder_config.text_length == TIPRProcessor.from_pretrained(out).text_length == 12


def test_tipr_convert_names_the_option_at_fault(tmp_path, reference_ckpt, capsys):
    def run(*args):
        code = main(["convert", *map(str, args)])
        return code, capsys.readouterr().err

    missing = tmp_path / "missing.pth"
    code, err = run("--checkpoint", missing, "--out", tmp_path / "x")
    assert code == 1 and f"tipr convert: error: --checkpoint {missing}: no such file" in err
    code, err = run("--checkpoint", reference_ckpt, "--out", tmp_path / "x", "--image_size", "[30, 16]")
    assert code == 1 and (
        f"tipr convert: error: --checkpoint {reference_ckpt}: image_size (30, 16) must be positive multiples of the "
        "patch size 8"
    ) in err
    code, err = run("--checkpoint", reference_ckpt, "--out", tmp_path / "x", "--image_size", "[32, 16]",
                    "--text_length", CONTEXT + 1)
    assert code == 1 and "text_length 17 is longer than the text encoder's context (16 positions)" in err
    assert not (tmp_path / "x").exists()  # nothing written on an error

    (tmp_path / "file").write_text("")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("")
    for out, expected in (("file", "is a file"), ("other", "a folder holding other files")):
        code, err = run("--checkpoint", reference_ckpt, "--out", tmp_path / out, "--image_size", "[32, 16]")
        assert code == 1 and f"tipr convert: error: --out {tmp_path / out}: {expected}" in err
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]

    code, err = run("--checkpoint", reference_ckpt, "--out", reference_ckpt)
    assert code == 2 and "would overwrite the checkpoint being converted" in err
    with pytest.raises(SystemExit) as usage:  # a bad value: jsonargparse's usage error
        main(["convert", "--checkpoint", str(reference_ckpt), "--out", str(tmp_path / "x"), "--num_classes", "0"])
    assert usage.value.code == 2


def test_tipr_convert_runs_without_lightning(tmp_path, reference_ckpt):
    out = tmp_path / "folder"
    script = (
        "import sys; from tipr.commands import main; "
        f"code = main(['convert', '--checkpoint', {str(reference_ckpt)!r}, '--out', {str(out)!r}, "
        "'--image_size', '[32, 16]']); "
        "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules, 'Lightning was imported'; "
        "sys.exit(code)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"config.json", "model.safetensors", "processor_config.json"} <= {p.name for p in out.iterdir()}


# ----------------------------------------------------------- SEN, every head
SEN_VOCAB = 1000  # not OpenAI's 49,408: start- and end-of-text are the two highest ids
SEN_SOT, SEN_EOT = SEN_VOCAB - 2, SEN_VOCAB - 1
SEN_DEPTH = 2
SEN_CONFIG = {
    "vision_config": {**CONFIG["vision_config"]},
    "text_config": {
        **CONFIG["text_config"], "num_hidden_layers": 2, "vocab_size": SEN_VOCAB,
        "bos_token_id": SEN_SOT, "eos_token_id": SEN_EOT,
    },
    "projection_dim": 128,  # the TIR width: 128 // 64 = 2 heads, MLP 512, pixels 8 * 8 * 3
}
# SEN modules the reference builds but never calls in its forward.
SEN_UNUSED = {
    **{f"{name}.{key}": shape for name in ("cross_attn_TextImage", "cross_attn_Image") for key, shape in (
        ("in_proj_weight", (384, 128)), ("in_proj_bias", (384,)), ("out_proj.weight", (128, 128)),
        ("out_proj.bias", (128,)),
    )},
    **{f"{name}.{kind}": (128,) for name in ("norm_3", "norm_5") for kind in ("weight", "bias")},
}


def mae_sincos_table(grid, dim):
    """SEN's ``decoder_pos_embed`` (1, 1 + H*W, dim): MAE's get_2d_sincos_pos_embed for an (H, W) grid."""

    def one_d(d, positions):
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h, grid_w = np.arange(grid[0], dtype=np.float32), np.arange(grid[1], dtype=np.float32)
    mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid[0], grid[1]])  # w first
    table = np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)
    table = np.concatenate([np.zeros([1, dim]), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def to_sen_tir(restoration, grid) -> dict[str, torch.Tensor]:
    """tipr's TIR head under SEN's names, written out by hand (the inverse of the conversion)."""
    r = {key: value.detach().clone() for key, value in restoration.state_dict().items()}
    sen = {"mask_token": r["mask_token"], "decoder_pos_embed": mae_sincos_table(grid, r["mask_token"].shape[-1])}
    for ours, theirs in (
        ("image_norm", "norm_1"), ("decoder_embed", "decoder_embed"), ("text_norm", "norm_2"),
        ("query_norm", "norm_4"), ("pre_norm", "norm_6"), ("post_norm", "norm_7"), ("pixel_head", "decoder_pred"),
        ("cross_attn.out_proj", "cross_attn_Text.out_proj"),
    ):
        for kind in ("weight", "bias"):
            sen[f"{theirs}.{kind}"] = r[f"{ours}.{kind}"]
    sen["cross_attn_Text.in_proj_weight"] = r["cross_attn.in_proj_weight"]
    sen["cross_attn_Text.in_proj_bias"] = r["cross_attn.in_proj_bias"]
    for i in range(len(restoration.transformer)):
        a, b = f"cross_modal_transformer_mae.resblocks.{i}.", f"transformer.{i}."
        for kind in ("weight", "bias"):
            for theirs, ours in (
                (f"attn.in_proj_{kind}", f"attn.qkv.{kind}"), (f"attn.out_proj.{kind}", f"attn.proj.{kind}"),
                (f"ln_1.{kind}", f"norm1.{kind}"), (f"mlp.c_fc.{kind}", f"mlp.fc1.{kind}"),
                (f"mlp.c_proj.{kind}", f"mlp.fc2.{kind}"), (f"ln_2.{kind}", f"norm2.{kind}"),
            ):
                sen[a + theirs] = r[b + ours]
    return sen


def sen_inputs():
    """Four images, captions in the 1,000-id vocabulary (end-of-text 999) and person ids (0 twice)."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, *IMAGE_SIZE, generator=g)
    words = torch.randint(1, SEN_SOT, (4, CONTEXT), generator=g)
    token_ids = torch.zeros(4, CONTEXT, dtype=torch.long)
    for row, end in enumerate((5, 1, CONTEXT - 1, 9)):
        token_ids[row, 0], token_ids[row, 1:end], token_ids[row, end] = SEN_SOT, words[row, 1:end], SEN_EOT
    noise = torch.rand(4, (IMAGE_SIZE[0] // 8) * (IMAGE_SIZE[1] // 8), generator=g)
    return images, token_ids, torch.tensor([0, 1, 0, 2]), noise


def sen_reference_losses(model, images, token_ids, pids, noise, num_visible, temperature=0.02, margin=0.05):
    """SEN's training losses computed on its own state dict, in plain torch (the reference's forward)."""
    w = {key: value.float() for key, value in model.items()}
    clip = {key.removeprefix("base_model."): value for key, value in w.items() if key.startswith("base_model.")}
    image_tokens, text_tokens = openai_tokens(clip, images, token_ids)
    i_feats = image_tokens[:, 0]
    t_feats = text_tokens[torch.arange(len(token_ids)), token_ids.argmax(dim=-1)]

    sdm, id_loss, t2i, labels = reference_sdm_and_id(w, i_feats, t_feats, pids, temperature)

    # Triplet on cosine distance with the hardest negative of another identity, both directions.
    triplet = 0.0
    for similarity in (t2i, t2i.t()):  # rows: anchors
        hardest = similarity.masked_fill(labels.bool(), float("-inf")).max(dim=1).values
        triplet = triplet + F.relu((1 - similarity.diagonal()) - (1 - hardest) + margin).mean()

    # TIR: grayscale input, the lowest-noise patches visible, the decoder, MSE on hidden patches.
    weights = torch.tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
    gray = (images * weights).sum(dim=1, keepdim=True).repeat(1, 3, 1, 1)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible, text = openai_tokens(clip, gray, token_ids, ids_keep=ids_shuffle[:, :num_visible])
    x = _linear(w, _ln(w, visible, "norm_1"), "decoder_embed")
    b, n, d = len(images), noise.shape[1], x.shape[-1]
    x_ = torch.cat([x[:, 1:], w["mask_token"].repeat(b, n + 1 - x.shape[1], 1)], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, d))  # unshuffle
    x = torch.cat([x[:, :1], x_], dim=1) + w["decoder_pos_embed"]
    text = _ln(w, text, "norm_2")
    q, k, v = (
        part_in @ weight.t() + bias
        for part_in, weight, bias in zip(
            (_ln(w, x, "norm_4"), text, text),
            w["cross_attn_Text.in_proj_weight"].chunk(3),
            w["cross_attn_Text.in_proj_bias"].chunk(3),
        )
    )
    scores, values, shape = _attention(q, k, v, heads=d // 64)  # no key padding mask
    attended = (scores.softmax(dim=-1) @ values).transpose(1, 2).reshape(shape)
    x = _ln(w, _linear(w, attended, "cross_attn_Text.out_proj"), "norm_6")  # no residual
    for i in range(_layers(w, "cross_modal_transformer_mae.resblocks.")):
        x = openai_block(w, x, f"cross_modal_transformer_mae.resblocks.{i}")
    prediction = _linear(w, _ln(w, x, "norm_7"), "decoder_pred")[:, 1:]
    p = clip["visual.conv1.weight"].shape[-1]
    h, wd = images.shape[2] // p, images.shape[3] // p
    pixels = torch.einsum("nchpwq->nhwpqc", images.reshape(b, 3, h, p, wd, p)).reshape(b, h * wd, p * p * 3)
    mask = torch.ones(b, n)
    mask[:, :num_visible] = 0
    mask = torch.gather(mask, 1, ids_restore)
    restoration = (((prediction - pixels) ** 2).mean(dim=-1) * mask).sum() / mask.sum()

    losses = {"sdm": sdm, "id": id_loss, "triplet": triplet, "restoration": restoration}
    losses["loss"] = sdm + id_loss + 10 * triplet + 10 * restoration
    return losses


@pytest.fixture(scope="module")
def sen_source():
    return perturbed_sen(SEN_CONFIG, SENConfig(restoration_depth=SEN_DEPTH, restoration_text_padding_mask=False), seed=4)


def perturbed_sen(backbone: dict, config: SENConfig, seed: int) -> SENModel:
    """A SEN network of ``backbone`` / ``config`` whose every tensor is moved off its init (ones, zeros),
    which would hide a swap, in eval mode."""
    torch.manual_seed(seed)
    network = SENModel.from_backbone(backbone, NUM_CLASSES, config=config, image_size=IMAGE_SIZE, text_length=CONTEXT)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return network.eval()


@pytest.fixture(scope="module")
def sen_ckpt(sen_source, tmp_path_factory):
    """A SEN ``best.pth`` with every head: backbone, classifier, TIR and the modules SEN never calls."""
    model = reference_state_dict(sen_source.clip, {
        "classifier.weight": sen_source.classifier.weight.detach().clone(),
        "classifier.bias": sen_source.classifier.bias.detach().clone(),
        **to_sen_tir(sen_source.restoration, sen_source.embeddings.grid_size),
    })
    g = torch.Generator().manual_seed(5)
    model.update({key: torch.randn(shape, generator=g) for key, shape in SEN_UNUSED.items()})
    path = tmp_path_factory.mktemp("sen") / "best.pth"
    torch.save({"model": model, "epoch": 60}, path)
    return path


@pytest.fixture(scope="module")
def sen_converted(sen_ckpt):
    """The SEN file converted with the defaults: the reference's loss weights, the file's TIR depth."""
    model, report = load_reference_checkpoint(sen_ckpt, image_size=IMAGE_SIZE)
    assert model.config.restoration_depth == SEN_DEPTH and not model.config.restoration_text_padding_mask
    return model.eval(), report


def test_sen_checkpoint_losses_match_the_reference_forward(sen_ckpt, sen_source, sen_converted):
    network = sen_converted[0]
    images, token_ids, pids, noise = sen_inputs()
    with torch.no_grad():
        ours = network(images, token_ids, pids, noise=noise)
        model = torch.load(sen_ckpt, weights_only=True)["model"]
        expected = sen_reference_losses(model, images, token_ids, pids, noise, num_visible_patches(8, 0.7))
    assert sorted(ours) == sorted(expected)
    for name, value in expected.items():  # measured: at most 8e-6 (the total, about 40), float32 rounding
        assert_close(ours[name], value, atol=1e-5, rtol=1e-6, msg=name)
    assert expected["restoration"] > 0.1 and expected["triplet"] > 0  # every loss is live, none trivially 0
    # The mapping inverts the hand-written inverse, tensor for tensor (SEN saves no logit_scale).
    converted = network.state_dict()
    assert sorted(converted) == sorted(sen_source.state_dict())
    for key, value in sen_source.state_dict().items():
        assert key == "clip.logit_scale" or torch.equal(converted[key], value), key


def test_sen_tir_blocks_are_openai_blocks(sen_converted):
    restoration = sen_converted[0].restoration
    assert len(restoration.transformer) == SEN_DEPTH and restoration.cross_attn.num_heads == 2
    for block in restoration.transformer:
        assert block.norm1.eps == block.norm2.eps == 1e-5  # OpenAI's LayerNorm, not timm's 1e-6
        x = torch.linspace(-3, 3, 7)
        assert torch.allclose(block.mlp.act(x), x * torch.sigmoid(1.702 * x))  # QuickGELU
    assert torch.equal(restoration.pos_embed, mae_sincos_table(restoration.grid_size, 128))


def test_sen_report_names_no_reinitialised_head_and_the_unused_modules(sen_converted):
    report = sen_converted[1]
    assert report.reinitialised == {}
    assert report.unused == sorted(SEN_UNUSED)
    printed = str(report)
    assert f"TIR head ({SEN_DEPTH} blocks; its decoder_pos_embed equals tipr's fixed table)" in printed
    assert "ID classifier (5 classes)" in printed and "re-initialised" not in printed
    assert (
        "unused source keys (12): cross_attn_Image.* (4), cross_attn_TextImage.* (4), norm_3.* (2), norm_5.* (2)"
    ) in printed


def test_vocabulary_of_1000_ids_pools_at_id_999(sen_converted):
    network, report = sen_converted
    text = network.clip.config.text_config
    assert (text.vocab_size, text.eos_token_id, text.bos_token_id, network.eot_token_id) == (1000, 999, 998, 999)
    assert "vocabulary 1000 (end-of-text 999)" in report.backbone
    _, token_ids, _, _ = sen_inputs()
    with torch.no_grad():
        tokens, eot = network.text_tokens(token_ids)
        pooled = network.encode_text(token_ids)
    assert eot.tolist() == [5, 1, CONTEXT - 1, 9]
    assert torch.equal(pooled, tokens[torch.arange(4), eot])
    # Old hub configs (end-of-text 2 or none) pool at the highest id, whatever the vocabulary.
    for eos in (2, None):
        config = types.SimpleNamespace(text_config=types.SimpleNamespace(vocab_size=1000, eos_token_id=eos))
        assert eot_token_id(config) == 999


def test_sen_conversion_reloads_and_reinitialises_what_does_not_fit(tmp_path, sen_ckpt, sen_converted, capsys):
    out = tmp_path / "sen"
    assert main(["convert", "--checkpoint", str(sen_ckpt), "--out", str(out), "--image_size", "[32, 16]"]) == 0
    printed = capsys.readouterr().out
    assert "re-initialised" not in printed and f"TIR head ({SEN_DEPTH} blocks" in printed
    # The shipped tokenizer is written with the model; a 1,000-id vocabulary is not its own.
    assert "note: the model's vocabulary has 1000 ids, the CLIP tokenizer written with it 49408" in printed
    reloaded = SENModel.from_pretrained(out)  # the fixed table is rebuilt, not stored
    assert reloaded.config == sen_converted[0].config
    assert reloaded.encoder_config == sen_converted[0].encoder_config
    assert_same_weights(reloaded, sen_converted[0])
    assert torch.equal(reloaded.restoration.pos_embed, sen_converted[0].restoration.pos_embed)
    assert TIPRProcessor.from_pretrained(out).text_length == CONTEXT
    images, token_ids, pids, noise = sen_inputs()
    with torch.no_grad():
        before = sen_converted[0](images, token_ids, pids, noise=noise)
        after = reloaded(images, token_ids, pids, noise=noise)
    assert sorted(after) == sorted(before) == ["id", "loss", "restoration", "sdm", "triplet"]
    for name, value in before.items():
        assert torch.equal(after[name], value), name

    tir_keys = sorted(key for key in torch.load(sen_ckpt, weights_only=True)["model"] if key.split(".")[0] in {
        "norm_1", "decoder_embed", "mask_token", "norm_2", "norm_4", "cross_attn_Text", "norm_6",
        "cross_modal_transformer_mae", "norm_7", "decoder_pred", "decoder_pos_embed",
    })
    shallow, report = load_reference_checkpoint(sen_ckpt, image_size=IMAGE_SIZE, restoration_depth=1)
    assert len(shallow.restoration.transformer) == 1
    assert report.reinitialised == {"restoration": "TIR head: the source's has 2 blocks, restoration_depth is 1"}
    assert report.unused == sorted([*SEN_UNUSED, *tir_keys])

    checkpoint = torch.load(sen_ckpt, weights_only=True)
    checkpoint["model"]["decoder_pos_embed"] = checkpoint["model"]["decoder_pos_embed"].flip(-1)
    del checkpoint["model"]["cross_modal_transformer_mae.resblocks.1.ln_2.bias"]
    broken = tmp_path / "broken.pth"
    torch.save(checkpoint, broken)
    with pytest.raises(ValueError, match=re.escape(
        "cross_modal_transformer_mae.resblocks.1.ln_2.bias: missing, expected (128,)"
    )):
        load_reference_checkpoint(broken, image_size=IMAGE_SIZE)
    checkpoint["model"]["cross_modal_transformer_mae.resblocks.1.ln_2.bias"] = torch.zeros(128)
    torch.save(checkpoint, broken)
    _, report = load_reference_checkpoint(broken, image_size=IMAGE_SIZE)
    assert report.reinitialised["restoration"].startswith(
        "TIR head: the source's decoder_pos_embed is not the fixed sine-cosine table of the 4x2 grid "
        "(max abs difference"
    )


# ------------------------------------------------ IRRA, through tipr convert
IRRA_DEPTH = 2  # not IRRAConfig's default (4): the depth is read off the file


@pytest.fixture(scope="module")
def irra_ckpt(sen_source, tmp_path_factory):
    """An IRRA ``best.pth``: a CLIP (``sen_source``'s: vocabulary 1000, projection 128) under ``base_model.``,
    the ID classifier and IRRA's MLM modules, every head tensor random."""
    heads = random_irra_heads(torch.Generator().manual_seed(6), 128, SEN_VOCAB, NUM_CLASSES, IRRA_DEPTH)
    path = tmp_path_factory.mktemp("irra") / "best.pth"
    torch.save({"model": reference_state_dict(sen_source.clip, heads), "epoch": 60}, path)
    return path


def test_tipr_convert_writes_an_irra_pretrained_folder(tmp_path, irra_ckpt, sen_source, capsys):
    out = tmp_path / "irra"
    assert main(["convert", "--checkpoint", str(irra_ckpt), "--out", str(out), "--image_size", "[32, 16]"]) == 0
    printed = capsys.readouterr().out
    assert f"converted {irra_ckpt} (IRRA checkpoint, CLIP under 'base_model.')" in printed
    assert f"cross-modal MLM head (cross_attn, {IRRA_DEPTH} blocks" in printed
    assert "ID classifier (5 classes)" in printed
    assert "re-initialised" not in printed and "unused source keys (0): none" in printed
    assert "note: the model's vocabulary has 1000 ids, the CLIP tokenizer written with it 49408" in printed
    assert f"wrote {out}: IRRAModel (" in printed
    assert f"\n    cross-modal depth = {IRRA_DEPTH}: read off cross_modal_transformer.resblocks.0..1\n" in printed
    assert ("\n    cross-modal heads = 2: assumed embedding width / 64 (IRRA's rule; a checkpoint cannot show it): "
            "tipr builds no other\n") in printed

    model = TIPRModel.from_pretrained(out)  # the folder's config names the method
    assert type(model) is IRRAModel and model.config == IRRAConfig(cross_modal_depth=IRRA_DEPTH)
    encoder = model.encoder_config
    assert (encoder.num_classes, encoder.text_length, encoder.image_size) == (NUM_CLASSES, CONTEXT, IMAGE_SIZE)
    assert (model.vocab_size, model.mask_token_id, model.eot_token_id) == (SEN_VOCAB, SEN_VOCAB - 3, SEN_EOT)
    # The folder holds what load_reference_checkpoint gives: the file's heads under tipr's names.
    converted, _ = load_reference_checkpoint(irra_ckpt, image_size=IMAGE_SIZE)
    assert model.encoder_config == converted.encoder_config
    assert_same_weights(model, converted)
    source = torch.load(irra_ckpt, weights_only=True)["model"]
    ours = model.state_dict()
    for name, theirs in (
        ("classifier.weight", "classifier.weight"), ("cross_attn.in_proj_weight", "cross_attn.in_proj_weight"),
        ("ln_pre_i.bias", "ln_pre_i.bias"), ("mlm_head.fc.weight", "mlm_head.fc.weight"),
        ("cross_modal_transformer.1.attn.qkv.weight", "cross_modal_transformer.resblocks.1.attn.in_proj_weight"),
        ("cross_modal_transformer.1.mlp.fc2.bias", "cross_modal_transformer.resblocks.1.mlp.c_proj.bias"),
    ):
        assert torch.equal(ours[name], source[theirs]), name
    # The backbone gives the embeddings of the network whose CLIP the file holds.
    images, token_ids, pids, _ = sen_inputs()
    for got, expected in zip(encode(model, images, token_ids), encode(sen_source, images, token_ids)):
        assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The reloaded network trains as the converted one: the same losses, every term live.
    mlm_input_ids, mlm_labels = token_ids.clone(), torch.zeros_like(token_ids)
    for row, col in ((0, 2), (2, 4), (2, 9), (3, 3)):
        mlm_input_ids[row, col], mlm_labels[row, col] = SEN_VOCAB - 3, token_ids[row, col]
    batch = {"pixel_values": images, "input_ids": token_ids, "pids": pids, "mlm_input_ids": mlm_input_ids,
             "mlm_labels": mlm_labels}
    with torch.no_grad():
        before, after = converted.eval()(**batch), model(**batch)
    assert sorted(after) == sorted(before) == ["id", "loss", "mlm", "sdm"]
    for name, value in before.items():
        assert torch.equal(after[name], value), name

    loaded, processor = load_pretrained(out)
    assert type(loaded) is IRRAModel and (processor.image_size, processor.text_length) == (IMAGE_SIZE, CONTEXT)
    assert_same_weights(loaded, model)
    with pytest.raises(ValueError, match=r"is an irra model \(IRRAModel\), not a SENModel"):
        SENModel.from_pretrained(out)
    # SEN builds on IRRA: its CLIP and classifier carry over, its TIR head starts fresh.
    sen, report = load_reference_checkpoint(irra_ckpt, image_size=IMAGE_SIZE, method="sen")
    assert type(sen) is SENModel and set(report.reinitialised) == {"restoration"}
    assert torch.equal(sen.clip.text_projection.weight, model.clip.text_projection.weight)
    assert any(key.startswith("mlm_head.") for key in report.unused)


# ------------------------------------------- head counts no tensor shows
# 128-wide vision with 4 heads and 64-wide text with 2 (head width 32, not OpenAI's 64), and a SEN
# TIR head (128 wide) with 4: the tensors fit width / 64 heads just as well, and then compute other features.
HEADS_CONFIG = {
    "vision_config": {**SEN_CONFIG["vision_config"], "num_attention_heads": 4},
    "text_config": {**SEN_CONFIG["text_config"], "num_attention_heads": 2},
    "projection_dim": 128,
}
#: Every architecture value the report lists for a SEN file, in order.
ARCHITECTURE_NAMES = [
    "vision width", "vision layers", "vision MLP", "vision heads", "patch", "patch grid", "text width",
    "text layers", "text MLP", "text heads", "vocabulary", "end-of-text id", "context", "embedding",
    "activation, LayerNorm eps", "image size", "text length", "ID classes", "TIR depth", "TIR heads",
]


@pytest.fixture(scope="module")
def heads_source():
    config = SENConfig(restoration_depth=SEN_DEPTH, restoration_heads=4, restoration_text_padding_mask=False)
    return perturbed_sen(HEADS_CONFIG, config, seed=7)


@pytest.fixture(scope="module")
def heads_ckpt(heads_source, tmp_path_factory):
    """A SEN ``best.pth`` trained with 4 / 2 / 4 heads: nothing in it says so."""
    model = reference_state_dict(heads_source.clip, {
        "classifier.weight": heads_source.classifier.weight.detach().clone(),
        "classifier.bias": heads_source.classifier.bias.detach().clone(),
        **to_sen_tir(heads_source.restoration, heads_source.embeddings.grid_size),
    })
    path = tmp_path_factory.mktemp("heads") / "best.pth"
    torch.save({"model": model}, path)
    return path


def test_head_counts_are_assumed_width_over_64_unless_given(heads_ckpt, heads_source):
    images, token_ids, pids, noise = sen_inputs()
    with torch.no_grad():
        expected = heads_source(images, token_ids, pids, noise=noise)
    expected_features = encode(heads_source, images, token_ids)

    given, report = load_reference_checkpoint(heads_ckpt, image_size=IMAGE_SIZE, vision_heads=4, text_heads=2,
                                              restoration_heads=4)
    vision, text = given.clip.config.vision_config, given.clip.config.text_config
    assert (vision.num_attention_heads, text.num_attention_heads, given.restoration.cross_attn.num_heads) == (4, 2, 4)
    assert all(block.attn.num_heads == 4 for block in given.restoration.transformer)
    for got, theirs in zip(encode(given.eval(), images, token_ids), expected_features):
        assert_close(got, theirs, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        losses = given(images, token_ids, pids, noise=noise)
    for name, value in expected.items():  # the TIR head runs as trained too
        assert_close(losses[name], value, atol=1e-5, rtol=1e-6, msg=name)
    assert list(report.architecture) == ARCHITECTURE_NAMES
    assert report.architecture["vision heads"] == (4, "given (vision_heads)")
    assert report.architecture["text heads"] == (2, "given (text_heads)")
    assert report.architecture["TIR heads"] == (4, "given (restoration_heads)")
    assert report.architecture["TIR depth"] == (SEN_DEPTH, "read off cross_modal_transformer_mae.resblocks.0..1")
    assert report.architecture["vision width"] == (128, "read off base_model.visual.conv1.weight")
    assert report.architecture["text layers"] == (2, "read off base_model.transformer.resblocks.0..1")
    assert {name: report.architecture[name][0] for name in (
        "vision MLP", "patch", "patch grid", "text width", "text MLP", "vocabulary", "end-of-text id", "context",
        "embedding", "image size", "text length", "ID classes",
    )} == {"vision MLP": 256, "patch": 8, "patch grid": "4x2", "text width": 64, "text MLP": 256,
           "vocabulary": SEN_VOCAB, "end-of-text id": SEN_EOT, "context": CONTEXT, "embedding": 128,
           "image size": "32x16", "text length": CONTEXT, "ID classes": NUM_CLASSES}
    assert report.reinitialised == {} and "vision 128 wide x 2 layers, heads 4, patch 8" in report.backbone

    # Without them: OpenAI's width / 64 (2, 1, 2), said so, and other features from the same weights.
    assumed, report = load_reference_checkpoint(heads_ckpt, image_size=IMAGE_SIZE)
    vision, text = assumed.clip.config.vision_config, assumed.clip.config.text_config
    assert (vision.num_attention_heads, text.num_attention_heads, assumed.restoration.cross_attn.num_heads) == (2, 1, 2)
    assert report.architecture["vision heads"] == (2, (
        "assumed width / 64 (OpenAI's rule; a checkpoint cannot show it): override with --vision_heads"))
    assert report.architecture["text heads"][1].endswith("override with --text_heads")
    assert report.architecture["TIR heads"] == (2, (
        "assumed embedding width / 64 (SEN's rule; a checkpoint cannot show it): override with --restoration_heads"))
    printed = str(report)
    assert "\n  architecture:\n    vision width = 128: read off base_model.visual.conv1.weight\n" in printed
    assert "\n    vision heads = 2: assumed width / 64 (OpenAI's rule; a checkpoint cannot show it): " \
           "override with --vision_heads\n" in printed
    image, text_features = encode(assumed.eval(), images, token_ids)
    assert (image - expected_features[0]).abs().max() > 1e-2
    assert (text_features - expected_features[1]).abs().max() > 1e-2
    assert_same_weights(assumed.clip, given.clip)  # the same tensors: only the heads differ


def test_tipr_convert_takes_the_head_counts_and_refuses_ones_that_do_not_divide(tmp_path, heads_ckpt, heads_source,
                                                                                irra_ckpt, capsys):
    out = tmp_path / "heads"
    assert main(["convert", "--checkpoint", str(heads_ckpt), "--out", str(out), "--image_size", "[32, 16]",
                 "--vision_heads", "4", "--text_heads", "2", "--restoration_heads", "4"]) == 0
    printed = capsys.readouterr().out
    for line in ("vision heads = 4: given (vision_heads)", "text heads = 2: given (text_heads)",
                 "TIR heads = 4: given (restoration_heads)", "vision layers = 2: read off", "ID classes = 5"):
        assert f"\n    {line}" in printed
    config = json.loads((out / "config.json").read_text())
    clip = config["encoder"]["clip"]
    assert (clip["vision_config"]["num_attention_heads"], clip["text_config"]["num_attention_heads"]) == (4, 2)
    assert config["method"]["restoration_heads"] == 4
    reloaded = SENModel.from_pretrained(out).eval()
    images, token_ids, _, _ = sen_inputs()
    for got, expected in zip(encode(reloaded, images, token_ids), encode(heads_source, images, token_ids)):
        assert_close(got, expected, atol=1e-5, rtol=1e-5)

    def refused(*args):
        code = main(["convert", "--checkpoint", str(args[0]), "--out", str(tmp_path / "x"), "--image_size",
                     "[32, 16]", *map(str, args[1:])])
        err = capsys.readouterr().err
        assert code == 1 and not (tmp_path / "x").exists()
        return err

    assert (f"tipr convert: error: --vision_heads 3: does not divide the vision width 128 of --checkpoint "
            f"{heads_ckpt} (heads must divide the width; 128's divisors: 1, 2, 4, 8, 16, 32, 64, 128)"
            ) in refused(heads_ckpt, "--vision_heads", 3)
    assert "--text_heads 5: does not divide the text width 64 of --checkpoint" in refused(heads_ckpt, "--text_heads", 5)
    assert ("--restoration_heads 3: does not divide the embedding width 128 of --checkpoint"
            in refused(heads_ckpt, "--restoration_heads", 3))
    assert ("--restoration_heads 4: sets the TIR head of SEN, and " in refused(irra_ckpt, "--restoration_heads", 4))
    with pytest.raises(ValueError, match=re.escape(f"{heads_ckpt}: text_heads=3 does not divide the text width 64")):
        load_reference_checkpoint(heads_ckpt, image_size=IMAGE_SIZE, text_heads=3)
    with pytest.raises(SystemExit) as usage:  # not a positive count: jsonargparse's usage error
        main(["convert", "--checkpoint", str(heads_ckpt), "--out", str(tmp_path / "x"), "--vision_heads", "0"])
    assert usage.value.code == 2


def test_a_width_that_is_no_multiple_of_64_needs_its_head_count(tmp_path, heads_source):
    # A 200-wide text tower: OpenAI's 200 // 64 = 3 heads do not divide it, so the count must be given.
    weights = to_openai(heads_source.clip)
    weights["token_embedding.weight"] = torch.zeros(SEN_VOCAB, 200)
    state = {key: value for key, value in weights.items() if not key.startswith("transformer.")}
    with pytest.raises(ValueError, match=re.escape("the text width 200 is no multiple of 64: width // 64 = 3 heads "
                                                   "do not divide it; give text_heads (--text_heads)")):
        convert_openai_clip_state_dict(state, IMAGE_SIZE)
