"""The shared image-grid renderer (wrapped text, layout) and the retrieval / TIR panels logged after validation."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from PIL import Image

from tipr.training import TIPRDataModule
from tipr.data.transforms import CLIP_MEAN, CLIP_STD
from tipr.training import TIPRModule
from tipr.render import LINE_SPACING, display_size, image_grid, line_height, load_font, to_tile, wrap_text
from tipr.methods.sen.model import TIR_PANEL_CAPTION
from tipr.training.panels import FRAME, RetrievalPanels, to_pil

QUERY = "a woman in a blue ankle-length skirt and a red tee with a blue cap"


class ImageLogger(Logger):
    """Collects what ``log_image`` receives, like ``WandbLogger`` would show it."""

    def __init__(self):
        super().__init__()
        self.images = {}
        self.captions = {}

    name = "images"
    version = 0

    def log_image(self, key, images, step=None, **kwargs):
        assert all(len(values) == len(images) for values in kwargs.values())  # as WandbLogger checks
        self.images[key] = images
        self.captions[key] = kwargs.get("caption")

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] ``(3, H, W)`` pixels, CLIP-normalised as the eval transform leaves them."""
    return (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def test_to_pil_inverts_clip_normalisation():
    pixels = torch.tensor([0.0, 0.5, 1.0])[:, None, None].expand(3, 2, 2)
    assert to_pil(normalise(pixels)).getpixel((0, 0)) == (0, 128, 255)


# ------------------------------------------------------------------ tipr.render


@pytest.mark.parametrize("width", [80, 120, 200, 400])
def test_wrap_text_breaks_only_at_spaces_and_keeps_them(width):
    font = load_font(12)
    lines = wrap_text(QUERY, font, width)
    assert " ".join(lines) == QUERY  # every word whole, one space between words, nothing lost
    assert all(font.getlength(line) <= width for line in lines)
    assert not any("skirtand" in line or "skirtan" in line for line in lines)
    assert "skirt and" in " ".join(lines)
    # Greedy: the first word of each line would not have fitted on the line before.
    for before, after in zip(lines, lines[1:]):
        assert font.getlength(f"{before} {after.split()[0]}") > width


def test_wrap_text_splits_only_a_word_wider_than_the_line():
    font = load_font(12)
    lines = wrap_text("a supercalifragilisticexpialidocious skirt", font, 40)
    assert "".join(lines[1:-1]) == "supercalifragilisticexpialidocious" and lines[0] == "a" and lines[-1] == "skirt"
    assert all(font.getlength(line) <= 40 for line in lines)
    assert wrap_text("line one\nline two", font, 400) == ["line one", "line two"]
    assert wrap_text("", font, 40) == []


def test_the_font_is_scalable_where_pillow_can():
    small, large = load_font(10), load_font(20)
    if hasattr(small, "getmetrics"):  # FreeType: Pillow >= 10.1 scales the default font
        assert line_height(large) > line_height(small) + 5
        assert large.getlength(QUERY) > 1.5 * small.getlength(QUERY)
        assert small.getlength("skirt and") > small.getlength("skirtand") + 1  # a space is a visible gap


def test_image_grid_layout_places_tiles_and_text():
    red, blue = Image.new("RGB", (16, 32), (255, 0, 0)), torch.zeros(3, 32, 16)  # PIL and float tensors
    blue[2] = 1.0
    green = torch.zeros(3, 32, 16, dtype=torch.uint8)
    green[1] = 255
    pad, font = 4, load_font(12)
    step, (h, w) = line_height(font), (64, 40)
    captions = [["#1 0.5", "#2 0.4"], ["#1 0.9"]]
    assert all(font.getlength(c) <= w for row in captions for c in row)  # one caption line each
    grid = image_grid([[red, blue], [green]], captions, ["first row", "second"], tile_size=(h, w), pad=pad)
    title_h, caption_h = step + pad, LINE_SPACING + step
    cell_h = title_h + h + caption_h
    assert grid.size == (pad + 2 * (w + pad), pad + 2 * (cell_h + pad))
    for (r, c), colour in {(0, 0): (255, 0, 0), (0, 1): (0, 0, 255), (1, 0): (0, 255, 0)}.items():
        x, y = pad + c * (w + pad), pad + r * (cell_h + pad) + title_h
        tile = grid.crop((x, y, x + w, y + h))
        assert tile.getcolors() == [(w * h, colour)], (r, c)
        caption = grid.crop((x, y + h, x + w, y + h + caption_h)).convert("L")
        assert caption.getextrema()[0] < 100, (r, c)  # text drawn under the tile
        title = grid.crop((pad, y - title_h, grid.width - pad, y - pad)).convert("L")
        assert title.getextrema()[0] < 100, r
    x, y = 2 * pad + w, 2 * pad + cell_h  # row 2 has one tile: its second cell is blank
    assert grid.crop((x, y, x + w, y + cell_h)).getcolors() == [(w * cell_h, (255, 255, 255))]


def test_image_grid_without_text_is_make_grid_and_pads_a_single_tile():
    tiles = [torch.full((3, 8, 6), v, dtype=torch.uint8) for v in (10, 20, 30)]
    grid = image_grid([tiles], pad=2)
    assert grid.size == (2 + 3 * (6 + 2), 2 + 8 + 2)
    assert [grid.getpixel((2 + c * 8, 2)) for c in range(3)] == [(10,) * 3, (20,) * 3, (30,) * 3]
    one = image_grid([[tiles[0]]], pad=2)
    assert one.size == (6 + 4, 8 + 4) and one.getpixel((0, 0)) == (255, 255, 255) and one.getpixel((2, 2)) == (10,) * 3
    assert to_tile(Image.new("L", (3, 5), 7)).shape == (3, 5, 3)
    with pytest.raises(ValueError, match="captions must match the tiles"):
        image_grid([tiles], [["a"]])
    with pytest.raises(ValueError, match="2 rows need as many row_titles"):
        image_grid([tiles, tiles], row_titles=["a"])
    with pytest.raises(ValueError, match=r"C = 1 or 3"):
        image_grid([[torch.zeros(4, 8, 8)]])
    assert display_size((32, 16)) == (128, 64) and display_size((384, 128)) == (384, 128)


# ------------------------------------------------------------------ RetrievalPanels


def test_retrieval_panels_show_the_top_k_framed_by_identity_with_the_query_as_caption():
    """Hand-made features: query 0 is closest to gallery items 2, 0, 1 in that order; query 1 to 1, 2, 0."""
    gallery_features = torch.eye(3)  # item i along axis i
    query_features = torch.tensor([[0.5, 0.2, 1.0], [0.1, 1.0, 0.6]])
    ranks = SimpleNamespace(query_features=[query_features], gallery_features=[gallery_features],
                            query_index=[torch.tensor([0, 1])], gallery_index=[torch.tensor([0, 1, 2])])
    colours = [(0.8, 0.2, 0.2), (0.2, 0.8, 0.2), (0.2, 0.2, 0.8)]

    class Gallery(list):
        pids = torch.tensor([7, 8, 7])

    gallery = Gallery({"pixel_values": normalise(torch.tensor(c)[:, None, None].expand(3, 32, 16))} for c in colours)
    queries = SimpleNamespace(pids=torch.tensor([7, 8]))
    panels = RetrievalPanels(num_queries=2, top_k=3, num_restorations=0)
    images, texts = panels.retrieval_panels(SimpleNamespace(val_ranks=ranks), queries, gallery,
                                            captions=[QUERY, "a man in green"])
    assert texts == [QUERY, "a man in green"]
    order = [[2, 0, 1], [1, 2, 0]]
    tile_h, tile_w = (s + 2 * FRAME for s in display_size((32, 16)))  # 128x64 + frame
    for image, ranking, query_pid in zip(images, order, (7, 8)):
        assert image.width == 4 + 3 * (tile_w + 4)
        for c, item in enumerate(ranking):
            x = 4 + c * (tile_w + 4)
            frame = image.getpixel((x, 4))
            assert frame == ((0, 128, 0) if int(gallery.pids[item]) == query_pid else (255, 0, 0)), (c, item)
            inside = image.getpixel((x + tile_w // 2, 4 + tile_h // 2))
            assert inside == tuple(round(255 * v) for v in colours[item]), (c, item)  # the ranked item's picture


@pytest.mark.parametrize(("num_val_ids", "method"), [(4, "sen"), (0, "sen"), (4, "irra")],
                         ids=["val split", "no val split (ICFG-PEDES)", "IRRA"])
def test_panels_are_logged_after_validation(tmp_path, num_val_ids, method):
    """Also for a benchmark without a val split, which validates on test (ICFG-PEDES), and for IRRA
    (retrieval panels only: it draws no panel of its own)."""
    from tiny import Tiny

    torch.manual_seed(0)
    data = TIPRDataModule(dataset="synthetic", root=str(tmp_path), image_size=(32, 16), batch_size=8,
                          eval_batch_size=16, num_workers=0, text_length=48,
                          synthetic={"num_train_ids": 8, "num_val_ids": num_val_ids, "num_test_ids": 4,
                                     "images_per_id": 2, "image_size": (64, 32)})
    model = TIPRModule(num_classes=data.num_classes, method=Tiny.method_config(method), backbone="tiny",
                       image_size=(32, 16), text_length=48)
    logger = ImageLogger()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0,
                         logger=logger, callbacks=[RetrievalPanels(num_queries=3, top_k=4, num_restorations=2)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)  # the logger has no folder: fit end exports here
    trainer.fit(model, datamodule=data)
    split = data.eval_split("validate")
    assert split == ("val" if num_val_ids else "test")
    # One retrieval image per query, captioned with the query's own text (queries come in loader order).
    assert logger.captions["val/retrieval"] == [str(c) for c in data.benchmark.split(split).captions[:3]]
    retrieval = logger.images["val/retrieval"]
    assert len(retrieval) == 3
    if method == "irra":
        assert set(logger.images) == {"val/retrieval"}
        return
    assert logger.captions["val/tir"] == [TIR_PANEL_CAPTION]
    (tir,) = logger.images["val/tir"]
    # 4 framed tiles of 128x64 (32x16 scaled by 4), 4 px apart, a caption line under each
    step = line_height(load_font(12))
    tile_h, tile_w = 128 + 2 * FRAME, 64 + 2 * FRAME
    assert {image.size for image in retrieval} == {(4 + 4 * (tile_w + 4), 4 + tile_h + LINE_SPACING + step + 4)}
    # 2 rows of input / restored / target at 128 x 64
    assert tir.size == (4 + 3 * (64 + 4), 4 + 2 * (128 + LINE_SPACING + step + 4))
    frames = {image.getpixel((4 + c * (tile_w + 4), 4)) for image in retrieval for c in range(4)}
    assert frames <= {(0, 128, 0), (255, 0, 0)}, frames  # every result framed as hit (green) or miss (red)
