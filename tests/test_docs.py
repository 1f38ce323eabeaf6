"""The documentation: docs/ builds with Sphinx without a warning; the README stays a front page into it."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = REPO / "README.md"

#: The README is a front page: what it is, how to start, what it offers, links to docs/.
README_MAX_LINES = 220

#: Markdown links and HTML ``src``/``href`` attributes of a page.
_LINK = re.compile(r"\]\(([^)\s]+)\)|(?:src|href)=\"([^\"]+)\"")
#: Tags of a built page that make a browser fetch something (not plain links).
_FETCHED = re.compile(r"<(?:script|img)\b[^>]*\bsrc=\"([^\"]+)\"|<link\b[^>]*\bhref=\"([^\"]+)\"")


def _links(text: str) -> list[str]:
    return [a or b for a, b in _LINK.findall(text)]


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and MyST (``myst_heading_anchors``) make it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.timeout(180)
def test_the_docs_build_without_a_warning(tmp_path):
    """``-W``: a warning fails the build, so a link to a missing page or heading (MyST's cross-reference
    warnings), a page left out of every table of contents or a missing image fails the suite."""
    for module in ("sphinx", "myst_parser"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: run the README's test command (the test extra has it).")
    out = tmp_path / "html"
    built = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert built.returncode == 0, f"sphinx failed:\n{built.stdout}\n{built.stderr}"
    pages = {page.stem for page in DOCS.glob("*.md")}
    assert {"index", "architecture", "tutorial", "http", "configuration", "operations"} <= pages
    for name in pages:
        assert (out / f"{name}.html").is_file(), f"docs/{name}.md was not built"
    for page in out.glob("*.html"):
        fetched = [a or b for a, b in _FETCHED.findall(page.read_text(encoding="utf-8"))]
        remote = [url for url in fetched if re.match(r"(https?:)?//", url)]
        assert not remote, f"{page.name} makes a browser fetch {remote}: the docs must work offline"
    for picture in ("dashboard.png", "dashboard-phone.png", "latest.png"):
        assert (out / "_images" / picture).is_file(), f"{picture} is not shown by any page"


def test_the_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines: keep it a front page (at most {README_MAX_LINES}) and put the "
        "details in a page of docs/")


def test_every_link_from_the_readme_names_an_existing_page_and_heading():
    text = README.read_text(encoding="utf-8")
    local = [link for link in _links(text) if not re.match(r"[a-z]+:|#", link)]
    into_docs = [link for link in local if link.startswith("docs/")]
    assert len(into_docs) >= 10, "the README links to the docs pages"
    for link in local:
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.exists(), f"README.md links to {link}, which does not exist"
        if anchor:
            assert target.suffix == ".md", link
            assert anchor in _anchors(target), f"README.md links to {link}: {path} has no such heading"


def test_the_readme_keeps_the_two_set_up_commands():
    """The example server's command, and the test command that .ci/run runs, byte for byte."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Set up and go", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert commands[:2] == ["python -m pip install -e . && python examples/app.py", ci]
