"""ONNX export of the image encoder: parity with torch (fp32, int8), dynamic batch, model checks, the command."""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tipr.commands import main
from tipr.search import model_fingerprint
from tipr.search.onnx import (
    ONNX_FILES,
    ONNX_INFO_FILE,
    OnnxImageEncoder,
    OnnxUnavailableError,
    export_image_encoder,
    parity,
)
from tiny import Tiny

#: ONNX fp32 vs torch on the tiny model: measured 7e-7 (max abs diff of features of norm ~5).
FP32_MAX_DIFF = 1e-4
MIN_COSINE = 0.999  # int8 measured 0.99989 on the tiny model


def _pixels(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *Tiny.image_size, generator=torch.Generator().manual_seed(seed))


def _torch_features(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode_image(pixels)


@pytest.fixture(scope="module")
def exported(tiny_network, tmp_path_factory) -> Path:
    """The session's tiny model exported (fp32 and int8) once for this module's read-only tests."""
    folder = tmp_path_factory.mktemp("onnx") / "export"
    written = export_image_encoder(tiny_network, folder)
    assert set(written) == {"fp32", "int8", "json"}
    return folder


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_export_matches_torch_on_any_batch_size(tiny_network, exported, precision):
    encoder = OnnxImageEncoder.from_folder(exported, model_fingerprint(tiny_network), precision, threads=1)
    assert encoder.path == exported / ONNX_FILES[precision]
    assert (encoder.image_size, encoder.embed_dim) == (Tiny.image_size, tiny_network.embed_dim)
    assert encoder.fingerprint == model_fingerprint(tiny_network)
    cosine, diff = parity(tiny_network, encoder)
    assert cosine >= MIN_COSINE
    if precision == "fp32":
        assert diff < FP32_MAX_DIFF
    else:
        assert 0 < diff < 0.5  # int8 rounds; features have norms of about 5
    five = _pixels(5)
    expected = _torch_features(tiny_network, five)
    got = encoder(five)
    assert got.shape == (5, tiny_network.embed_dim) and got.dtype == torch.float32
    one = encoder(five[:1])  # the batch axis is dynamic: 1 and 5 from one graph exported at batch 2
    assert one.shape == (1, tiny_network.embed_dim)
    assert torch.nn.functional.cosine_similarity(got, expected, dim=-1).min() >= MIN_COSINE
    if precision == "fp32":
        assert (got - expected).abs().max() < FP32_MAX_DIFF
        assert (one[0] - expected[0]).abs().max() < FP32_MAX_DIFF
    assert encoder(five[:0]).shape == (0, tiny_network.embed_dim)


def test_the_json_describes_the_export(tiny_network, exported):
    info = json.loads((exported / ONNX_INFO_FILE).read_text())
    assert info["fingerprint"] == model_fingerprint(tiny_network)
    assert info["files"] == ONNX_FILES
    assert info["image_size"] == list(Tiny.image_size) and info["embed_dim"] == tiny_network.embed_dim
    assert (info["input"], info["output"], info["opset"]) == ("pixel_values", "image_features", 17)
    assert info["quantization"]["op_types_to_quantize"] == ["MatMul"]
    assert set(info["versions"]) == {"torch", "onnx", "onnxruntime"}
    assert not list(exported.glob("*.partial"))  # nothing left of the atomic writes


def test_wrong_input_shape_names_the_expected_shape(tiny_network, exported):
    encoder = OnnxImageEncoder(exported / ONNX_FILES["fp32"], threads=1)
    with pytest.raises(ValueError, match=r"must have shape \(B, 3, 32, 16\), got \(2, 3, 16, 32\)"):
        encoder(torch.zeros(2, 3, 16, 32))
    with pytest.raises(ValueError, match=r"must have shape \(B, 3, 32, 16\), got \(3, 32, 16\)"):
        encoder(torch.zeros(3, 32, 16))


def test_from_folder_refuses_another_models_export(tiny_network, exported, tmp_path):
    other = copy.deepcopy(tiny_network)
    with torch.no_grad():
        other.clip.visual_projection.weight[0, 0] += 1e-3  # one weight changed: another model
    ours, theirs = model_fingerprint(tiny_network), model_fingerprint(other)
    assert ours != theirs
    for precision in ONNX_FILES:
        with pytest.raises(ValueError, match=rf"exported from another model \(fingerprint {ours}\); the model given "
                                             rf"has fingerprint {theirs}\. Export this model again with: tipr export-onnx"):
            OnnxImageEncoder.from_folder(exported, theirs, precision)
    # A file replaced after the JSON was written: the file's own fingerprint is checked too.
    folder = tmp_path / "mixed"
    shutil.copytree(exported, folder)
    export_image_encoder(other, tmp_path / "other", quantize=False)
    shutil.copy(tmp_path / "other" / ONNX_FILES["fp32"], folder / ONNX_FILES["fp32"])
    with pytest.raises(ValueError, match=rf"image_encoder\.onnx was exported from another model \(fingerprint {theirs}\)"
                                         rf".* has fingerprint {ours}"):
        OnnxImageEncoder.from_folder(folder, ours)
    assert OnnxImageEncoder.from_folder(folder, ours, "int8").fingerprint == ours  # the int8 file is still ours


def test_from_folder_without_an_export_names_the_command(tiny_network, exported, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"image_encoder\.json: no ONNX export .* write one with: "
                                                rf"tipr export-onnx --model .* --out {re.escape(str(tmp_path))}"):
        OnnxImageEncoder.from_folder(tmp_path, model_fingerprint(tiny_network))
    folder = tmp_path / "partly"
    shutil.copytree(exported, folder)
    (folder / ONNX_FILES["int8"]).unlink()  # listed in the JSON, gone
    with pytest.raises(FileNotFoundError, match=r"image_encoder\.int8\.onnx: the int8 model image_encoder\.json "
                                                r"lists is missing; export again with: tipr export-onnx"):
        OnnxImageEncoder.from_folder(folder, model_fingerprint(tiny_network), "int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        OnnxImageEncoder.from_folder(tmp_path, model_fingerprint(tiny_network), "fp16")


def test_an_fp32_only_export_has_no_int8_model(tiny_network, exported, tmp_path):
    folder = tmp_path / "fp32"
    shutil.copytree(exported, folder)  # an earlier export with int8: its int8 file goes
    written = export_image_encoder(tiny_network, folder, quantize=False)
    assert set(written) == {"fp32", "json"}
    assert sorted(p.name for p in folder.iterdir()) == sorted([ONNX_FILES["fp32"], ONNX_INFO_FILE])
    with pytest.raises(ValueError, match="has no int8 model .* export again with: tipr export-onnx"):
        OnnxImageEncoder.from_folder(folder, model_fingerprint(tiny_network), "int8")


def test_export_leaves_the_model_as_it_was(tmp_path):
    model = Tiny.network(init_seed=3).train()
    model.clip.text_model.eval()  # a mixed mode, kept submodule by submodule
    modes = {name: m.training for name, m in model.named_modules()}
    state = {name: t.clone() for name, t in model.state_dict().items()}
    fingerprint = model_fingerprint(model)
    written = export_image_encoder(model, tmp_path)
    parity(model, OnnxImageEncoder(written["int8"], threads=1))
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert list(after) == list(state)
    for name, tensor in state.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert model_fingerprint(model) == fingerprint


def test_reference_fp16_weights_export_in_fp32(tmp_path):
    model = Tiny.network(reference_fp16_weights=True).eval()
    written = export_image_encoder(model, tmp_path, quantize=False)
    assert model.clip.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float16  # the model is untouched
    cosine, diff = parity(model, OnnxImageEncoder(written["fp32"], threads=1))
    assert cosine >= MIN_COSINE and diff < 0.05  # torch computes in fp16 autocast, the export in fp32


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx"])
def test_missing_packages_name_the_extra(tiny_network, exported, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    with pytest.raises(OnnxUnavailableError, match=r'need the onnx and onnxruntime packages .*pip install "tipr\[onnx\]"'):
        export_image_encoder(tiny_network, tmp_path)
    assert not list(tmp_path.iterdir())
    if missing == "onnxruntime":
        with pytest.raises(OnnxUnavailableError, match=r"tipr\[onnx\]"):
            OnnxImageEncoder(exported / ONNX_FILES["fp32"])
    assert issubclass(OnnxUnavailableError, ImportError)


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _parity_lines(out: str) -> dict[str, tuple[Path, float, float]]:
    pattern = r"wrote (\S+) \((fp32|int8), [\d.]+ MB\): min cosine vs torch ([\d.]+), max abs diff (\S+)"
    return {m[2]: (Path(m[1]), float(m[3]), float(m[4])) for m in re.finditer(pattern, out)}


def test_export_onnx_command_writes_into_the_pretrained_folder(tiny_network, tiny_pretrained, tmp_path, capsys):
    folder = tmp_path / "pretrained"
    shutil.copytree(tiny_pretrained, folder)
    code, out, err = _run(capsys, "export-onnx", "--model", folder, "--threads", 1)
    assert code == 0, err
    assert {ONNX_FILES["fp32"], ONNX_FILES["int8"], ONNX_INFO_FILE} <= {p.name for p in folder.iterdir()}
    lines = _parity_lines(out)
    assert set(lines) == {"fp32", "int8"}
    for precision, (path, cosine, diff) in lines.items():
        assert path == folder / ONNX_FILES[precision] and cosine >= MIN_COSINE
    assert lines["fp32"][2] < FP32_MAX_DIFF
    assert f"wrote {folder / ONNX_INFO_FILE}" in out and "note:" not in err
    info = json.loads((folder / ONNX_INFO_FILE).read_text())
    assert info["fingerprint"] == model_fingerprint(tiny_network)  # the folder holds the session's model
    assert info["checkpoint"] == str(folder.resolve())
    OnnxImageEncoder.from_folder(folder, model_fingerprint(tiny_network), "int8")


def test_export_onnx_command_options(tiny_network, tiny_pretrained, tmp_path, capsys):
    out_folder = tmp_path / "onnx"
    code, out, err = _run(capsys, "export-onnx", "--model", tiny_pretrained, "--out", out_folder, "--no_int8")
    assert code == 0, err
    assert sorted(p.name for p in out_folder.iterdir()) == sorted([ONNX_FILES["fp32"], ONNX_INFO_FILE])
    assert set(_parity_lines(out)) == {"fp32"}
    assert not (tiny_pretrained / ONNX_INFO_FILE).exists()  # --out: the pretrained folder is not written

    code, out, err = _run(capsys, "export-onnx", "--model", "someone/some-model")  # a hub id, not a folder
    assert code == 1 and out == ""
    assert "tipr export-onnx: error: --model someone/some-model is not a local folder: give --out" in err

    code, out, err = _run(capsys, "export-onnx", "--model", tmp_path / "no-such-folder", "--out", tmp_path / "x")
    assert code == 1 and "tipr export-onnx: error: --model: " in err and "no-such-folder" in err
    assert not (tmp_path / "x").exists()


def test_export_onnx_command_without_onnxruntime(tiny_pretrained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, out, err = _run(capsys, "export-onnx", "--model", tiny_pretrained, "--out", tmp_path / "onnx")
    assert code == 1
    assert 'tipr export-onnx: error: ONNX export and inference need' in err and 'pip install "tipr[onnx]"' in err
