"""`llava-serve ray <command>`: Ray Serve commands (ray is imported only when one runs)."""

from __future__ import annotations

import argparse

from llava_serve.ray import up


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="llava-serve ray",
        description="llava-serve on Ray Serve: the same APIs, replicas placed, restarted and autoscaled "
        "by Serve (pip install -e .[ray]; docs/scale-out.md)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    sub.add_parser("up", help="start a local Ray (or join --address), deploy the app, Ctrl-C stops it", add_help=False)
    ns, rest = p.parse_known_args(argv)
    if ns.command == "up":
        return up.main(rest)
    p.error(f"unknown command {ns.command!r}")
    return 2
