"""The benchmark's requests: one prompt and one freshly drawn image per client.

Every (round, client) pair gets its own picture, so no engine is helped by a feature cache hit
from an earlier round; the same function builds them for the workers and for the static batch.
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SYSTEM = "A chat between a curious human and an artificial intelligence assistant."
QUESTIONS = [
    "What colour is the shape in this picture?",
    "Describe the image in detail.",
    "How many shapes are there, and where are they?",
    "Is the shape on the left or on the right?",
    "What is the background colour?",
    "Describe the picture for someone who cannot see it, please.",
    "Which shape is this: a circle, a square or a triangle?",
    "What is in the top left corner of the image?",
]
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
RGB = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (250, 140, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    image_png: bytes
    question: str = ""  # the user's text alone, for peers that build the prompt from chat messages

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.image_png)).convert("RGB")

    def body(self, max_new_tokens: int) -> dict:
        """The JSON body of POST /worker_generate_stream."""
        return {
            "prompt": self.prompt,
            "images": [base64.b64encode(self.image_png).decode()],
            "temperature": 0.0,
            "max_new_tokens": max_new_tokens,
            "ignore_eos": True,
            "echo": False,
        }


def draw_image(rng: random.Random, width: int = 160, height: int = 120) -> Image.Image:
    background, fill = rng.sample(COLOURS, 2)
    img = Image.new("RGB", (width, height), RGB[background])
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 3)):
        size = rng.randint(20, 50)
        x, y = rng.randint(0, width - size), rng.randint(0, height - size)
        box = (x, y, x + size, y + size)
        shape = rng.choice(["circle", "square", "triangle"])
        colour = RGB[fill]
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x, y + size), (x + size // 2, y), (x + size, y + size)], fill=colour)
        fill = rng.choice(COLOURS)
    # a few pixels of noise: no two requests share an image (and so a vision cache entry)
    for _ in range(16):
        draw.point((rng.randrange(width), rng.randrange(height)), fill=(rng.randrange(256),) * 3)
    return img


def make_requests(n: int, round_id: int = 0) -> list[BenchRequest]:
    """n clients' requests for one round; deterministic in (n, round_id)."""
    requests = []
    for i in range(n):
        rng = random.Random(f"{round_id}/{n}/{i}")
        buf = io.BytesIO()
        draw_image(rng).save(buf, format="PNG")
        question = QUESTIONS[i % len(QUESTIONS)]
        prompt = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
        requests.append(BenchRequest(prompt, buf.getvalue(), question))
    return requests
