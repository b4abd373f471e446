"""Every relative link and image in README.md and docs/ (the rendered notebooks included) points at a file that
exists, and every notebook has its rendered page. Run as: python -m pytest -q tests/test_doc_links.py"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _targets(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # links in code blocks are code
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # web links and in-page anchors are not checked offline
        yield m.group(0), (page.parent / unquote(target.split("#")[0])).resolve()


def test_relative_links_resolve():
    broken = [f"{p.relative_to(ROOT)}: {link}" for p in PAGES for link, path in _targets(p) if not path.exists()]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_notebook_is_rendered_and_linked():
    rendered = ROOT / "docs" / "notebooks"
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        page = rendered / f"{nb.stem}.md"
        assert page.exists(), f"{page.relative_to(ROOT)} missing: run `make docs-notebooks` and commit docs/notebooks/"
        assert f"notebooks/{nb.stem}.md" in index, f"docs/index.md does not link the rendered {nb.stem}"
        assert "![png](" in page.read_text(encoding="utf-8"), f"{page.relative_to(ROOT)} has no figure"
