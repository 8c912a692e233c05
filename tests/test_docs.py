"""The README and docs/ say only what the repository backs: every number in a table is in a committed result
file, every test a page names exists, every relative link resolves, and the README stays a front page."""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULT = re.compile(r"benchmarks/results/[\w./-]+\.(?:json|txt)")
NUMBER = re.compile(r"(?<![\w.-])[-+]?\d[\d,]*(?:\.\d+)?(?![\d.,]|[a-wyzA-Z_])")  # 3, -0.22, 1,045.7, 18.5x
TEST = re.compile(r"`(test_\w+\.py)(?:::(\w+))?`|`::(\w+)`")


def _tables(text: str):
    """``(source files named since the last table, header, rows)`` for each markdown table; rows are lists of cells."""
    tables, sources, block = [], [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if block:
            tables.append((sources, block[0], [row for row in block[2:]]))
            sources, block = [], []
        sources = sources + RESULT.findall(line)
    return tables


def _leaves(value):
    """Every number in a JSON document, strings' numbers included (``"topk 0.01"``)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, str):
        for token in NUMBER.findall(value):
            yield float(token.replace(",", ""))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(key)
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)


def _shown(sources) -> set:
    """Each number of the source files as a table may show it: as it is, as a percentage, in MB, in ms; to 0-4
    decimals."""
    shown = set()
    for source in sources:
        path = ROOT / source
        text = path.read_text()
        values = (
            set(_leaves(json.loads(text)))
            if path.suffix == ".json"
            else {float(t.replace(",", "")) for t in NUMBER.findall(text)}
        )
        for value in values:
            for scaled in (value, 100 * value, value / 1e6, 1000 * value):
                shown.update(f"{scaled:.{decimals}f}" for decimals in range(5))
    return shown


def _result_tables():
    for page in PAGES:
        for sources, header, rows in _tables(page.read_text()):
            numbers = [(row[0], number) for row in rows for cell in row for number in NUMBER.findall(cell)]
            if numbers and "test" not in header:  # a promise and its test: not a table of results
                yield pytest.param(page, sources, header, rows, id=f"{page.name}:{' '.join(header)[:40]}")


@pytest.mark.parametrize("page, sources, header, rows", list(_result_tables()))
def test_every_number_in_a_table_is_in_the_result_file_it_names(page, sources, header, rows):
    assert sources, f"{page.name}: the table headed {header} names no benchmarks/results file above it"
    missing = [path for path in sources if not (ROOT / path).is_file()]
    assert not missing, f"{page.name} names result files that are not committed: {missing}"
    shown = _shown(sources)
    numbers = [
        (row[0], number.replace(",", "").lstrip("+"), cell)
        for row in rows
        for cell in row
        for number in NUMBER.findall(cell)
    ]
    found = [float(number) for _, number, _ in numbers if number in shown]
    # A speed-up ("17.6x") may be worked out from two numbers of the table; anything else must be in the file.
    absent = [
        (label, number)
        for label, number, cell in numbers
        if number not in shown and not (f"{number}x" in cell.replace(",", "") and _a_quotient(number, found))
    ]
    assert not absent, f"{page.name}: numbers of the table headed {header} found in none of {sources}: {absent}"


def _a_quotient(number: str, found: list) -> bool:
    """Whether ``number`` is the quotient of two numbers the table shows from its sources."""
    decimals = len(number.partition(".")[2])
    return any(b and f"{a / b:.{decimals}f}" == number for a in found for b in found)


def _named_tests():
    for page in PAGES:
        module = None
        for match in TEST.finditer(page.read_text()):
            file, name, continued = match.groups()
            module = file or module
            if name or continued:
                yield page.name, module, name or continued


def test_every_test_a_page_names_exists():
    defined = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        defined[path.name] = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    named = list(_named_tests())
    assert len(named) > 40
    missing = [(page, module, name) for page, module, name in named if name not in defined.get(module, set())]
    assert not missing, missing


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append((page.name, target))
    assert not broken, broken


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200, len(lines)
