"""SENModel, IRRAModel / TIPRProcessor: save_pretrained, from_pretrained, push_to_hub, inference without Lightning."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from tipr.methods.irra import IRRAModel
from tipr.methods.sen import SENConfig, SENModel, SENOutput
from tipr.model import TIPRModel
from tipr.pretrained import load_pretrained, push_to_hub, save_pretrained
from tipr.processing import TIPRProcessor
from tipr.tokenization import load_tokenizer
from tiny import Tiny

IMAGE_SIZE = Tiny.image_size
TEXT_LENGTH = Tiny.text_length
CAPTIONS = ["a man in a red shirt", "a woman with a skirt and a black bag"]


def _model(**settings):
    return Tiny.network(**settings)


def _pictures():
    return [Image.new("RGB", (20, 50), (200, 30, 30)), Image.new("RGB", (24, 48), (20, 30, 220))]


@pytest.fixture(scope="module")
def folder(tiny_pretrained):
    return tiny_pretrained


@pytest.mark.parametrize("fp16", [False, True])
def test_round_trip_keeps_weights_config_and_losses(tmp_path, fp16):
    model = _model(reference_fp16_weights=fp16, mask_ratio=0.6, loss_weights={"sdm": 1, "triplet": 2, "restoration": 3})
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["format"], saved["model_type"]) == ("tipr", "sen")
    loaded = SENModel.from_pretrained(tmp_path)
    assert not loaded.training and loaded.config == model.config and loaded.encoder_config == model.encoder_config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    images = torch.randn(2, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    input_ids = TIPRProcessor.for_model(model).tokenize(CAPTIONS)
    noise = torch.rand(2, model.embeddings.num_patches, generator=torch.Generator().manual_seed(1))
    out = model.eval()(images, input_ids, torch.tensor([0, 1]), noise=noise)
    again = loaded(images, input_ids, torch.tensor([0, 1]), noise=noise)
    assert isinstance(out, SENOutput) and list(out.keys()) == ["loss", "sdm", "triplet", "restoration"]
    assert out.id is None  # weight 0: no term (the classifier exists)
    assert out.loss is out["loss"]
    assert float(out.loss) == pytest.approx(float(out.sdm + 2 * out.triplet + 3 * out.restoration), rel=1e-5)
    for name in out.keys():
        assert torch.equal(out[name], again[name]), name


def test_from_pretrained_names_what_is_wrong(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="no-such-folder: no such folder; expected a pretrained folder"):
        SENModel.from_pretrained(tmp_path / "no-such-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks config.json, model.safetensors"):
        SENModel.from_pretrained(tmp_path / "empty")
    config = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**config, "method": {**config["method"], "tir_depth": 2}}))
    with pytest.raises(ValueError, match=r"bad/config.json: unknown sen config key\(s\) \['tir_depth'\]"):
        SENModel.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "rde"}))
    with pytest.raises(ValueError, match=r"bad/config.json: model_type: unknown method 'rde'; expected one of sen, irra"):
        TIPRModel.from_pretrained(bad)
    encoder = {**config["encoder"], "image_size": [48, 16]}  # a 6 x 2 grid: 13 positions
    (bad / "config.json").write_text(json.dumps({**config, "encoder": encoder}))
    with pytest.raises(ValueError, match=r"model.safetensors: the weights do not fit .* shapes differ"):
        SENModel.from_pretrained(bad)
    with pytest.raises(ValueError, match="sen triplet_weight=-1.0 must be >= 0"):
        SENConfig(triplet_weight=-1.0)


def test_from_pretrained_returns_the_method_its_config_names(tmp_path, folder):
    """TIPRModel.from_pretrained is transformers' AutoModel: the folder's model_type picks the class."""
    irra = Tiny.network(method="irra")
    save_pretrained(irra, TIPRProcessor.for_model(irra), tmp_path / "irra")
    loaded = TIPRModel.from_pretrained(tmp_path / "irra")
    assert type(loaded) is IRRAModel and loaded.config == irra.config
    for (name, a), (_, b) in zip(irra.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert type(TIPRModel.from_pretrained(folder)) is SENModel
    with pytest.raises(ValueError, match=r"is an irra model \(IRRAModel\), not a SENModel"):
        SENModel.from_pretrained(tmp_path / "irra")
    model, processor = load_pretrained(tmp_path / "irra")
    assert type(model) is IRRAModel and processor.text_length == TEXT_LENGTH


def test_a_tipr_0_2_pretrained_folder_still_loads(tmp_path, folder):
    """0.2 wrote one flat SEN config ("format": "tipr-sen", a loss_weights dict)."""
    config = json.loads((folder / "config.json").read_text())
    method = dict(config["method"])
    weights = {name: method.pop(f"{name}_weight") for name in ("sdm", "id", "triplet", "restoration", "itc")}
    old = {"format": "tipr-sen", **config["encoder"], **method, "loss_weights": weights}
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    loaded = TIPRModel.from_pretrained(tmp_path)
    assert type(loaded) is SENModel and loaded.config == SENModel.from_pretrained(folder).config


def test_processor_round_trip_and_inputs(tmp_path, folder):
    processor = TIPRProcessor.from_pretrained(folder)
    assert processor.image_size == IMAGE_SIZE and processor.text_length == TEXT_LENGTH
    shipped = TIPRProcessor(None, IMAGE_SIZE, TEXT_LENGTH)
    assert torch.equal(processor.tokenize(CAPTIONS), shipped.tokenize(CAPTIONS))
    pictures = _pictures()
    pictures[0].save(tmp_path / "a.png")
    inputs = processor(text=CAPTIONS, images=pictures)
    assert inputs["input_ids"].shape == (2, TEXT_LENGTH) and inputs["pixel_values"].shape == (2, 3, *IMAGE_SIZE)
    from_file = processor(images=[tmp_path / "a.png"])["pixel_values"]
    assert torch.equal(from_file[0], inputs["pixel_values"][0])  # a path and a PIL image give the same input
    # A red image is red after normalisation: the red channel is above the others.
    assert inputs["pixel_values"][0, 0].mean() > inputs["pixel_values"][0, 2].mean()
    with pytest.raises(TypeError, match="image 0 is ndarray; expected a PIL image"):
        processor(images=[torch.zeros(3, 4, 4).numpy()])
    with pytest.raises(ValueError, match="needs text"):
        processor()


def test_a_notebook_ranks_offline_without_lightning(folder):
    """The issue's notebook: load from a folder, encode captions and PIL images, rank; no Lightning, no network."""
    script = textwrap.dedent(f"""
        import sys, torch
        from PIL import Image
        from tipr.model import TIPRModel
        from tipr.processing import TIPRProcessor
        model = TIPRModel.from_pretrained({str(folder)!r})
        processor = TIPRProcessor.from_pretrained({str(folder)!r})
        images = [Image.new("RGB", (20, 50), (200, 30, 30)), Image.new("RGB", (24, 48), (20, 30, 220))]
        inputs = processor(text={CAPTIONS!r}, images=images)
        with torch.inference_mode():
            scores = model.similarity(model.encode_text(inputs["input_ids"]), model.encode_image(inputs["pixel_values"]))
        assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules, "Lightning was imported"
        print(scores.argsort(dim=1, descending=True).tolist(), scores.flatten().tolist())
    """)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    order, scores = json.loads("[" + result.stdout.strip().replace("] [", "], [") + "]")
    model, processor = load_pretrained(folder)
    inputs = processor(text=CAPTIONS, images=_pictures())
    with torch.inference_mode():
        expected = model.similarity(model.encode_text(inputs["input_ids"]), model.encode_image(inputs["pixel_values"]))
    assert order == expected.argsort(dim=1, descending=True).tolist()
    assert scores == pytest.approx(expected.flatten().tolist(), abs=1e-6)


