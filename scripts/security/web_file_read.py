"""Issue 13, attack 1: a client names a file on the server as its "upload" and reads it back.

    python scripts/security/web_file_read.py
Prints what the demo answered and whether /gradio_api/file= served the file (before the fix: 200 and
the file's bytes; after: the event fails with "not uploaded by a user", nothing is served)."""

import json
import os
import tempfile
from pathlib import Path

from PIL import Image
from starlette.testclient import TestClient

from llava_serve.web import WebConfig, create_app

work = Path(tempfile.mkdtemp())
os.environ.setdefault("GRADIO_TEMP_DIR", str(work / "uploads"))
secret = work / "server_secret.png"
Image.new("RGB", (8, 8), "blue").save(secret)
app = create_app(WebConfig())
fn = next(i for i, d in app.state.demo.fns.items() if getattr(d.fn, "__name__", "") == "add_question")
with TestClient(app) as c:
    data = [None, "hi", {"path": str(secret), "meta": {"_type": "gradio.FileData"}}]
    c.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": "s1", "event_data": None})
    with c.stream("GET", "/gradio_api/queue/data?session_hash=s1") as events:
        done = next(line for line in events.iter_lines() if "process_completed" in line)
    event = json.loads(done.removeprefix("data: "))
    print("event success:", event["success"], "|", str(event["output"].get("error", ""))[:120])
    paths = {p for p in json.dumps(event).split('"') if p.endswith(".png") and p.startswith("/")}
    for p in paths | {str(secret)}:
        r = c.get("/gradio_api/file=" + p)
        print(f"GET /gradio_api/file={p}: {r.status_code}, the server's file: {r.content == secret.read_bytes()}")
