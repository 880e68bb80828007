"""Image cost bounded before decoding and before the processor (issue 13, item 3), and the base64
forms the API takes (line-wrapped, data: URLs with parameters)."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from llava_serve.errors import ImageError, ImageTooLarge
from llava_serve.models.images import ImageLimits, base64_bytes, decode_request_images
from tests.reliability.test_hostile_input import png


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_a_thin_png_is_refused_from_its_header() -> None:
    """1x16384: under the pixel limit, but a processor that pads to a square made it 16384x16384
    (3.3 GB, 21 s). Refused by its aspect ratio, before any pixel is decoded."""
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="too elongated"):
        decode_request_images([b64(png(1, 16384))], ImageLimits())
    assert time.perf_counter() - started < 0.5
    assert decode_request_images([b64(png(32, 1024))], ImageLimits())[0].image.size == (32, 1024)  # 32:1 is fine


def test_the_request_pixel_budget_is_checked_before_any_image_is_decoded() -> None:
    # Cut short: decoding any of them fails as truncated, so a budget error proves that nothing was
    # decoded first.
    whole = png(4000, 4000, rows=64)
    images = [b64(whole[: len(whole) // 2])] * 3
    with pytest.raises(ImageTooLarge, match="48000000 pixels together"):
        decode_request_images(images, ImageLimits(max_request_pixels=40_000_000))
    with pytest.raises(ImageError, match="truncated"):
        decode_request_images(images[:2], ImageLimits(max_request_pixels=40_000_000))


def test_a_large_image_reaches_the_processor_shrunk() -> None:
    (decoded,) = decode_request_images([b64(png(6000, 3000))], ImageLimits(prep_side=2048))
    assert decoded.image.size == (2000, 1000) and decoded.image.mode == "RGB"  # a whole factor: 3
    (small,) = decode_request_images([b64(png(300, 200))], ImageLimits(prep_side=2048))
    assert small.image.size == (300, 200)  # smaller images are untouched


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent at fork, so under a big pytest
# process the child's figure starts at the parent's peak and a decode shows no growth at all
PEAK_SCRIPT = """
import sys
from pathlib import Path
from llava_serve.models.images import ImageLimits, decode_request_images
def hwm():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1])
raw = Path(sys.argv[2]).read_text()  # made by the test: making it here would set the high-water mark
before = hwm()
decode_request_images([raw], ImageLimits(prep_side=int(sys.argv[1])))
print((hwm() - before) / 1024)
"""


def test_peak_memory_of_a_large_image_is_bounded(tmp_path: Path) -> None:
    """6000x6000 RGBA (137 MiB decoded), in a fresh process (the peak is a high-water mark): decoding,
    shrinking and RGB conversion measured 175 MiB; without the shrink (prep_side 16384) the RGB copies
    of the full image came on top: 550 MiB (and the processor's float copies of it after that)."""
    from tests.reliability.test_hostile_input import png

    image = tmp_path / "big.b64"
    image.write_text(base64.b64encode(png(6000, 6000)).decode())
    growth = {}
    for side in (2048, 16384):
        argv = [sys.executable, "-c", PEAK_SCRIPT, str(side), str(image)]
        run = subprocess.run(argv, capture_output=True, text=True, check=True)
        growth[side] = float(run.stdout.split()[-1])
    assert growth[2048] < 250 and growth[2048] < growth[16384] / 2, growth


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda t: "\n".join(t[i : i + 76] for i in range(0, len(t), 76)),  # MIME line wrapping
        lambda t: "\r\n".join(t[i : i + 64] for i in range(0, len(t), 64)) + "\r\n",
        lambda t: "data:image/png;base64," + t,
        lambda t: "data:image/png;name=circle.png;base64," + t,
        lambda t: "DATA:image/PNG;charset=binary;base64,\n" + t,
    ],
)
def test_the_base64_forms_the_api_accepts(wrap) -> None:  # type: ignore[no-untyped-def]
    raw = _png_bytes()
    assert base64_bytes(wrap(b64(raw)), ImageLimits()) == raw


def test_bad_base64_is_still_refused() -> None:
    with pytest.raises(ImageError, match="not valid base64"):
        base64_bytes("data:image/png;base64,@@@@", ImageLimits())
    with pytest.raises(ImageTooLarge):
        base64_bytes("A" * 5000, ImageLimits(max_bytes=1000))
