"""The code stays readable: no function in raytopk/ runs past a screen."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60  # lines of code in a function's body, its docstring not counted


def _code_lines(function: ast.AST, lines: list) -> int:
    """Non-blank, non-comment source lines spanned by ``function``'s body statements after its docstring."""
    body = function.body[1:] if ast.get_docstring(function) is not None else function.body
    spanned = set()
    for statement in body:
        first = min([statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])])
        spanned.update(range(first, statement.end_lineno + 1))
    return sum(1 for n in spanned if lines[n - 1].strip() and not lines[n - 1].lstrip().startswith("#"))


def test_no_function_has_more_than_60_lines_of_code():
    offenders = []
    for path in sorted((ROOT / "raytopk").glob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = _code_lines(node, lines)
                if count > MAX_LINES:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({count} lines)")
    listed = ", ".join(offenders)
    assert not offenders, f"functions with more than {MAX_LINES} lines of code (docstring aside); split them: {listed}"
