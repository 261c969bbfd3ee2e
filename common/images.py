"""Finding and decoding images, the same way in both stages.

``read_rgb`` is the only image decoder of the project: 8-bit RGB out of any mode PIL reads, 16-bit images
scaled to 8 bits (``convert("RGB")`` would clip them to white), and every failure a :class:`DataError` naming
the file, decompression bombs included.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"})
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def list_images(source: str | Path, root: str | Path | None = None) -> list[Path]:
    """Image files under a folder (recursive, sorted by path) or listed in a text file (one per line, '#' comments).

    Relative paths of a list file are resolved against ``root`` (default: the list file's folder).

    Raises:
        FileNotFoundError: ``source`` is neither a folder nor a file.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not source.is_file():
        raise FileNotFoundError(f"{source}: neither an image folder nor a list file")
    base = Path(root) if root else source.parent
    lines = [line.strip() for line in source.read_text().splitlines()]
    return [base / line for line in lines if line and not line.startswith("#")]


def to_rgb8(image: Image.Image) -> np.ndarray:
    """A decoded PIL image as uint8 RGB ``[H,W,3]``; 16/32-bit grey and float images are rescaled, not clipped."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            scale = 65535.0
        elif image.mode == "F":
            scale = 1.0 if values.size and values.max() <= 1.0 else 255.0
        else:  # 32-bit integers: PIL's reading of 16-bit PNGs; 8-bit data stored wide keeps its values
            scale = 65535.0 if values.size and values.max() > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def read_rgb(source: str | Path | bytes, name: str | Path | None = None) -> np.ndarray:
    """Decode an image file (a path, or its bytes with ``name`` for messages) to uint8 RGB ``[H,W,3]``.

    Raises:
        DataError: the file is missing, unreadable, truncated, or larger than PIL's decompression-bomb limit.
    """
    name = name or source if not isinstance(source, bytes) else name or "<bytes>"
    try:
        handle = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else Image.open(source)
        with handle as im:
            check_pixel_limit(im.size, name)
            return to_rgb8(im)
    except FileNotFoundError as err:
        raise DataError(f"{name}: image file is missing") from err
    except DataError:
        raise
    except Exception as err:
        raise _decode_error(name, err) from err


def check_pixel_limit(size: tuple[int, int], name: object) -> None:
    """Refuse an image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, as a DataError naming the file.

    PIL itself only refuses twice its limit and merely warns between 1x and 2x; the project treats the limit
    itself as the bound, so the same file is accepted or refused whatever path reads it.
    """
    limit = Image.MAX_IMAGE_PIXELS
    pixels = size[0] * size[1]
    if limit is not None and pixels > limit:
        raise DataError(f"{name}: image is too large to decode safely ({size[0]}x{size[1]} = {pixels} pixels, more "
                        f"than PIL's decompression-bomb limit Image.MAX_IMAGE_PIXELS={limit}); downscale the file "
                        "or leave it out")


def _decode_error(name: object, err: Exception) -> DataError:
    """The DataError of a failed decode, saying which kind of failure it was."""
    if isinstance(err, Image.DecompressionBombError):
        return DataError(f"{name}: image is too large to decode safely ({err})")
    if isinstance(err, UnidentifiedImageError):
        return DataError(f"{name}: cannot decode: unreadable image file (not an image format PIL reads)")
    if isinstance(err, _DECODE_ERRORS):
        return DataError(f"{name}: image file is unreadable or truncated ({err})")
    raise err


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` after fully decoding the file (a truncated JPEG only fails on decode).

    Raises:
        DataError: as :func:`read_rgb`.
    """
    try:
        with Image.open(path) as im:
            check_pixel_limit(im.size, path)
            im.load()
            return im.size
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file is missing") from err
    except DataError:
        raise
    except Exception as err:
        raise _decode_error(path, err) from err


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag of an image file (1 = as stored; 0 when absent or unreadable).

    Images are always used as stored; a mask drawn on the rotated view then differs in size, and the size
    error says so with this value.
    """
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 0))
    except _DECODE_ERRORS:
        return 0
