"""The `llava-serve` command: one entry point, each subcommand owned by its module."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "controller": (
        "llava_serve.controller.__main__",
        "the controller: worker registry, dispatch, stream proxy",
    ),
    "worker": ("llava_serve.model_worker", "a model worker: loads a model, serves generation"),
    "api": ("llava_serve.openai_api.__main__", "the OpenAI-compatible API, routed through the controller"),
    "web": ("llava_serve.web.__main__", "the Gradio web demo"),
    "up": ("llava_serve.up", "the whole stack on one machine, default model included"),
    "ray": ("llava_serve.ray.cli", "on Ray Serve: the same APIs, replicas placed, restarted and autoscaled (ray up)"),
    "chat": ("llava_serve.chat", "chat with a model in the terminal"),
    "generate": ("llava_serve.generate", "one generation from the command line"),
    "bench": ("llava_serve.tools.bench", "throughput/latency benchmark of the engines"),
    "soak": ("llava_serve.tools.soak", "the whole stack under steady mixed load for N minutes: does anything grow?"),
    "build-model": ("llava_serve.tools.checkpoints.build", "build small random-weight checkpoints offline"),
    "eval": ("llava_serve.default_model.eval", "evaluate the default model through a served worker"),
    "train-default": ("llava_serve.default_model.train_cli", "train the bundled default model"),
}


def usage() -> str:
    lines = ["usage: llava-serve <command> [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'llava-serve <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"llava-serve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