def test_push_to_hub_uploads_model_and_processor(monkeypatch, folder):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))

    def upload_folder(self, repo_id, folder_path, **kw):
        calls["files"] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
        calls["config"] = json.loads((__import__("pathlib").Path(folder_path) / "config.json").read_text())
        return "https://huggingface.co/me/sen/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model, processor = load_pretrained(folder)
    assert push_to_hub(model, processor, "me/sen") == "https://huggingface.co/me/sen/commit/1"
    assert calls["repo"] == "me/sen"
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= set(calls["files"])
    from tipr.model.config import config_dict

    assert calls["config"] == json.loads(json.dumps(config_dict(model.encoder_config, model.config)))


def test_a_model_trained_with_a_folder_tokenizer_reloads_with_it(tmp_path):
    """A backbone folder brings its own tokenizer; checkpoints and the pretrained folder keep it after the
    folder is gone (here: 'red' and 'blue' swap ids, so the shipped tokenizer would encode differently)."""
    import shutil

    import lightning.pytorch as pl

    from tipr.model.backbone import build_clip
    from tipr.training import TIPRModule

    backbone = tmp_path / "clip"
    build_clip("tiny", text_length=TEXT_LENGTH).save_pretrained(backbone)
    load_tokenizer().save_pretrained(str(backbone))
    spec = json.loads((backbone / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["red</w>"], vocab["blue</w>"] = vocab["blue</w>"], vocab["red</w>"]
    (backbone / "tokenizer.json").write_text(json.dumps(spec))
    captions = ["a red coat", "blue jeans"]
    own = TIPRProcessor(load_tokenizer(backbone), IMAGE_SIZE, TEXT_LENGTH).tokenize(captions)
    assert not torch.equal(own, TIPRProcessor(None, IMAGE_SIZE, TEXT_LENGTH).tokenize(captions))

    module = TIPRModule(num_classes=2, method=SENConfig(), backbone=str(backbone), image_size=IMAGE_SIZE,
                        text_length=TEXT_LENGTH)
    pairs = [{"pixel_values": torch.randn(3, *IMAGE_SIZE), "input_ids": own[i % 2], "pids": i % 2} for i in range(4)]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fit end writes pretrained/
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(pairs, batch_size=4))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    shutil.rmtree(backbone)

    assert torch.equal(TIPRModule.load_from_checkpoint(tmp_path / "model.ckpt").processor.tokenize(captions), own)
    for source in (tmp_path / "model.ckpt", tmp_path / "pretrained"):
        assert torch.equal(load_pretrained(source)[1].tokenize(captions), own), source


def test_training_or_testing_starts_from_a_pretrained_folder(tmp_path, folder):
    """model.init_from: the CLIP weights, and each head whose shape fits; the data read with its tokenizer."""
    from tipr.cli import TIPRCLI
    from tipr.training import TIPRDataModule, TIPRModule

    pretrained = SENModel.from_pretrained(folder)
    same = TIPRModule(num_classes=Tiny.num_classes, method=SENConfig(), init_from=str(folder), image_size=IMAGE_SIZE,
                      text_length=TEXT_LENGTH)
    for name, value in pretrained.state_dict().items():
        assert torch.equal(same.network.state_dict()[name], value), name
    wider = TIPRModule(num_classes=5, method=SENConfig(), init_from=str(folder), image_size=IMAGE_SIZE,
                       text_length=TEXT_LENGTH)
    weights = wider.network.state_dict()
    assert weights["classifier.weight"].shape == (5, 64)  # another number of identities: a fresh classifier
    assert all(torch.equal(weights[k], v) for k, v in pretrained.state_dict().items() if not k.startswith("classifier"))
    with pytest.raises(ValueError, match=r"init_from=.* was built for image_size \(32, 16\) and text_length 16"):
        TIPRModule(num_classes=Tiny.num_classes, method=SENConfig(), init_from=str(folder), image_size=(64, 32),
                   text_length=TEXT_LENGTH)

    config = __import__("pathlib").Path(__file__).resolve().parents[1] / "experiments" / "synthetic.yaml"
    cli = TIPRCLI(TIPRModule, TIPRDataModule, auto_configure_optimizers=False, run=False, save_config_callback=None,
                  args=["--config", str(config), "--data.root", str(tmp_path), f"--model.init_from={folder}",
                        "--data.image_size=[32, 16]", f"--data.text_length={TEXT_LENGTH}"])
    assert cli.datamodule.tokenizer == str(folder)  # the folder's tokenizer reads the captions
    assert torch.equal(cli.model.network.clip.visual_projection.weight, pretrained.clip.visual_projection.weight)


def test_the_model_card_says_what_the_model_is_and_how_to_load_it(tmp_path, folder):
    """README.md (the hub's model page): tipr front matter, the method, shapes and the load lines; no generic
    mixin text. A card of earlier weights is rewritten with them; a README of the user's own is kept."""
    from huggingface_hub import ModelCard

    for method, model_class in (("sen", SENModel), ("irra", IRRAModel)):
        target = folder if method == "sen" else tmp_path / method
        if method != "sen":
            model = Tiny.network(method=method)
            save_pretrained(model, TIPRProcessor.for_model(model), target)
        card = (target / "README.md").read_text()
        assert "[More Information Needed]" not in card and "pushed to the Hub" not in card
        data = ModelCard.load(target / "README.md").data
        assert data.library_name == "tipr" and {method, "text-to-image-person-retrieval"} <= set(data.tags)
        name = model_class.config_class.display_name
        assert f"# {name} text-to-image person retrieval model" in card and f"`model_type: {method}`" in card
        assert f"Image size: {IMAGE_SIZE[0]} x {IMAGE_SIZE[1]}" in card and f"Text length: {TEXT_LENGTH} tokens" in card
        assert "Embedding dimension: 64" in card and "vision encoder 2 layers x 64 (4 heads, patch 8)" in card
        assert "TIPRModel.from_pretrained(folder)" in card and "tipr search --model <folder> --gallery" in card
        assert type(TIPRModel.from_pretrained(target)) is model_class  # loads with the card beside it
    stale = tmp_path / "stale"
    model = SENModel.from_pretrained(folder)
    model.save_pretrained(stale)
    (stale / "README.md").write_text("---\nlibrary_name: tipr\ntags:\n- model_hub_mixin\n---\n\nThis model has been "
                                     "pushed to the Hub using the PytorchModelHubMixin\n- Code: [More Information Needed]\n")
    model.save_pretrained(stale)
    assert (stale / "README.md").read_text() == (folder / "README.md").read_text()  # rewritten
    (stale / "README.md").write_text("# My notes on this model\n")
    model.save_pretrained(stale)
    assert (stale / "README.md").read_text() == "# My notes on this model\n"  # not ours: kept


def test_pushed_cards_name_the_hub_id(monkeypatch, folder):
    """Both uploads, tipr.pretrained.push_to_hub and the mixin's model.push_to_hub, carry the card, naming the repo."""
    import huggingface_hub
    from huggingface_hub import RepoUrl

    cards = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))

    def upload_folder(self, repo_id, folder_path, **kw):
        cards.append((__import__("pathlib").Path(folder_path) / "README.md").read_text())
        return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model, processor = load_pretrained(folder)
    push_to_hub(model, processor, "me/sen")
    model.push_to_hub("me/sen-model")
    for card, repo in zip(cards, ("me/sen", "me/sen-model"), strict=True):
        assert "[More Information Needed]" not in card and "library_name: tipr" in card
        assert f'TIPRModel.from_pretrained("{repo}")' in card and f"tipr search --model {repo} --gallery" in card


