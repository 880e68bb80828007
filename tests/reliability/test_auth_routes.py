"""Authentication on every route of every service, with every credential set.

The routes come from each service's own `app.routes` (built in-process from the same flags as the
live process), so a route added later is in the table without anyone remembering it. Each is
called on the live process with no credential, a wrong one and the right one. Expected: /health
open everywhere; every other route refused without the right credential (401 bearer key; 403 for
the controller's worker routes, which take X-Registration-Secret instead), and past the check with
it (whatever the route then says about an empty body).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from starlette.routing import BaseRoute, Mount

from llava_serve.common.attest import ATTEST_PATH, controller_mac
from llava_serve.controller.app import create_app as controller_app
from llava_serve.controller.config import build_parser as controller_parser
from llava_serve.controller.config import config_from_args as controller_config
from llava_serve.controller.routes import WORKER_ROUTES
from llava_serve.openai_api.app import create_app as api_app
from llava_serve.openai_api.config import build_parser as api_parser
from llava_serve.openai_api.config import config_from_args as api_config
from llava_serve.worker.app import create_app as worker_app
from llava_serve.worker.config import worker_config
from tests.reliability.conftest import KEYS
from tests.reliability.helpers import record
from tests.reliability.stack import Stack

OPEN = {"/health"}


def endpoints(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, mounted apps and included routers (FastAPI >= 0.16x keeps them
    as one `_IncludedRouter` entry) included; path parameters filled with 'x'."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from endpoints(included.routes, prefix + getattr(route.include_context, "prefix", ""))
            continue
        path = prefix + getattr(route, "path", "")
        if isinstance(route, Mount):
            yield from endpoints(route.routes, path.rstrip("/"))
            continue
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                yield method, _filled(path)


def _filled(path: str) -> str:
    parts = [("x" if p.startswith("{") else p) for p in path.split("/")]
    return "/".join(parts) or "/"


def service_routes(stack: Stack, name: str) -> list[tuple[str, str]]:
    """The routes of the app the live process `name` runs, built from the same flags."""
    argv = stack.argv(name)[1:]
    if name == "controller":
        app = controller_app(controller_config(controller_parser().parse_args(argv)))
    elif name == "api":
        app = api_app(api_config(api_parser().parse_args(argv)))
    else:
        engine = SimpleNamespace(stats=lambda: None)
        app = worker_app(worker_config(argv), SimpleNamespace(tokenizer=None), engine)  # type: ignore[arg-type]
        app.state.service.close()
    found = sorted(set(endpoints(app.routes)))
    documented = {(m.upper(), _filled(p)) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert documented <= set(found), documented - set(found)  # the enumeration misses nothing
    return [*found, ("GET", "/no/such/route")]


def attest_body(who: str) -> dict[str, str]:
    """A worker's status check: the credential is the controller's MAC of the challenge."""
    challenge = "c" * 32
    macs = {"none": "", "wrong": controller_mac("guess", challenge), "right": controller_mac(KEYS["secret"], challenge)}
    return {"challenge": challenge, "controller_mac": macs[who]}


def credentials(stack: Stack, name: str, path: str) -> dict[str, dict[str, str]]:
    """Headers for: none, wrong, right (the right one for this route)."""
    if name == "controller" and path in WORKER_ROUTES:
        return {"none": {}, "wrong": {"x-registration-secret": "guess"},
                "right": {"x-registration-secret": KEYS["secret"]}}  # fmt: skip
    return {"none": {}, "wrong": {"authorization": "Bearer wrong"}, "right": stack.headers(name)}


@pytest.mark.parametrize("name", ["w0", "controller", "api"])
def test_every_route_needs_its_credential(stack: Stack, name: str) -> None:
    table = []
    for method, path in service_routes(stack, name):
        statuses = {}
        for who, headers in credentials(stack, name, path).items():
            body = {"json": attest_body(who) if path == ATTEST_PATH else {}} if method == "POST" else {}
            resp = httpx.request(method, stack.url(name) + path, headers=headers, timeout=30, **body)
            statuses[who] = resp.status_code
        table.append({"route": f"{method} {path}", **statuses})
        # the controller's worker routes and a worker's status check take the registration secret
        refused = 403 if path in WORKER_ROUTES | {ATTEST_PATH} else 401
        if path in OPEN:
            assert statuses == {"none": 200, "wrong": 200, "right": 200}, (path, statuses)
        else:
            assert statuses["none"] == statuses["wrong"] == refused, (path, statuses)
            assert statuses["right"] not in (401, 403) and statuses["right"] < 500, (path, statuses)
    record("auth", service=name, routes=table)


def test_a_credential_of_one_kind_does_not_open_the_other(stack: Stack) -> None:
    """The controller: a client key is not the registration secret, and the reverse; the API's
    key opens neither the controller nor the worker."""
    ctrl = stack.url("controller")
    secret = {"x-registration-secret": KEYS["secret"]}
    body = {"worker_name": "http://127.0.0.1:9", "check_heart_beat": False}
    assert httpx.post(ctrl + "/register_worker", json=body, headers=stack.headers("controller")).status_code == 403
    assert httpx.post(ctrl + "/list_models", headers=secret).status_code == 401
    api_key = stack.headers("api")
    assert httpx.post(ctrl + "/list_models", headers=api_key).status_code == 401
    assert httpx.post(stack.url("w0") + "/worker_get_status", headers=api_key).status_code == 401


def test_web_demo_routes(tiny_llava, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The web demo: open by default (its calls to the controller carry --controller-api-key); with
    --auth-file every route but /health needs a login (Gradio's auth: a session cookie)."""
    from starlette.testclient import TestClient

    from llava_serve.web.app import create_app as web_app
    from llava_serve.web.config import config_from_args as web_config

    app = web_app(web_config(["--controller-api-key", KEYS["controller_key"]]))
    routes = sorted(set(endpoints(app.routes)))
    with TestClient(app) as client:
        page, health, info = client.get("/"), client.get("/health"), client.get("/gradio_api/info")
    assert health.status_code == 200 and page.status_code == 200 and info.status_code == 200
    assert len(routes) > 10  # Gradio's own routes are listed too
    users = tmp_path / "users.txt"
    users.write_text("alice:s3cret\n")
    with TestClient(web_app(web_config(["--auth-file", str(users)]))) as client:
        locked = {p: client.get(p).status_code for p in ("/config", "/gradio_api/info")}
        wrong = client.post("/login", data={"username": "alice", "password": "nope"}).status_code
        right = client.post("/login", data={"username": "alice", "password": "s3cret"}).status_code
        opened = {p: client.get(p).status_code for p in ("/config", "/gradio_api/info")}
    outcomes = {"no login": locked, "wrong password": wrong, "right password": right, "after login": opened}
    record("auth_web", routes=[f"{m} {p}" for m, p in routes], open_without_auth_file=info.status_code,
           with_auth_file=outcomes)  # fmt: skip
    assert set(locked.values()) == {401} and wrong == 400 and right == 200 and set(opened.values()) == {200}
