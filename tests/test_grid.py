"""Image pixels -> image tokens for the LLaVA-1.5 CLIP processor: golden values computed by hand."""

import json

import numpy as np
import pytest
from PIL import Image

from fastv_analysis import grid
from fastv_analysis.grid import DEFAULT_GEOMETRY as G

LLAVA = grid.ImageGeometry(source="test")  # shortest edge 336, crop 336 x 336, patch 14


def test_grid_shape_is_24_by_24():
    assert grid.grid_shape(LLAVA) == (24, 24)
    clip_b32 = grid.ImageGeometry(shortest_edge=224, crop_height=224, crop_width=224, patch_size=32)
    assert grid.grid_shape(clip_b32) == (7, 7)


def test_wide_image_672x336():
    # shortest edge is already 336: no resize; the 336-wide crop starts at (672 - 336) // 2 = 168
    assert grid.resized_size(672, 336, LLAVA) == (672, 336)
    assert grid.crop_box(672, 336, LLAVA) == (168.0, 0.0, 504.0, 336.0)
    assert grid.token_box(0, 672, 336, LLAVA) == (168.0, 0.0, 182.0, 14.0)
    assert grid.token_box(25, 672, 336, LLAVA) == (182.0, 14.0, 196.0, 28.0)  # row 1, column 1
    assert grid.token_box(23, 672, 336, LLAVA) == (490.0, 0.0, 504.0, 14.0)  # row 0, last column
    assert grid.token_box(575, 672, 336, LLAVA) == (490.0, 322.0, 504.0, 336.0)
    boxes = grid.token_boxes(range(576), 672, 336, LLAVA)
    assert boxes[:, 0].min() == 168 and boxes[:, 2].max() == 504  # nothing outside the crop


def test_tall_image_100x200():
    # width is the short side: 100 -> 336, height 200 -> int(336 * 200 / 100) = 672;
    # crop top (672 - 336) // 2 = 168 resized px = 168 * 200 / 672 = 50 original px
    assert grid.resized_size(100, 200, LLAVA) == (336, 672)
    assert grid.crop_box(100, 200, LLAVA) == pytest.approx((0.0, 50.0, 100.0, 150.0))
    # one patch is 14 resized px = 14 * 100 / 336 = 4.1667 wide, 14 * 200 / 672 = 4.1667 tall
    assert grid.token_box(0, 100, 200, LLAVA) == pytest.approx((0.0, 50.0, 100 / 24, 50 + 100 / 24))
    assert grid.token_box(23, 100, 200, LLAVA) == pytest.approx((23 * 100 / 24, 50.0, 100.0, 50 + 100 / 24))
    assert grid.token_box(575, 100, 200, LLAVA) == pytest.approx((23 * 100 / 24, 150 - 100 / 24, 100.0, 150.0))


def test_truncated_long_side_500x333():
    # height short: 333 -> 336, width int(336 * 500 / 333) = int(504.50) = 504; crop left (504 - 336) // 2 = 84
    assert grid.resized_size(500, 333, LLAVA) == (504, 336)
    x0, y0, x1, y1 = grid.crop_box(500, 333, LLAVA)
    assert (x0, x1) == pytest.approx((84 * 500 / 504, 420 * 500 / 504))  # 83.33, 416.67
    assert (y0, y1) == pytest.approx((0.0, 333.0))
    # odd leftover: 337 x 1000 -> 336 x int(997.03) = 997; top (997 - 336) // 2 = 330 (floor, not round)
    assert grid.resized_size(337, 1000, LLAVA) == (336, 997)
    assert grid.crop_box(337, 1000, LLAVA)[1] == pytest.approx(330 * 1000 / 997)


