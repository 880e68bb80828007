"""The `openai` SDK against an OpenAI-compatible server: a text chat, an image chat (a data: URL), streamed too.

Run by scripts/compat.sh in a throwaway venv that has only `openai`; exits 1 on an empty answer.
Usage: python scripts/compat_client.py BASE_URL MODEL
"""

from __future__ import annotations

import base64
import struct
import sys
import zlib

from openai import OpenAI


def red_circle_png(size: int = 96) -> bytes:
    """A red disc on white, written as a PNG without an imaging library."""
    rows = b""
    for y in range(size):
        row = bytearray(b"\0")  # filter byte: none
        for x in range(size):
            inside = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2
            row += bytes((220, 30, 30) if inside else (255, 255, 255))
        rows += bytes(row)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def main(base_url: str, model: str) -> int:
    client = OpenAI(base_url=base_url, api_key="EMPTY")
    text = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe the image."}], max_tokens=32, temperature=0
    )
    url = "data:image/png;base64," + base64.b64encode(red_circle_png()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour is the shape?"}]
    image = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=32, temperature=0
    )
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=32, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    answers = {
        "text chat": text.choices[0].message.content,
        "image chat": image.choices[0].message.content,
        "image chat, streamed": streamed,
    }
    for name, answer in answers.items():
        print(f"{name}: {answer!r}")
    print(f"image chat usage: {image.usage}")
    return 0 if all(a and a.strip() for a in answers.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
