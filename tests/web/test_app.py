"""The app and CLI: built by create_app/create_demo with no globals, flags validated."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from llava_serve.web.__main__ import main
from llava_serve.web.app import create_app
from llava_serve.web.config import WebConfig, config_from_args
from llava_serve.web.demo import create_demo


def test_cli_flags_map_to_config() -> None:
    config = config_from_args(
        [
            "--controller-url",
            "http://ctrl:21001/",
            "--controller-api-key",
            "k",
            "--host",
            "0.0.0.0",
            "--port",
            "7861",
            "--concurrency-count",
            "4",
            "--model-list-mode",
            "reload",
        ]
    )
    assert config == WebConfig(
        controller_url="http://ctrl:21001",
        controller_api_key="k",
        host="0.0.0.0",
        port=7861,
        concurrency_count=4,
        model_list_mode="reload",
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--controller-url", "localhost:21001"],
        ["--port", "0"],
        ["--concurrency-count", "0"],
        ["--model-list-mode", "sometimes"],
    ],
)
def test_bad_flags_exit_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def test_each_app_has_its_own_demo_and_health() -> None:
    a, b = create_app(WebConfig(port=7001)), create_app(WebConfig(port=7002))
    assert a.state.demo is not b.state.demo and a.state.client is not b.state.client
    ids = {blk.elem_id for blk in create_demo(WebConfig()).blocks.values()}
    assert {"model-selector", "image-input", "chatbot", "msg-input", "stop-btn", "regenerate-btn"} <= ids

    transport = httpx.ASGITransport(app=a)

    async def get(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as http:
            return await http.get(path)

    assert asyncio.run(get("/health")).json() == {"status": "ok"}
    page = asyncio.run(get("/config"))
    assert page.status_code == 200 and "LLaVA chat" in page.text


def test_auth_file_requires_a_login_on_every_route_but_health(tmp_path) -> None:
    from starlette.testclient import TestClient

    auth = tmp_path / "users.txt"
    auth.write_text("# demo users\nalice:s3cret\n\nbob:pa:ss\n")
    app = create_app(config_from_args(["--auth-file", str(auth)]))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        for path in ("/config", "/gradio_api/info"):
            assert client.get(path).status_code == 401, path
        assert client.post("/gradio_api/queue/join", json={}).status_code == 401
        assert client.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
        assert client.post("/login", data={"username": "bob", "password": "pa:ss"}).status_code == 200
        assert client.get("/config").status_code == 200


@pytest.mark.parametrize(
    ("content", "message"),
    [("alice\n", "line 1: expected user:password"), ("# nobody\n", "no user:password lines"), (None, "No such file")],
)
def test_bad_auth_file_is_refused_at_start(tmp_path, capsys, content: str | None, message: str) -> None:
    auth = tmp_path / "users.txt"
    if content is not None:
        auth.write_text(content)
    with pytest.raises(SystemExit):
        config_from_args(["--auth-file", str(auth)])
    assert message in capsys.readouterr().err
