"""What running the OpenAI API in the controller's process would give: TTFT through it vs the worker.

    python benchmarks/colocated_api.py [--rounds 40] [--worker-threads 1]

An experiment, not a deployment mode: one process serves the controller app and the API app (two
uvicorn servers on one event loop); the API reaches the controller through an in-process `Cluster`
(the protocol the Ray ingress implements too) that calls the controller's dispatcher and stream proxy
directly, so a request makes one HTTP hop fewer. A worker on the bundled model registers with it; the
same chat as benchmarks/api_overhead.py alternates between the worker, the controller and the API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from api_overhead import alternate, free_port, three_paths

from llava_serve.up import start, stop_all, wait_ready


class RelayStream:
    """The controller's relay of one worker stream, as the frames an API `Cluster` returns."""

    def __init__(self, frames: AsyncIterator[bytes], upstream: httpx.Response) -> None:
        self.frames, self.upstream = frames, upstream

    async def __aiter__(self) -> AsyncIterator[Any]:
        from llava_serve.errors import error_from_frame
        from llava_serve.protocol.frames import decode_frame

        try:
            async for raw in self.frames:
                frame = decode_frame(raw)
                if frame.error_code:
                    raise error_from_frame(frame)
                yield frame
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        from llava_serve.common.aio import aclose_shielded

        await self.frames.aclose()  # type: ignore[attr-defined]
        await aclose_shielded(self.upstream)


class InProcessCluster:
    def __init__(self, controller_app: Any) -> None:
        self.state = controller_app.state.controller

    async def list_models(self) -> list[str]:
        return list(self.state.registry.model_names())

    async def _open(self, route: str, body: dict[str, Any], model: str) -> RelayStream:
        from llava_serve.cluster.client import error_from_response
        from llava_serve.common.aio import aclose_shielded

        worker, upstream = await self.state.proxy.open(model, route, json.dumps(body).encode())
        if upstream.status_code != 200:
            content = await upstream.aread()
            await aclose_shielded(upstream)
            raise error_from_response(upstream.status_code, content, upstream.headers)
        return RelayStream(self.state.proxy.relay(worker, upstream), upstream)

    async def chat(self, request: Any, *, whole: bool = False) -> RelayStream:
        from llava_serve.cluster.client import CHAT_STREAM

        return await self._open(CHAT_STREAM, request.model_dump(exclude_unset=True), request.model)

    async def generate(self, request: Any, model: str, *, whole: bool = False) -> RelayStream:
        from llava_serve.cluster.client import GENERATE_STREAM

        return await self._open(GENERATE_STREAM, {**request.model_dump(exclude_none=True), "model": model}, model)

    async def aclose(self) -> None:
        return None


async def serve_front(controller_port: int, api_port: int) -> None:
    import uvicorn

    from llava_serve.controller.app import create_app as controller_app
    from llava_serve.controller.config import build_parser as controller_flags
    from llava_serve.controller.config import config_from_args as controller_config
    from llava_serve.openai_api.app import create_app as api_app
    from llava_serve.openai_api.config import build_parser as api_flags
    from llava_serve.openai_api.config import config_from_args as api_config

    ctrl = controller_app(controller_config(controller_flags().parse_args(["--port", str(controller_port)])))
    address = f"http://127.0.0.1:{controller_port}"
    api = api_app(
        api_config(api_flags().parse_args(["--port", str(api_port), "--controller-address", address])),
        cluster=InProcessCluster(ctrl),  # type: ignore[arg-type]
    )
    servers = [
        uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio"))
        for app, port in ((ctrl, controller_port), (api, api_port))
    ]
    await asyncio.gather(*(s.serve() for s in servers))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--worker-threads", type=int, default=1)
    p.add_argument("--serve-front", nargs=2, type=int, help=argparse.SUPPRESS)  # the front process itself
    args = p.parse_args()
    if args.serve_front:
        asyncio.run(serve_front(*args.serve_front))
        return
    cport, aport, wport = free_port(), free_port(), free_port()
    url = {
        "worker": f"http://127.0.0.1:{wport}",
        "controller": f"http://127.0.0.1:{cport}",
        "api": f"http://127.0.0.1:{aport}",
    }
    front = subprocess.Popen([sys.executable, __file__, "--serve-front", str(cport), str(aport)])
    with tempfile.TemporaryDirectory(prefix="llava-serve-bench-") as tmp:
        argv = ["llava_serve.model_worker", "--host", "127.0.0.1", "--port", str(wport),
                "--worker-address", url["worker"], "--controller-address", url["controller"],
                "--threads", str(args.worker_threads)]  # fmt: skip
        worker = start("worker", argv, wport, "/ready", "127.0.0.1", Path(tmp))
        try:
            wait_ready(worker, 180)
            with httpx.Client(timeout=60) as http:
                times = alternate(three_paths(http, url, "through the co-located API"), args.rounds)
        finally:
            front.kill()
            stop_all([worker])
    direct = statistics.median(times["worker direct"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} TTFT median {median * 1000:6.2f} ms  {median / direct:.3f}x")


if __name__ == "__main__":
    main()
