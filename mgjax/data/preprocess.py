"""Host-side image preprocessing with PIL, pixel for pixel as MGM's and InternVL's PyTorch pipelines compute it.

MGM: pad to square with the CLIP mean colour (stage 2 and inference) or centre-crop (stage 1), CLIP's processor at
the high resolution (768, HD 1536), then the low-resolution view(s) *derived from the normalised high-resolution
tensor* by bilinear resizing without antialiasing (aliasing included, as MGM does; HD: 1536 -> 672 -> 2x2 crops of
336, and 672 -> 336 for the global view).

InternVL: dynamic tiling (closest aspect-ratio grid of 448 tiles with InternVL's tie-break, tiles row-major,
a whole-image thumbnail last when there is more than one tile), ImageNet mean/std.

Outputs are float32 NCHW numpy arrays, ready for ``jax.device_put`` or a data loader. Every entry point takes any
PIL image and makes it RGB as both codebases do (``rgb``), with one deliberate deviation: 16-bit greyscale.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from mgjax.nn.resize import bilinear_matrix

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb(img: Image.Image, *, exif_transpose: bool = False, where: str = "image") -> Image.Image:
    """``img`` as the RGB image MGM's and InternVL's loaders make of it (PIL's ``convert('RGB')``: palettes
    expanded, alpha dropped, greyscale repeated), or ``ImageError`` naming ``where`` and the mode.

    Deliberate deviation: 16-bit greyscale (PIL modes ``I;16*``, and ``I`` as 16-bit files open) is scaled to 8
    bits (x / 257, rounded), where ``convert('RGB')`` — and so MGM and InternVL — clips every value above 255 and
    the image comes out nearly all white. ``exif_transpose``: turn the image upright by its EXIF orientation
    first; neither codebase does, so it is off by default."""
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT:
        levels = np.clip(np.asarray(img, np.float64), 0, 65535) / 257
        return Image.fromarray(np.rint(levels).astype(np.uint8), "L").convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{where}: PIL image mode {img.mode!r} has no RGB conversion ({e})") from None


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes carried inside a record (``data.shards``), under the path it was read from."""

    name: str
    data: bytes

    def __repr__(self) -> str:  # reports name the image, not its bytes
        return f"EncodedImage({self.name!r}, {len(self.data)} bytes)"


MAX_IMAGE_PIXELS = 50_000_000  # far below PIL's bomb guard (~179 MP): one 13000^2 PNG of 481 KB decodes to 0.5 GB


def load_image(
    path: str | os.PathLike | EncodedImage, *, exif_transpose: bool = False, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Open an image file (or an ``EncodedImage``'s bytes) as RGB (``rgb``), or raise ``ImageError`` naming it.
    An image of more than ``max_pixels`` is refused from its header, before anything is decoded."""
    source = path
    if isinstance(path, EncodedImage):
        source, path = io.BytesIO(path.data), path.name
    try:
        with Image.open(source) as img:  # a copy: the opened image dies with its file
            if img.width * img.height > max_pixels:
                raise ImageError(f"{path}: {img.width}x{img.height} pixels is more than the {max_pixels:,} allowed")
            return rgb(img, exif_transpose=exif_transpose, where=str(path)).copy()
    except ImageError:
        raise
    except Exception as e:  # PIL raises what its decoders raise (OSError, SyntaxError, struct and zlib errors, ...)
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def normalize(img: Image.Image, mean, std) -> np.ndarray:
    """uint8 RGB -> float32 [3, H, W]: x / 255, then (x - mean) / std (the order transformers and torchvision use)."""
    x = np.asarray(img, np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Mini-Gemini
# ---------------------------------------------------------------------------------------------------------------


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre ``img`` on a square canvas of colour ``fill`` (LLaVA's ``expand2square``)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_pixels(img: Image.Image, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
    """CLIP's image processor with shortest edge and crop both ``size``: bicubic resize of the short side to
    ``size`` (the long side truncated, as transformers computes it), centre crop, normalise."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    img = img.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return normalize(img.crop((left, top, left + size, top + size)), mean, std)


def bilinear_pixels(x: np.ndarray, size: int) -> np.ndarray:
    """[..., 3, H, W] -> [..., 3, size, size] like ``F.interpolate(mode='bilinear', align_corners=False)``."""
    rows = bilinear_matrix(x.shape[-2], size).astype(np.float32)
    cols = bilinear_matrix(x.shape[-1], size).astype(np.float32)
    return (rows @ x.astype(np.float32) @ cols.T).astype(np.float32)  # matmuls: einsum takes no BLAS path here


def mgm_images(
    img: Image.Image,
    *,
    image_size_aux: int = 768,
    image_grid: int = 1,
    image_global: bool = False,
    image_size: int = 336,
    pad: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, images_aux)`` for one image: images [3, 336, 336] (HD: [views, 3, 336, 336], crops row-major,
    global view last), images_aux [3, S, S]. ``pad``: MGM's ``image_aspect_ratio='pad'`` (stage 2, inference);
    False centre-crops (stage 1's default)."""
    img = rgb(img)
    if pad:
        img = expand_to_square(img, tuple(int(m * 255) for m in OPENAI_CLIP_MEAN))
    high = clip_pixels(img, image_size_aux)
    low = bilinear_pixels(high, image_size * image_grid)
    if image_grid == 1:
        return low, high
    s = image_size
    views = [low[:, r * s : (r + 1) * s, c * s : (c + 1) * s] for r in range(image_grid) for c in range(image_grid)]
    if image_global:
        views.append(bilinear_pixels(low, s))
    return np.stack(views), high


# ---------------------------------------------------------------------------------------------------------------
# Mini-InternVL
# ---------------------------------------------------------------------------------------------------------------


def closest_grid(
    width: int, height: int, *, min_num: int = 1, max_num: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """(columns, rows) of InternVL's tiling: the grid whose aspect ratio is closest to the image's; on an exact
    tie the larger grid wins while the image's area exceeds half of the grid's canvas."""
    grids = sorted(
        {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        },
        key=lambda g: g[0] * g[1],
    )
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def dynamic_tiles(
    img: Image.Image, *, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    """InternVL's ``dynamic_preprocess``: resize to the chosen grid, cut tiles row-major, thumbnail last."""
    img = rgb(img)
    cols, rows = closest_grid(*img.size, min_num=min_num, max_num=max_num, image_size=image_size)
    resized = img.resize((cols * image_size, rows * image_size), Image.BICUBIC)
    tiles = [
        resized.crop(
            (
                (k % cols) * image_size,
                (k // cols) * image_size,
                (k % cols + 1) * image_size,
                (k // cols + 1) * image_size,
            )
        )
        for k in range(cols * rows)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(img.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def internvl_pixels(
    img: Image.Image, *, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> np.ndarray:
    """[tiles, 3, 448, 448] float32 with ImageNet normalisation."""
    tiles = dynamic_tiles(img, min_num=min_num, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail)
    return np.stack([normalize(t, IMAGENET_MEAN, IMAGENET_STD) for t in tiles])