def test_loading_a_pretrained_folder_prints_nothing(tiny_pretrained):
    """Not transformers' 'You are using a model of type `sen` to instantiate a model of type ``' (AutoTokenizer
    reading the folder's config.json): the tokenizer class tokenizer_config.json names is loaded directly.
    In a fresh process: transformers says it once per process."""
    import subprocess
    import sys

    code = ("import sys; from tipr.pretrained import load_pretrained; model, processor = load_pretrained(sys.argv[1]); "
            "print(type(processor.tokenizer).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_pretrained)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "CLIPTokenizer"
    assert proc.stderr == "", proc.stderr


def test_a_hub_model_not_in_the_cache_without_a_network_is_one_error_at_once(monkeypatch, tmp_path):
    """No download is started (huggingface_hub retries for about 30 s) when one probe says the hub cannot be reached."""
    import huggingface_hub

    from tipr.model import hub

    downloads = []

    def download(repo, name, **kwargs):
        downloads.append(kwargs["local_files_only"])
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "no route")
    with pytest.raises(hub.HubUnreachableError, match=r"the hub model 'someone/sen' is not in the local Hugging Face "
                                                      r"cache and the hub cannot be reached \(no route\)"):
        hub.pretrained_files("someone/sen", ["config.json"])
    assert downloads == [True]
