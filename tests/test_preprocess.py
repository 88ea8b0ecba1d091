"""Host-side preprocessing against transformers' PIL image processors and torch's bilinear interpolation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from mgjax.data import preprocess as P
from tests.helpers import max_abs


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _clip_processor(size):
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.mark.parametrize("w,h", [(101, 67), (50, 93), (64, 64)])
def test_clip_pixels_match_transformers(w, h, report):
    img = _image(w, h)
    want = _clip_processor(48).__call__(images=img, return_tensors="np").pixel_values[0]
    report(f"clip pixels {w}x{h}", max_abs(P.clip_pixels(img, 48), want), 1e-5)


@pytest.mark.parametrize("hd", [False, True])
def test_mgm_views_derive_from_the_high_res_tensor(hd, report):
    """MGM: pad to square, CLIP processor at the HR size, LR by torch bilinear without antialias (HD: via 2x)."""
    img = _image(90, 60, seed=1)
    aux, low = (64, 16) if not hd else (128, 16)
    images, images_aux = P.mgm_images(
        img, image_size_aux=aux, image_grid=2 if hd else 1, image_global=hd, image_size=low
    )
    square = P.expand_to_square(img, (122, 116, 104))
    assert square.size == (90, 90) and square.getpixel((0, 0)) == (122, 116, 104)
    assert square.getpixel((0, 15)) == img.getpixel((0, 0))  # the image is centred vertically
    high = _clip_processor(aux)(images=square, return_tensors="np").pixel_values
    report(f"mgm HR view (hd={hd})", max_abs(images_aux, high[0]), 1e-5)
    t = torch.from_numpy(high)
    if not hd:
        want = F.interpolate(t, size=(low, low), mode="bilinear", align_corners=False)[0].numpy()
        report("mgm LR view", max_abs(images, want), 1e-5)
        return
    grid = F.interpolate(t, size=(2 * low, 2 * low), mode="bilinear", align_corners=False)
    crops = [grid[0, :, r * low : (r + 1) * low, c * low : (c + 1) * low] for r in range(2) for c in range(2)]
    glob = F.interpolate(grid, size=(low, low), mode="bilinear", align_corners=False)[0]
    want = torch.stack(crops + [glob]).numpy()
    assert images.shape == (5, 3, low, low)
    report("mgm HD views (4 crops + global)", max_abs(images, want), 1e-5)


def test_stage_one_crops_instead_of_padding():
    img = _image(90, 60, seed=2)
    _, aux = P.mgm_images(img, image_size_aux=32, image_size=16, pad=False)
    want = _clip_processor(32)(images=img, return_tensors="np").pixel_values[0]
    np.testing.assert_allclose(aux, want, atol=1e-5)


@pytest.mark.parametrize(
    "size,grid",
    [((448, 448), (1, 1)), ((1000, 1000), (3, 3)), ((1920, 1080), (4, 2)), ((2688, 896), (6, 2)), ((896, 448), (2, 1))],
)
def test_internvl_grid_choice(size, grid):
    assert P.closest_grid(*size, max_num=12) == grid


@pytest.mark.parametrize("w,h,max_num", [(250, 90, 12), (60, 61, 6), (300, 50, 40)])
def test_internvl_tiles_match_transformers(w, h, max_num, report):
    img = _image(w, h, seed=3)
    proc = transformers.GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        size={"height": 56, "width": 56},
        min_patches=1,
        max_patches=max_num,
        image_mean=P.IMAGENET_MEAN,
        image_std=P.IMAGENET_STD,
    )
    want = proc(images=img, return_tensors="np").pixel_values
    got = P.internvl_pixels(img, image_size=56, max_num=max_num)
    assert got.shape == want.shape
    report(f"internvl tiles {w}x{h} max {max_num} ({len(got)} tiles)", max_abs(got, want), 1e-5)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(P.ImageError, match="broken.jpg: cannot read image"):
        P.load_image(bad)
    with pytest.raises(P.ImageError, match="missing.png"):
        P.load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK"])
def test_any_pil_mode_is_converted_as_the_loaders_do(mode):
    """A PIL image of any common mode gives what its ``convert('RGB')`` gives (both codebases load that way)."""
    img = _image(37, 29, seed=3).convert(mode)
    rgb = img.convert("RGB")
    for got, want in (
        (P.mgm_images(img, image_size_aux=32, image_size=16), P.mgm_images(rgb, image_size_aux=32, image_size=16)),
        ((P.internvl_pixels(img, image_size=28),), (P.internvl_pixels(rgb, image_size=28),)),
    ):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """Deliberate deviation: PIL's convert('RGB') (MGM's and InternVL's) clips 16-bit levels above 255 to white."""
    levels = np.random.default_rng(4).integers(0, 256, (24, 40), dtype=np.uint16)
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")  # 16-bit PNG: opens as mode I;16
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode == "I;16"
        assert np.asarray(raw.convert("RGB")).mean() > 250  # what the original loaders see: nearly all white
    got = np.asarray(P.load_image(tmp_path / "deep.png"))
    np.testing.assert_array_equal(got, np.repeat(levels[..., None], 3, axis=2))
    wide = Image.fromarray((levels * 257).astype(np.int32), "I")  # 16-bit files as older Pillow opens them
    np.testing.assert_array_equal(np.asarray(P.rgb(wide)), got)


def test_exif_orientation_is_kept_unless_asked(tmp_path):
    img = _image(40, 20, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert P.load_image(tmp_path / "phone.jpg").size == (40, 20)  # MGM and InternVL ignore the tag
    assert P.load_image(tmp_path / "phone.jpg", exif_transpose=True).size == (20, 40)


def test_an_unconvertible_mode_is_named():
    with pytest.raises(P.ImageError, match="scan.png: PIL image mode 'La' has no RGB conversion"):
        P.rgb(Image.new("La", (4, 4)), where="scan.png")


def test_the_server_turns_images_upright_on_request(tmp_path):
    import base64
    import io

    from mgjax.inference import serve

    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 counter-clockwise to view"
    buf = io.BytesIO()
    _image(40, 20, seed=6).save(buf, "JPEG", exif=exif)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    assert serve._image(uri, "messages[0].content[1]", False).size == (40, 20)
    assert serve._image(uri, "messages[0].content[1]", True).size == (20, 40)
