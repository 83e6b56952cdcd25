"""Code domain: docstring → function pairs from the running interpreter's standard library (PSF).

The stdlib is real, reviewed Python that every install already has. Each function (or method) that
has a docstring, a body besides it and fewer than MAX_FUNCTION_LINES lines becomes one example:

    instruction  Write a Python function `name(args)` that does the following.
    input        the docstring, cleaned with inspect.cleandoc (ast.get_docstring does exactly that)
    response     the function's source, dedented, with the docstring lines removed (it is the prompt)

Test suites, IDLE, lib2to3, the codec tables and site-packages are skipped: they are either not
library code or thousands of near-identical functions. Parsing ~570 modules with `ast` takes a few
seconds, which is why the result is cached (splits.py).
"""

from __future__ import annotations

import ast
import os
import sysconfig
import textwrap
from pathlib import Path

from .example import DataConfig, Example

MAX_FUNCTION_LINES = 60  # longer functions never fit a CPU-sized sequence anyway
# Folders that are not library code (tests, the IDE, demos), third-party code, generated tables.
SKIP_DIRS = frozenset({
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
    "turtledemo", "ensurepip", "lib-dynload", "encodings", "pydoc_data", "__phello__",
})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_paths(root: Path) -> list[Path]:
    """Library modules under `root`, sorted, with SKIP_DIRS pruned before descending into them."""
    found = []
    for folder, dirs, files in os.walk(root):
        # config-3.11-x86_64-linux-gnu and friends hold build files, not modules
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-")]
        found += [Path(folder) / f for f in files if f.endswith(".py") and not f.startswith("test_")]
    return sorted(found)


def _functions(tree: ast.AST):
    """Yield (function node, enclosing class name or None) for every def in the module, in source order."""
    stack = [(tree, None)]
    while stack:
        node, owner = stack.pop()
        children = list(ast.iter_child_nodes(node))
        for child in reversed(children):  # reversed + stack pop = source order
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((child, owner))
            elif isinstance(child, ast.ClassDef):
                stack.append((child, child.name))
            else:
                stack.append((child, owner))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, owner


def _is_stub(body: list[ast.stmt]) -> bool:
    """`pass`, `...` or `raise NotImplementedError`: an abstract method, not an implementation."""
    if len(body) != 1:
        return False
    stmt = body[0]
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True
    return isinstance(stmt, ast.Raise) and "NotImplemented" in ast.unparse(stmt)


def _example(node: ast.FunctionDef | ast.AsyncFunctionDef, owner: str | None, lines: list[str], source: str) -> Example | None:
    docstring = ast.get_docstring(node, clean=True)
    if not docstring or len(node.body) < 2:
        return None  # no docstring, or nothing to write besides it
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    if node.end_lineno - first + 1 >= MAX_FUNCTION_LINES:
        return None
    doc_node = node.body[0]
    if doc_node.lineno == node.lineno:
        return None  # `def f(): "doc"; ...` on one line cannot be split cleanly
    # ast line numbers are 1-based and inclusive; cut out the docstring's lines from the def's span
    body = lines[first - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
    code = textwrap.dedent("".join(body)).rstrip()
    try:
        ast.parse(code)
    except SyntaxError:
        return None  # a multi-line string at column 0 defeats dedent; such functions are rare
    if _is_stub(node.body[1:]):
        return None  # docstring → `pass` teaches nothing
    signature = f"{node.name}({ast.unparse(node.args)})"
    kind = "an async Python function" if isinstance(node, ast.AsyncFunctionDef) else "a Python function"
    if owner is not None:
        kind, signature = "the method", f"{owner}.{signature}"
    instruction = f"Write {kind} `{signature}` that does the following."
    return Example("code", instruction, docstring, code, None, source)


def build(cfg: DataConfig) -> list[Example]:
    """Every usable function of the stdlib, in sorted-path, source order."""
    root = stdlib_root()
    examples = []
    for path in module_paths(root):
        rel = path.relative_to(root).as_posix()
        text = path.read_bytes()
        try:
            tree = ast.parse(text)  # bytes: ast honours the file's own encoding cookie
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are templates/bad-syntax fixtures; not code to learn from
        lines = text.decode("utf-8", errors="replace").splitlines(keepends=True)
        for node, owner in _functions(tree):
            example = _example(node, owner, lines, f"stdlib:{rel}")
            if example is not None:
                examples.append(example)
    return examples