def test_square_resize_pad_and_no_resize():
    square = grid.ImageGeometry(shortest_edge=None, resize_height=336, resize_width=336, source="t")
    assert grid.crop_box(672, 336, square) == (0.0, 0.0, 672.0, 336.0)  # squashed to 336 x 336, nothing cropped
    assert grid.token_box(0, 672, 336, square) == (0.0, 0.0, 28.0, 14.0)
    padded = grid.ImageGeometry(pad_to_square=True, source="t")  # 672 x 336 -> 672 x 672 canvas, image at y = 168
    assert grid.crop_box(672, 336, padded) == (0.0, -168.0, 672.0, 504.0)
    assert grid.token_box(0, 672, 336, padded) == (0.0, -168.0, 28.0, -140.0)
    raw = grid.ImageGeometry(do_resize=False, source="t")  # 300 x 200 smaller than the crop: padded around
    assert grid.crop_box(300, 200, raw) == (-18.0, -68.0, 318.0, 268.0)
    nocrop = grid.ImageGeometry(do_center_crop=False, source="t")
    assert grid.crop_box(672, 336, nocrop) == (0.0, 0.0, 672.0, 336.0)
    assert grid.grid_shape(nocrop, 672, 336) == (24, 48)


def test_grid_override_and_range():
    # 9 tokens spread over the crop of a 672 x 336 image: cells of 112 x 112
    assert grid.token_box(4, 672, 336, LLAVA, grid=(3, 3)) == (280.0, 112.0, 392.0, 224.0)
    assert grid.token_grid_for(576, LLAVA, 336, 336) is None
    assert grid.token_grid_for(16, LLAVA, 336, 336) == (4, 4)
    with pytest.raises(ValueError):
        grid.token_boxes([576], 336, 336, LLAVA)
    with pytest.raises(ValueError):
        grid.token_grid_for(577, LLAVA, 336, 336)


def test_geometry_from_model_files(tmp_path):
    from fastv_analysis.loading import DEFAULT_MODEL

    toy = grid.load_geometry(DEFAULT_MODEL)  # processor_config.json's image_processor + config.json's patch size
    assert (toy.shortest_edge, toy.crop_height, toy.crop_width, toy.patch_size) == (336, 336, 336, 14)
    assert not toy.is_fallback and toy.source.endswith("processor_config.json")
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"patch_size": 32}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"shortest_edge": 224}, "do_center_crop": True,
         "crop_size": {"height": 224, "width": 224}, "image_processor_type": "CLIPImageProcessor"}))
    g = grid.load_geometry(str(tmp_path))
    assert grid.grid_shape(g) == (7, 7) and g.source.endswith("preprocessor_config.json")
    assert grid.crop_box(448, 224, g) == (112.0, 0.0, 336.0, 224.0)
    assert grid.load_geometry(str(tmp_path / "nowhere")).is_fallback
    assert grid.load_geometry("no-such-org/no-such-model").is_fallback  # not cached: no download, fallback
    assert grid.load_geometry(None) == G and G.is_fallback


@pytest.mark.parametrize("size", [(672, 336), (100, 200), (500, 333), (337, 1000)])
def test_matches_the_real_processor(size):
    """The crop the real CLIP processor produces is the crop_box / model_view computed here."""
    from transformers import AutoProcessor

    from fastv_analysis.loading import DEFAULT_MODEL

    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL)
    g = grid.geometry_from_processor(processor, patch_size=14)
    assert (g.shortest_edge, g.crop_height, g.patch_size) == (336, 336, 14)
    w, h = size
    # a smooth image (bicubic resampling of noise would blur the comparison)
    xx, yy = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    pixels = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 4 * yy)], -1) * 255
    image = Image.fromarray(pixels.astype(np.uint8))
    out = processor.image_processor(images=[image], return_tensors="np", do_normalize=False,
                                    do_rescale=False)["pixel_values"][0].transpose(1, 2, 0)
    ours = np.asarray(grid.model_view(image, g), dtype=float)
    assert ours.shape == out.shape == (336, 336, 3)
    assert np.abs(ours - out).mean() < 1.0, size
    # the original pixel under each token's centre is (about) the processor's pixel there
    x0, y0, x1, y1 = grid.crop_box(w, h, g)
    box = grid.token_box(300, w, h, g)  # row 12, column 12
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert x0 <= cx < x1 and y0 <= cy < y1
    assert np.abs(pixels[int(cy), int(cx)] - out[12 * 14 + 7, 12 * 14 + 7]).max() < 4
