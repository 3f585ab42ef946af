"""The documentation holds together: a short README that leads to everything else.

* README.md stays at most ``MAX_README_BYTES`` (the long tables live in ``docs/``);
* its contents list, before the first section, links to every one of its ``## `` sections;
* every ``docs/*.md`` file is linked from README.md, opens with a title and links back to it;
* every relative link in README.md and ``docs/*.md`` (``](path)``, ``](path#anchor)``,
  ``](#anchor)``) points to a file that exists, and an anchor into a markdown file names one of
  its headings, by GitHub's rule (lowercase; only letters, digits, spaces, hyphens and
  underscores kept; spaces to hyphens; a repeated heading gets ``-1``, ``-2``, ...).

Pure text checks, no project import.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_BYTES = 25_000

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _headings(text: str) -> list[tuple[int, str]]:
    """(level, text) of every ATX heading outside code blocks."""
    found = []
    for line in _prose_lines(text):
        m = _HEADING.match(line)
        if m:
            found.append((len(m.group(1)), m.group(2)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (links keep their text, code its content)."""
    text = _INLINE_LINK.sub(r"\1", heading).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor the headings of a markdown text produce, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for _, heading in _headings(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    """The targets of the inline links and images of a markdown text, outside code."""
    found = []
    for line in _prose_lines(text):
        found.extend(_LINK.findall(_CODE_SPAN.sub("", line)))
    return found


def _relative_links(path: Path) -> list[tuple[str, Path, str]]:
    """(link as written, target file, anchor) for each relative link of a file."""
    out = []
    for target in links(path.read_text(encoding="utf-8")):
        if _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
        out.append((target, dest, unquote(anchor)))
    return out


def _section(text: str, title: str) -> str:
    """The lines of the ``## title`` section, up to the next heading of level 2 or above."""
    lines, out, inside = _prose_lines(text), [], False
    for line in lines:
        m = _HEADING.match(line)
        if m and len(m.group(1)) <= 2:
            if inside:
                break
            inside = len(m.group(1)) == 2 and m.group(2).strip() == title
            continue
        if inside:
            out.append(line)
    return "\n".join(out)


def test_readme_is_short():
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, (
        f"README.md is {size:,} bytes (limit {MAX_README_BYTES:,}): move detail to docs/ and link it")


def test_readme_contents_list_links_every_section():
    text = README.read_text(encoding="utf-8")
    sections = [h for level, h in _headings(text) if level == 2]
    assert sections and sections[0] == "Contents", "the first ## section of README.md is Contents"
    listed = {t[1:] for t in links(_section(text, "Contents")) if t.startswith("#")}
    missing = [h for h in sections[1:] if slug(h) not in listed]
    assert not missing, f"sections missing from README.md's contents list: {missing}"


def test_docs_exist():
    assert DOCS, "docs/*.md is empty"


def test_every_docs_file_is_linked_from_readme():
    linked = {dest for _, dest, _ in _relative_links(README)}
    unlinked = [p.name for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"docs files not linked from README.md: {unlinked}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_file_has_title_and_link_back(doc):
    lines = [ln for ln in doc.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert lines and re.match(r"# \S", lines[0]), f"{doc.name} does not start with a # title"
    assert len(lines) > 1 and "](../README.md" in lines[1], (
        f"{doc.name}: the line after the title should link back to ../README.md")


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    problems = []
    for target, dest, anchor in _relative_links(doc):
        if not dest.exists():
            problems.append(f"{target}: no such file {dest.relative_to(REPO)}")
        elif anchor and dest.suffix == ".md":
            if anchor.lower() not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{target}: no heading with anchor #{anchor}")
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize(("heading", "anchor"), [
    ("What `make demo` does", "what-make-demo-does"),
    ("Reliability, security and scale-out", "reliability-security-and-scale-out"),
    ("Re-adaptation portfolio — the default (`python -m bench.portfolio`)",
     "re-adaptation-portfolio--the-default-python--m-benchportfolio"),
    ("How to add a [gate](x.md)", "how-to-add-a-gate"),
    ("Source (`bench/results/train.md`; adapt_full)", "source-benchresultstrainmd-adapt_full"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_repeated_headings_are_numbered():
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}
