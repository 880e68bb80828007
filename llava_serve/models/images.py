"""Safe image input: bounded base64 decoding, decompression-bomb guard, RGB conversion.

Cost is bounded before decoding (bytes, pixels, sides, aspect ratio, the request's pixel budget: all
read from the headers) and after it: an image is shrunk to `prep_side` before the processor sees it,
so a processor that pads to a square or tiles never builds more than prep_side² pixels (a 1x16384
PNG padded to 16384x16384 cost 3.3 GB and 21 s).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from llava_serve.errors import ImageError, ImageTooLarge

# data:image/png;base64, and with parameters (data:image/png;name=a.png;base64,), as the API takes them
_DATA_URL = re.compile(r"^data:image/[\w.+-]+(?:;[\w.+-]+=[^;,]*)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16_384
    max_count: int = 8
    max_aspect_ratio: float = 32.0  # longer side / shorter side
    max_request_pixels: int = 100_000_000  # all images of one request together
    prep_side: int = 2048  # longer side an image is shrunk to before the processor


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    sha256: str


def decode_request_images(data: list[str], limits: ImageLimits) -> list[DecodedImage]:
    """Every image of one request: all headers checked (and the pixel budget) before any is decoded."""
    raws = [base64_bytes(d, limits, i) for i, d in enumerate(data)]
    opened = [open_image(raw, limits, i) for i, raw in enumerate(raws)]
    total = sum(img.size[0] * img.size[1] for img in opened)
    if total > limits.max_request_pixels:
        raise ImageTooLarge(
            f"the images of this request have {total} pixels together; the limit is {limits.max_request_pixels}"
        )
    decoded = []
    for i, raw in enumerate(raws):
        img, opened[i] = opened[i], None  # type: ignore[call-overload]  # each full-size image freed in turn
        decoded.append(load_image(img, raw, limits, i))
    return decoded


def decode_base64_image(data: str, limits: ImageLimits, index: int = 0) -> DecodedImage:
    """Decode one base64 (or data: URL) image, refusing oversize input before decompressing it."""
    return decode_image_bytes(base64_bytes(data, limits, index), limits, index)


def base64_bytes(data: str, limits: ImageLimits, index: int = 0) -> bytes:
    """The bytes of base64 text (line-wrapped or not) or of a base64 data: URL, size-checked first."""
    if not isinstance(data, str):
        raise ImageError(f"image {index}: expected a base64 string, got {type(data).__name__}")
    payload = _DATA_URL.sub("", data.strip(), count=1)
    if len(payload) * 3 // 4 > limits.max_bytes * 1.05 + 64:  # room for line breaks; exact check below
        raise ImageTooLarge(f"image {index}: more than {limits.max_bytes} bytes; send a smaller image")
    try:
        raw = base64.b64decode(_WHITESPACE.sub("", payload), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image {index}: not valid base64 ({exc})") from None
    return raw


def decode_image_bytes(raw: bytes, limits: ImageLimits, index: int = 0) -> DecodedImage:
    return load_image(open_image(raw, limits, index), raw, limits, index)


def open_image(raw: bytes, limits: ImageLimits, index: int = 0) -> Image.Image:
    """The image's header, its size checked against the limits; no pixel is decoded yet."""
    if len(raw) > limits.max_bytes:
        raise ImageTooLarge(f"image {index}: {len(raw)} bytes, limit {limits.max_bytes}")
    if not raw:
        raise ImageError(f"image {index}: empty image data")
    try:
        img = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"image {index}: not a decodable image ({type(exc).__name__})") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"image {index}: too many pixels to decode safely (decompression-bomb guard); downscale it"
        ) from None
    _check_size(img.size, limits, index)
    return img


def load_image(img: Image.Image, raw: bytes, limits: ImageLimits, index: int = 0) -> DecodedImage:
    """Decode, shrink to `prep_side` at once (before the RGB copy), convert to RGB."""
    try:
        img.draft("RGB", (limits.prep_side, limits.prep_side))  # JPEG: decode at a reduced scale
        img.load()
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"image {index}: too many pixels to decode safely (decompression-bomb guard); downscale it"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image {index}: truncated or corrupt image data ({exc})") from None
    return DecodedImage(image=shrink(img, limits.prep_side), sha256=hashlib.sha256(raw).hexdigest())


def shrink(img: Image.Image, side: int) -> Image.Image:
    """`img` in RGB with its longer side at most `side` (a box filter, by a whole factor). Done strip
    by strip, so no second full-size copy is made (Pillow's resize and RGB conversion would make
    several: a 6000x6000 RGBA PNG then cost 550 MiB of peak memory instead of about 150)."""
    factor = -(-max(img.size) // side)
    if factor < 2:
        return to_rgb(img)
    w, h = (img.size[0] // factor) * factor, (img.size[1] // factor) * factor
    out = Image.new("RGB", (w // factor, h // factor))
    rows = factor * 64
    for top in range(0, h, rows):
        strip = to_rgb(img.crop((0, top, w, min(top + rows, h))))
        out.paste(strip.reduce(factor), (0, top // factor))
    return out


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)


def _check_size(size: tuple[int, int], limits: ImageLimits, index: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"image {index}: has no pixels ({w}x{h})")
    if w > limits.max_side or h > limits.max_side or w * h > limits.max_pixels:
        raise ImageTooLarge(
            f"image {index}: {w}x{h} pixels exceeds the limit "
            f"({limits.max_pixels} pixels, {limits.max_side} per side); downscale it first"
        )
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise ImageTooLarge(
            f"image {index}: {w}x{h} is too elongated (aspect ratio over {limits.max_aspect_ratio:g}:1); "
            "crop or pad it first"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (what a viewer shows)."""
    if img.mode == "RGB":
        return img
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    return img.convert("RGB")


def encode_image_base64(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()
