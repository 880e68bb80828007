"""`llava-serve train-default`: read the flags (train_config.py, no torch), then train (train.py)."""

from __future__ import annotations

from llava_serve.default_model.train_config import parse_args


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    from llava_serve.default_model.train import train

    train(config)
