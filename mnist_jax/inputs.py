"""The user's own digits as model inputs, in MNIST's convention: white on black, in [0, 1].

Images (PNG, JPEG, any size, either polarity) are made the way MNIST's digits were made
(LeCun et al.): the digit's bounding box scaled, keeping its aspect ratio and anti-aliased, so
that its longer side is 20 pixels, then placed in a 28x28 field with its centre of mass at the
centre. Arrays (.npy) are taken as already in MNIST's convention and only checked and scaled.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from mnist_jax.config import INVERT
from mnist_jax.errors import ConfigError
from mnist_jax.preprocessing import check_images, check_labels, pixels_in_unit

__all__ = ["Input", "check_images", "check_labels", "load_inputs", "to_mnist"]

Invert = Literal["auto", "yes", "no"]
INVERT_CHOICES = tuple(INVERT)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ACCEPTED = ("PNG or JPEG images of any size, or .npy arrays of shape (N, 28, 28), (28, 28), "
            "(N, 784) or (784,), uint8 0..255 or float in [0, 1]")

# What MNIST's own digits show, and how each threshold was chosen: docs/design.md, "Your own
# digits".
SIZE = 28  # the field
BOX = 20  # the longer side of the digit's box, as MNIST's
CENTRE = 14.0  # the pixel MNIST's digits were shifted to put their centre of mass in
INK = 0.3  # of the paper-to-ink contrast: the pixels that make the digit's box
NOISE = 0.05  # below this is background, set to 0 as MNIST's
MIN_CONTRAST = 0.05  # less (13 grey levels of 255) is a blank page, not a faint digit
RESAMPLE = Image.Resampling.LANCZOS  # closer to MNIST's than bilinear; overshoot clipped


@dataclasses.dataclass(frozen=True, eq=False)
class Input:
    """One model input: `name` is the file (`file[i]` for the i-th image of an array),
    `image` (784,) float32 in [0, 1], white on black; `inverted` says whether an image file
    was inverted (what `invert="auto"` decided), None for arrays."""

    name: str
    image: np.ndarray  # (784,) float32
    inverted: bool | None


def load_inputs(paths: Sequence[str | os.PathLike] | str | os.PathLike,
                invert: Invert = "auto") -> list[Input]:
    """The images in `paths`, in order, as model inputs (each `image` (784,) float32).

    PNG and JPEG files go through `to_mnist` (after transparency is flattened onto white
    paper); `.npy` arrays of shape (N, 28, 28), (28, 28), (N, 784) or (784,) are taken as
    they are (uint8 scaled by 1/255, float checked to lie in [0, 1]); `invert` applies to
    image files only. Raises ConfigError naming the first file that cannot be used.
    """
    _check_invert(invert)
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    inputs: list[Input] = []
    for path in paths:
        path = Path(path)
        name = str(path)
        if not path.exists():
            raise ConfigError(f"{name}: no such file; check the path")
        if path.is_dir():
            raise ConfigError(f"{name} is a directory; give the image files in it")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            images, batched = _read_npy(path)
            names = [f"{name}[{i}]" for i in range(len(images))] if batched else [name]
            inputs += [Input(n, image, None) for n, image in zip(names, images, strict=True)]
        elif suffix in IMAGE_SUFFIXES:
            try:
                image, inverted = _convert(_read_image(path), invert)
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
            inputs.append(Input(name, image.reshape(SIZE * SIZE), inverted))
        else:
            raise ConfigError(f"{name}: cannot read {suffix or 'a file without a suffix'}; "
                              f"give {ACCEPTED}")
    return inputs


def to_mnist(gray: np.ndarray, invert: Invert = "auto") -> np.ndarray:
    """One grayscale image (H, W), uint8 or float in [0, 1], a digit in either polarity ->
    (28, 28) float32 in [0, 1], white on black, size-normalised and centred as MNIST's.

    `invert`: "auto" inverts a dark digit on light paper (the median of the outermost pixels
    above the image's mid-range), "yes" always, "no" never.
    """
    _check_invert(invert)
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ConfigError(f"to_mnist takes one grayscale image (H, W), not shape {gray.shape}; "
                          "convert colour images to grayscale first")
    return _convert(pixels_in_unit(gray, "the image"), invert)[0]


# --- arrays -------------------------------------------------------------------------------------

def _read_npy(path: Path) -> tuple[np.ndarray, bool]:
    """(N, 784) float32 images from a .npy file, and whether it held a batch (an N axis)."""
    try:
        with path.open("rb") as f:
            magic = f.read(len(np.lib.format.MAGIC_PREFIX))
            if magic != np.lib.format.MAGIC_PREFIX:
                what = "an .npz archive" if magic.startswith(b"PK") else "not an .npy file"
                raise ConfigError(f"{path}: {what}; save one array with np.save, or give "
                                  f"{ACCEPTED}")
            f.seek(0)
            array = np.load(f, allow_pickle=False)  # a pickle can run code: never loaded
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ConfigError(f"{path}: holds Python objects (pickled), which are never loaded; "
                              "save a numeric array, np.save(path, images.astype(np.uint8))"
                              ) from None
        raise ConfigError(f"{path}: not a readable .npy file ({_one_line(e)}); save it again "
                          "with np.save") from None
    except (OSError, EOFError) as e:
        raise ConfigError(f"{path}: cannot be read ({_one_line(e)}); check the file") from None
    shapes = ((28, 28), (784,))
    batched = array.ndim in (2, 3) and array.shape[1:] in shapes and len(array) > 0
    if not (array.shape in shapes or batched) or not (
            array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating)):
        raise ConfigError(f"{path}: an array of shape {array.shape} and dtype {array.dtype}; "
                          "give shape (N, 28, 28), (28, 28), (N, 784) or (784,), uint8 0..255 "
                          "or float in [0, 1]")
    images = pixels_in_unit(array, str(path))
    return images.reshape(-1, SIZE * SIZE), batched


# --- image files --------------------------------------------------------------------------------

def _read_image(path: Path) -> np.ndarray:
    """A PNG or JPEG as (H, W) float32 gray in [0, 1], transparency flattened onto white."""
    try:
        with Image.open(path, formats=("PNG", "JPEG")) as im:
            return _flatten(ImageOps.exif_transpose(im))  # phones store the rotation in EXIF
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ConfigError(f"not a readable PNG or JPEG ({_one_line(e)}); give {ACCEPTED}"
                          ) from None


def _flatten(im: Image.Image) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale PNG
        return np.asarray(im, np.float32) / 65535
    if im.mode == "P" or "transparency" in im.info:  # palette or colour-key transparency
        im = im.convert("RGBA")
    if "A" in im.getbands():
        # A transparent background with a dark stroke is a drawing on (white) paper.
        gray, alpha = np.moveaxis(np.asarray(im.convert("LA"), np.float32) / 255, -1, 0)
        return gray * alpha + (1 - alpha)
    return np.asarray(im.convert("L"), np.float32) / 255


# --- MNIST's normalisation ----------------------------------------------------------------------

def _check_invert(invert: str) -> None:
    if invert not in INVERT_CHOICES:
        raise ConfigError(f"invert={invert!r}; choose one of {', '.join(INVERT_CHOICES)}")


def _paper(gray: np.ndarray) -> float:
    """The paper's grey level: the median of the outermost pixels, which are paper unless the
    stroke covers half the border (a bold digit cut tight covers more than half the image, so
    the median of all pixels would be the ink's)."""
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    return float(np.median(border))


def _convert(gray: np.ndarray, invert: Invert) -> tuple[np.ndarray, bool]:
    """(H, W) float32 gray in [0, 1] -> ((28, 28) float32 white on black, inverted)."""
    lo, hi = float(gray.min()), float(gray.max())
    if hi - lo < MIN_CONTRAST:
        raise ConfigError(f"the image is blank (contrast {hi - lo:.3f}); give an image of a "
                          "digit, dark on light or light on dark")
    paper = _paper(gray)
    # Light paper: above the image's mid-range, not above 0.5, so that grey paper in dim light
    # (0.45) under pencil (0.1) is light, and a grey board (0.3) under chalk (0.8) is dark.
    inverted = invert == "yes" or (invert == "auto" and paper > (lo + hi) / 2)
    if inverted:
        gray, paper, lo, hi = 1 - gray, 1 - paper, 1 - hi, 1 - lo
    # The paper is no ink, and its noise about that level is cleared below. Where the border is
    # not paper (a polarity forced against it, or a stroke along half the border) the darkest
    # pixel is no ink instead.
    zero = paper if paper <= (lo + hi) / 2 else lo
    ink = np.clip((gray - zero) / (hi - zero), 0.0, 1.0)  # the digit from 0 to 1
    ink[ink < NOISE] = 0.0
    strong = ink > INK
    rows, cols = np.flatnonzero(strong.any(1)), np.flatnonzero(strong.any(0))
    box = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    h, w = box.shape
    scale = BOX / max(h, w)
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    # Pillow's filters widen with the reduction (area-aware), so a large drawing is anti-aliased.
    digit = np.asarray(Image.fromarray(box).resize((w, h), RESAMPLE), np.float64).clip(0.0, None)
    digit /= digit.max()  # the strongest pixel is 1, as in MNIST's (254 or 255 of 255)

    ys, xs = np.indices(digit.shape)
    mass = digit.sum()
    cy, cx = (ys * digit).sum() / mass, (xs * digit).sum() / mass
    # Whole-pixel shifts that put the centre of mass in [13.5, 14.5), MNIST's, unless the box
    # would leave the field (a digit whose mass sits at one end of its box).
    top = int(np.clip(np.ceil(CENTRE - 0.5 - cy), 0, SIZE - h))
    left = int(np.clip(np.ceil(CENTRE - 0.5 - cx), 0, SIZE - w))
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top:top + h, left:left + w] = digit
    return out, inverted


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
