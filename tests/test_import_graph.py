"""The package's import graph: no cycles, and imports flow down the layers only.

Layers, lowest first: protocol/errors/common -> models -> engine -> worker/controller ->
openai_api/web/ray -> the commands (cli, up, chat, generate, model_worker) -> tools (bench, soak, the
checkpoint builders, and the default model's training and evaluation). `llava_serve.default_model`
itself (the bundled checkpoint's folder) sits with models. Every import counts, also the ones inside
functions, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llava_serve"

LAYERS = [
    {"protocol", "errors", "common", "__init__"},
    {"models"},
    {"engine"},
    {"worker", "controller", "cluster"},
    {"openai_api", "web", "ray"},
    {"cli", "up", "chat", "generate", "model_worker", "__main__", "loading"},
    {"tools", "default_model"},
]
EXACT = {"llava_serve.default_model": 1}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("llava_serve."):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py") if "_dev" not in p.parts}
    known = set(files)
    return {name: imports_of(path, name, known) for name, path in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            # a module importing its own package's __init__ is not a cycle of ours
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(name: str) -> int:
    if name in EXACT:
        return EXACT[name]
    top = name.split(".")[1] if "." in name else "__init__"
    for rank, members in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{name}: its top-level part {top!r} is in no layer; add it to LAYERS")


def test_no_import_cycles() -> None:
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()) or [])}"


def test_imports_flow_down_the_layers() -> None:
    upward = [
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, dsts in graph().items()
        for dst in dsts
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("llava_serve.tools.bench") > layer_of("llava_serve.engine.engine")


# The single-machine stack: what `llava-serve up` and its services import. Ray is an optional extra.
SINGLE_MACHINE = [
    "llava_serve.cli",
    "llava_serve.up",
    "llava_serve.worker.main",
    "llava_serve.worker.server",
    "llava_serve.controller.app",
    "llava_serve.openai_api.app",
    "llava_serve.web.app",
    "llava_serve.chat",
]


def test_only_the_ray_package_imports_ray() -> None:
    """No module outside llava_serve/ray names ray (lazy imports included)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "_dev" in path.parts or path.relative_to(PACKAGE).parts[0] == "ray":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "ray" or n.startswith(("ray.", "llava_serve.ray")) for n in names):
                offenders.append(str(path.relative_to(PACKAGE.parent)))
    assert not offenders, f"the single-machine stack imports ray: {sorted(set(offenders))}"


def test_the_single_machine_stack_runs_without_ray() -> None:
    """Importing its services loads no ray module, whether or not ray is installed."""
    import subprocess
    import sys

    probe = f"import importlib, sys; [importlib.import_module(m) for m in {SINGLE_MACHINE!r}]; " + (
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'llava_serve.ray'))))"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]", ran.stdout
