"""The demo serves only files uploaded to it: a client that names a server file as its "upload"
gets an error and cannot read the file back (issue 13, item 1). Uploads live in a private folder."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from llava_serve.web.app import create_app
from llava_serve.web.config import WebConfig
from llava_serve.web.uploads import is_upload, private_uploads
from tests.web.conftest import draw_circle


def _ask(client: TestClient, app: Any, image: dict[str, Any], session: str) -> dict[str, Any]:
    """Run the demo's add_question event through Gradio's queue, as the browser does."""
    fns = app.state.demo.fns
    fn = next(i for i, d in fns.items() if getattr(d.fn, "__name__", "") == "add_question")
    body = {"data": [None, "hi", image], "fn_index": fn, "session_hash": session, "event_data": None}
    assert client.post("/gradio_api/queue/join", json=body).status_code == 200
    with client.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as events:
        for line in events.iter_lines():
            if '"process_completed"' in line:
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("no process_completed event")


def _served_paths(event: dict[str, Any]) -> list[str]:
    text = json.dumps(event)
    return [p for p in text.split('"') if p.endswith(".png") and p.startswith("/")]


@pytest.fixture
def uploads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


def test_a_server_file_named_as_an_upload_is_refused_and_not_served(uploads: Path, tmp_path: Path) -> None:
    secret = draw_circle(tmp_path / "server_secret.png", (1, 2, 3))
    app = create_app(WebConfig())
    with TestClient(app) as client:
        event = _ask(client, app, {"path": str(secret), "meta": {"_type": "gradio.FileData"}}, "attacker")
        assert event["success"] is False and "not uploaded by a user" in event["output"]["error"]
        assert _served_paths(event) == []
        assert client.get(f"/gradio_api/file={secret}").status_code == 403
        copies = [p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else []
        assert copies == []  # nothing was copied into the cache either


def test_a_real_upload_goes_through_and_is_served_back(uploads: Path, tmp_path: Path) -> None:
    picture = draw_circle(tmp_path / "mine.png", (200, 10, 10)).read_bytes()
    app = create_app(WebConfig())
    with TestClient(app) as client:
        answer = client.post("/gradio_api/upload", files={"files": ("mine.png", picture, "image/png")})
        assert answer.status_code == 200
        (path,) = answer.json()
        assert is_upload(path) and not is_upload(str(tmp_path / "mine.png"))
        event = _ask(client, app, {"path": path, "meta": {"_type": "gradio.FileData"}}, "user")
        assert event["success"] is True
        (shown,) = set(_served_paths(event))
        assert client.get(f"/gradio_api/file={shown}").content == picture


def test_the_handler_refuses_a_path_outside_the_upload_folder(uploads: Path, tmp_path: Path) -> None:
    from llava_serve.web.conversation import Conversation

    app = create_app(WebConfig())
    conv = Conversation()
    handlers = next(d.fn for d in app.state.demo.fns.values() if getattr(d.fn, "__name__", "") == "add_question")
    outside = draw_circle(tmp_path / "x.png", (0, 0, 0))
    conv, shown, _, _ = handlers(conv, "hi", str(outside))
    assert conv.turns == [] and shown == []


def test_private_upload_folder_is_owner_only_and_removed_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    with private_uploads(WebConfig()) as folder:
        assert os.environ["GRADIO_TEMP_DIR"] == str(folder)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        (folder / "left.png").write_bytes(b"x")
    assert not folder.exists() and "GRADIO_TEMP_DIR" not in os.environ


def test_uploads_are_deleted_after_their_max_age() -> None:
    app = create_app(WebConfig(upload_max_age=120))
    assert app.state.demo.delete_cache == (12, 120)


def test_a_demo_stopped_by_sigterm_removes_its_upload_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn re-raises SIGTERM after its shutdown; with the default handler the process died there
    and left the folder (with users' pictures) behind."""
    from tests.procs import free_port, start_service

    port = free_port()
    argv = ["llava_serve.web", "--port", str(port), "--controller-url", "http://127.0.0.1:1"]
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    with start_service(argv, port, ready_path="/", env={"TMPDIR": str(tmp_path)}) as web:
        assert len(list(tmp_path.glob("llava-serve-web-*"))) == 1
    assert web.popen.returncode == 128 + 15
    assert list(tmp_path.glob("llava-serve-web-*")) == []
