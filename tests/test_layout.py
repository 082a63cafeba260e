"""How the package is put together, where a test can hold it."""

from __future__ import annotations

import ast
import io
import pathlib
import subprocess
import sys
import tokenize

IO_LIBRARIES = ("trio", "trio_websocket", "quart", "quart_trio", "hypercorn", "coredis", "httpx", "prometheus_client")


def test_the_pure_core_imports_no_io_library():
    code = ("import sys, signaling_trio.protocol, signaling_trio.protocol.room, signaling_trio.protocol.filters, "
            "signaling_trio.protocol.registration\n"
            f"print(','.join(m for m in {IO_LIBRARIES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_package_still_exports_the_server():
    import signaling_trio
    from signaling_trio import ServerInfo, SignalingServer, serve

    assert signaling_trio.serve is serve and SignalingServer.__name__ == "SignalingServer" and ServerInfo
    assert set(signaling_trio.__all__) >= {"ConfigError", "ServerInfo", "Settings", "SignalingServer", "serve"}


# ------------------------------------------------------------ shape of the code
PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "signaling_trio"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60  # lines of code: docstrings, comments and blank lines aside


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """Every signaling_trio module `name` imports, anywhere in it (TYPE_CHECKING blocks and
    function bodies included: a cycle there is still a cycle for a reader)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import mod` imports mod; `from mod import name`, mod
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {t for t in targets if t in modules and t != name}


def test_no_import_cycles_among_the_package_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["signaling_trio.server"] >= {"signaling_trio._http", "signaling_trio.cluster"}  # the walk sees imports
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def _code_lines(source: str) -> set[int]:
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def test_modules_and_functions_stay_small():
    too_long = []
    for name, path in _modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        tree = ast.parse(source)
        code = _code_lines(source) - _docstring_lines(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = len([line for line in code if node.lineno <= line <= node.end_lineno])
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {n} lines of code")
    assert too_long == []


def test_ruff_is_clean():
    """The line length and complexity cap of pyproject.toml's [tool.ruff]."""
    root = PACKAGE.parent
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                          "signaling_trio", "tests", "benchmarks"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
