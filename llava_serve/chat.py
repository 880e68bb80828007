"""`llava-serve chat`: a terminal chat like llava.serve.cli, streaming through the batching engine.

Commands inside the chat: /image FILE (use another picture, starts a new conversation), /reset, /quit.
"""

from __future__ import annotations

import argparse
import hashlib
import queue
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from llava_serve.engine.params import SamplingParams
from llava_serve.errors import ModelLoadError, ServeError
from llava_serve.models.images import ImageLimits, decode_image_bytes
from llava_serve.worker.config import add_model_args

if TYPE_CHECKING:  # torch loads with the model, not for --help
    from llava_serve.engine.request import RequestOutput
    from llava_serve.models.base import LoadedModel


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-serve chat", description=__doc__)
    add_model_args(p)
    p.add_argument("--image", type=Path, default=None)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=256)
    return p


class ChatSession:
    """One conversation: the picture, the turns, and streaming replies from the engine."""

    def __init__(self, lm: LoadedModel, engine: Any, params: SamplingParams) -> None:
        self.lm, self.engine, self.params = lm, engine, params
        self.image: Any = None
        self.image_key = ""
        self.messages: list[dict[str, Any]] = []

    def set_image(self, path: Path) -> None:
        raw = path.read_bytes()
        self.image = decode_image_bytes(raw, ImageLimits()).image
        self.image_key = hashlib.sha256(raw).hexdigest()
        self.messages = []

    def reset(self) -> None:
        self.messages = []

    def ask(self, text: str, out: TextIO) -> str:
        from llava_serve.engine.request import Request

        first = not self.messages and self.image is not None
        content: list[dict[str, Any]] = [{"type": "image"}] if first else []
        self.messages.append({"role": "user", "content": [*content, {"type": "text", "text": text}]})
        prompt = self.lm.build_prompt(self.messages)
        images = [self.image] if self.image is not None and prompt.count("<image>") else []
        outputs: queue.Queue[RequestOutput] = queue.Queue()
        request = Request(self.lm.encode(prompt, images, [self.image_key] * len(images)), self.params, outputs.put)
        self.engine.submit(request)
        shown = ""
        try:
            while True:
                result = outputs.get()
                out.write(result.text[len(shown) :])
                out.flush()
                shown = result.text
                if result.finished:
                    break
        except KeyboardInterrupt:
            self.engine.abort(request)
        out.write("\n")
        if result.error is not None:
            raise result.error
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": shown.strip()}]})
        return shown


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.image is not None and not args.image.is_file():  # before the model loads, not after
        print(f"llava-serve chat: --image {args.image}: no such file", file=sys.stderr)
        return 2
    from llava_serve.worker.loading import config_from_model_args, load_model_and_engine

    try:
        config = config_from_model_args(args, limit_model_concurrency=1, max_queue=1)
        lm, engine = load_model_and_engine(config)
    except (ModelLoadError, ValueError) as exc:
        print(f"llava-serve chat: cannot load the model: {exc}", file=sys.stderr)
        return 2
    engine.start()
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, stop=("</s>",))
    session = ChatSession(lm, engine, params)
    try:
        if args.image:
            session.set_image(args.image)
        return repl(session)
    except (OSError, ServeError) as exc:
        print(f"llava-serve chat: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    finally:
        engine.shutdown()


def repl(session: ChatSession) -> int:
    print("Type a message; /image FILE, /reset, /quit.")
    while True:
        try:
            line = input("USER: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            name = line.removeprefix("/image").strip()
            if not name:
                print("(give a file name: /image FILE)")
                continue
            try:
                session.set_image(Path(name))
                print("(new image; conversation cleared)")
            except (OSError, ServeError) as exc:
                print(f"(cannot use that image: {getattr(exc, 'message', exc)})")
            continue
        print("ASSISTANT: ", end="", flush=True)
        try:
            session.ask(line, sys.stdout)
        except ServeError as exc:
            print(f"(error: {exc.message})")
