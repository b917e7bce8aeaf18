"""docs/: links resolve, every alert rule has a runbook, every API route is in api.md, what api.md
quotes of the code is what the code says, and the `llmops` command lines in the docs parse with
the real CLI."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import msgspec
import pytest

from llm_ops_helper import cli
from llm_ops_helper.controller import openapi
from llm_ops_helper.controller.deployments.spec import DeploymentSpec, Invalid, parse_spec

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# The repository's README is checked with the pages: its links, image and command lines.
PAGES = [*sorted(DOCS.glob("*.md")), REPO / "README.md"]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # images too
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {_slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_the_pages_exist() -> None:
    names = {p.name for p in PAGES if p.parent == DOCS}
    assert {"README.md", "architecture.md", "install.md", "config.md", "api.md",
            "runbooks.md", "scale-out.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    text = _FENCE.sub("", page.read_text())
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        missing_anchor = bool(anchor) and resolved.suffix == ".md" and resolved.exists() \
            and anchor not in _anchors(resolved)
        if not resolved.exists() or missing_anchor:
            broken.append(target)
    assert broken == [], f"{page.name}: links that do not resolve"


def _rule_names() -> set[str]:
    """Every rule name the controller raises: the first argument of each Condition(...)."""
    found: set[str] = set()
    for path in (REPO / "controller").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Condition" \
                    and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def test_every_alert_rule_has_a_runbook_section() -> None:
    rules = _rule_names()
    assert {"gpu_xid", "host_offline", "anomaly"} <= rules  # the scan finds them
    sections = set(re.findall(r"^## (\w+)$", (DOCS / "runbooks.md").read_text(), re.MULTILINE))
    assert rules - sections == set(), "alert rules without a section in docs/runbooks.md"
    assert sections - rules == set(), "runbook sections for rules the code no longer raises"


def test_every_controller_route_is_in_api_md() -> None:
    text = (DOCS / "api.md").read_text()
    missing = [f"{m} {p}" for m, p in openapi.OPERATIONS
               if not re.search(rf"^\| {m} \| `{re.escape(p)}` \|", text, re.MULTILINE)]
    assert missing == [], "routes missing from the table in docs/api.md"


def test_api_md_spec_block_is_the_real_defaults() -> None:
    text = (DOCS / "api.md").read_text()
    after = text.split("in full with its defaults", 1)[1]
    block = re.search(r"```json\n(.*?)```", after, re.DOTALL)
    assert block is not None, "the spec block after 'in full with its defaults' in api.md"
    shown = json.loads(block[1])
    assert shown == msgspec.to_builtins(DeploymentSpec(model=shown["model"]))


def test_api_md_quotes_the_real_error_text() -> None:
    text = " ".join((DOCS / "api.md").read_text().split())
    with pytest.raises(Invalid) as refused:
        parse_spec(b'{"model": "tiny", "replicas": -1}')
    assert f"`{refused.value}`" in text


def _command_lines() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in _FENCE.findall(page.read_text()):
            if not block.startswith(("```sh", "```bash")):
                continue
            for line in block.splitlines()[1:-1]:
                line = line.split(" #", 1)[0].strip()
                match = re.search(r"(?:^|/|sudo (?:-u \S+ )?)llmops (.+)$", line)
                if match and not line.startswith("#") and "\\" not in line:
                    found.append((page.name, match[1].split("|")[0].strip()))
    return found


def test_llmops_command_lines_parse() -> None:
    lines = _command_lines()
    assert len(lines) > 10
    parser = cli.build_parser()
    bad = []
    for page, line in lines:
        try:
            parser.parse_args(shlex.split(line))
        except SystemExit:
            bad.append(f"{page}: llmops {line}")
    assert bad == [], "command lines the CLI refuses"
