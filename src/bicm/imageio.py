"""Reading images the way a user expects, whatever file they pass.

Every image that enters bicm goes through :func:`load_image` and comes out as an 8-bit
RGB :class:`PIL.Image.Image`. Boxes are always in the pixel coordinates of that image
(float ``xyxy``, origin at the top-left corner, ``x2``/``y2`` exclusive pixel edges).

* EXIF orientation is applied by default, so boxes land on the image as a viewer shows it.
  Dataset evaluation passes ``exif_transpose=False`` because annotations are made on the
  stored pixels.
* Transparent images (RGBA, LA, P with transparency) are composited over white.
* 16-bit and 32-bit grayscale (``I;16``, ``I``, ``F``) are rescaled to 8 bits instead of
  being clipped to white.
* Huge images are refused before decoding (above :data:`DEFAULT_MAX_PIXELS` by default).
* Unreadable, corrupt or truncated files raise :class:`~bicm.errors.BicmError` with one line.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BicmError, warn
from .safeload import regular_file

__all__ = ["load_image", "to_rgb", "image_digest", "DEFAULT_MAX_PIXELS", "ImageSource"]

#: Hard cap: larger images are refused before decoding (decompression-bomb guard). Twice
#: Pillow's warning threshold (about 179 megapixels, where Pillow itself refuses), so a
#: 100-megapixel photo loads (about 300 MB decoded) and is then downscaled to the working size
#: (:attr:`bicm.api.BiCMConfig.max_pixels`).
DEFAULT_MAX_PIXELS: int = 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)

#: Smallest side (pixels) below which a warning says the result will mean little.
TINY_SIDE = 16

ImageSource = Union[str, Path, Image.Image]

_open_lock = threading.Lock()


def load_image(
    source: ImageSource,
    *,
    exif_transpose: bool = True,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load an image file (or take a PIL image) and return it as 8-bit RGB.

    Parameters
    ----------
    source:
        A path, or an already opened :class:`PIL.Image.Image` (taken as it is: only
        converted to RGB, without EXIF turn or size guard).
    exif_transpose:
        Apply the EXIF orientation tag (what image viewers show).
    max_pixels:
        Refuse images with more pixels than this (``None``: no limit).

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, fully decoded.

    Raises
    ------
    BicmError
        Missing, unreadable, corrupt, truncated or too large image.
    """
    if isinstance(source, Image.Image):
        # Already opened by the caller: taken as it is (no EXIF turn, no size guard).
        try:
            source.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise BicmError(f"image is truncated or corrupt ({_short(exc)})") from None
        return to_rgb(source)
    path = Path(source)
    name = str(path)
    regular_file(path, "image", missing=f"image not found: {name}")
    image = _open(path, max_pixels)
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise BicmError(
            f"image {name} has {image.width}x{image.height} = {image.width * image.height:,} pixels, "
            f"more than the limit of {max_pixels:,} (decompression-bomb guard); "
            "raise it with --max-image-pixels if the file is trusted"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise BicmError(f"image {name} is truncated or corrupt ({_short(exc)})") from None
    if exif_transpose:
        try:
            ImageOps.exif_transpose(image, in_place=True)  # no copy of an image without an orientation tag
        except Exception as exc:  # malformed EXIF must not stop the work
            warn(f"ignoring unreadable EXIF orientation of {name} ({_short(exc)})")
    rgb = to_rgb(image)
    if min(rgb.size) < TINY_SIDE:
        warn(f"image {name} is only {rgb.width}x{rgb.height} pixels; CLIP will upsample it heavily")
    return rgb


def image_digest(image: Image.Image) -> str:
    """Hash of the decoded pixels (and size and mode): an image's identity in caches."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=12)
    digest.update(f"{image.size}{image.mode}".encode())
    return digest.hexdigest()


def _open(path: Path, max_pixels: Optional[int]) -> Image.Image:
    # Pillow's own guard warns above MAX_IMAGE_PIXELS and fails above twice that; we apply
    # one limit of our own (checked from the header, before decoding), so switch Pillow's off.
    with _open_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(path)
        except UnidentifiedImageError:
            raise BicmError(f"cannot read image {path}: not an image file, or a format Pillow does not know") from None
        except OSError as exc:
            raise BicmError(f"cannot read image {path} ({_short(exc)})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited over ``background``)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_gray_to_rgb(image)
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = array / 65535.0 * 255.0
    else:
        lo, hi = float(array.min()), float(array.max())
        if lo >= 0 and hi <= 255:
            scaled = array
        elif lo >= 0 and hi <= 65535:
            scaled = array / 65535.0 * 255.0
        else:
            scaled = (array - lo) / max(hi - lo, 1e-12) * 255.0
    gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
