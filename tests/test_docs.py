"""The documentation folder ``docs/`` and the citations that point into it.

1. Every ``docs/....md`` path cited in the package's sources, the README, ``examples/`` and ``docs/`` itself exists,
   and so does every section it names (``docs/methods/cppo.md``, section "The divergence") and every relative link
   (with its ``#anchor``) inside ``docs/``.
2. Method documents are cited only as pages of ``docs/``: a bare ``tp-schedule.md``, ``cppo.md``, ``delta.md`` or
   ``schedules.md`` (a document outside the repository) in the package, the README or ``docs/`` fails.
3. Every fenced block marked ``python test-vector`` in ``docs/`` runs and its assertions hold, so the numbers the
   pages print are the package's own output.
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SPEC_NAMES = ("tp-schedule.md", "cppo.md", "delta.md", "schedules.md")
TEXT_SUFFIXES = {".py", ".md", ".rst", ".txt", ".sh", ".yaml", ".yml", ".toml", ".json", ".ipynb"}

# a repository-relative docs path, not part of a longer path or URL (".../docs/x.md" is someone else's docs folder)
DOC_PATH = re.compile(r"(?<![\w./:-])docs/[\w./-]+?\.md(?![\w])")
# a docs path followed by the section(s) it names: section "A" / sections "A" and "B" / section 'A'
SECTION_CITE = re.compile(
    r"(?<![\w./:-])(docs/[\w./-]+?\.md)(?![\w])[`'\"]*\)?,?\s+sections?\s+"
    r"((?:(?:\"[^\"]{1,200}\"|'[^'\n]{1,200}')(?:\s*(?:,|and|to|or)\s*)?)+)"
)
QUOTED = re.compile(r"\"([^\"]{1,200})\"|'([^'\n]{1,200})'")
# any path-like token that ends in a .md file name
MD_TOKEN = re.compile(r"(?<![\w./-])[\w./-]*\.md(?![\w])")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(`{3,}|~{3,})")
VECTOR_BLOCK = re.compile(r"^```python test-vector[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _package_files() -> list[pathlib.Path]:
    return sorted((ROOT / "rlvr_kernels").rglob("*.py"))


def _doc_pages() -> list[pathlib.Path]:
    return sorted(DOCS.rglob("*.md")) if DOCS.is_dir() else []


def _example_files() -> list[pathlib.Path]:
    ex = ROOT / "examples"
    if not ex.is_dir():
        return []
    return sorted(p for p in ex.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def _readme() -> list[pathlib.Path]:
    return [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []


def _citing_files() -> list[pathlib.Path]:
    return _package_files() + _readme() + _example_files() + _doc_pages()


def _read(path: pathlib.Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _normalise(title: str) -> str:
    return " ".join(title.replace("`", "").split()).strip().casefold()


def _slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (hyphens and underscores kept), spaces to hyphens."""
    s = title.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _headings(page: pathlib.Path) -> list[str]:
    """The Markdown headings of a page (outside fenced code blocks), as written."""
    out, fence = [], None
    for line in _read(page).splitlines():
        m = FENCE.match(line.strip())
        if m:
            marker = m.group(1)[0]
            fence = None if fence == marker else (fence or marker)
            continue
        if fence is None:
            h = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if h:
                out.append(h.group(1))
    return out


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _strip_comment_markers(s: str) -> str:
    """A section name wrapped over commented lines (``# ... "The\n    # schedule"``) without the ``#`` markers."""
    return re.sub(r"\n\s*#", "\n", s)


def test_docs_folder_has_the_pages():
    for page in (
        "README.md",
        "benchmark.md",
        "design/vocab-pass.md",
        "methods/objectives.md",
        "methods/tp-schedule.md",
        "methods/forking-tokens.md",
        "methods/entropy-advantages.md",
        "methods/d3s.md",
        "methods/cppo.md",
        "methods/delta.md",
    ):
        assert (DOCS / page).is_file(), f"docs/{page} is missing"


def test_index_lists_every_page():
    index = _read(DOCS / "README.md")
    linked = {(DOCS / t.split("#")[0]).resolve() for t in MD_LINK.findall(index) if not re.match(r"\w+:", t)}
    missing = [_rel(p) for p in _doc_pages() if p != DOCS / "README.md" and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link to: {missing}"


def test_cited_docs_paths_exist():
    problems = []
    for path in _citing_files():
        text = _read(path)
        for m in DOC_PATH.finditer(text):
            if not (ROOT / m.group(0)).is_file():
                problems.append(f"{_rel(path)}:{_line_of(text, m.start())}: {m.group(0)} does not exist")
        for m in SECTION_CITE.finditer(text):
            target = ROOT / m.group(1)
            if not target.is_file():
                continue  # reported above
            titles = {_normalise(h) for h in _headings(target)}
            for q in QUOTED.finditer(_strip_comment_markers(m.group(2))):
                name = q.group(1) or q.group(2)
                if _normalise(name) not in titles:
                    problems.append(
                        f"{_rel(path)}:{_line_of(text, m.start())}: {m.group(1)} has no section "
                        f"{' '.join(name.split())!r}"
                    )
    assert not problems, "broken docs citations:\n" + "\n".join(problems)


def test_links_inside_docs_resolve():
    problems = []
    for page in _doc_pages():
        text = _read(page)
        for m in MD_LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-zA-Z][\w+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{_rel(page)}:{_line_of(text, m.start())}: ({target})"
            if not dest.exists():
                problems.append(f"{where} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in {_slug(h) for h in _headings(dest)}:
                problems.append(f"{where}: no heading with anchor #{anchor}")
    assert not problems, "broken links in docs/:\n" + "\n".join(problems)


def test_no_bare_spec_citations():
    """A method document is cited as its page under docs/ (``docs/methods/cppo.md``; inside docs/ a relative link
    that resolves there), never as a bare file name of a document that is not in the repository."""
    problems = []
    for path in _package_files() + _readme() + _doc_pages():
        text = _read(path)
        for m in MD_TOKEN.finditer(text):
            token = m.group(0)
            if os.path.basename(token) not in SPEC_NAMES or token.startswith("//"):
                continue
            ok = token.startswith("docs/") and (ROOT / token).is_file()
            if not ok and path.is_relative_to(DOCS):
                dest = (path.parent / token).resolve()
                ok = dest.is_file() and dest.is_relative_to(DOCS.resolve())
            if not ok:
                problems.append(f"{_rel(path)}:{_line_of(text, m.start())}: {token}")
    assert not problems, (
        'cite the page under docs/ (e.g. docs/methods/cppo.md, section "...") instead of:\n' + "\n".join(problems)
    )


def _vector_blocks():
    for page in _doc_pages():
        text = _read(page)
        for i, m in enumerate(VECTOR_BLOCK.finditer(text)):
            yield pytest.param(page, _line_of(text, m.start(1)), m.group(1), id=f"{_rel(page)}#{i}")


def test_pages_have_test_vectors():
    pages = {p for p, *_ in (v.values for v in _vector_blocks())}
    for name in ("tp-schedule", "forking-tokens", "entropy-advantages", "d3s", "cppo", "delta", "objectives"):
        assert DOCS / "methods" / f"{name}.md" in pages, f"docs/methods/{name}.md has no python test-vector block"


@pytest.mark.parametrize(("page", "line", "code"), list(_vector_blocks()))
def test_vectors(page, line, code):
    # line numbers in a failure's traceback point into the page
    compiled = compile("\n" * (line - 1) + code, str(page), "exec")
    exec(compiled, {"__name__": f"docs_vector_{page.stem}"})
