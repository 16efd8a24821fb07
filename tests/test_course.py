"""The course kit around the chapters: every chapter ends with a self-check answered in its solution and a further
reading, every citation links to an entry of docs/references.md that exists, and the glossary says where each term
is taught."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REFERENCES = ROOT / "docs" / "references.md"
LINK = re.compile(r"\]\(([^)\s]*references\.md)#([^)\s]+)\)")
QUESTION = re.compile(r"^(\d+)\. ", re.M)


def markdown(path: Path) -> list[str]:
    """Return the source of every markdown cell of the notebook at `path`."""
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]


def section(path: Path, heading: str) -> str:
    """Return the one markdown cell of `path` that starts with `heading` (a failure names the notebook)."""
    found = [cell for cell in markdown(path) if cell.startswith(heading + "\n")]
    assert len(found) == 1, f"{path.name}: expected one markdown cell starting {heading!r}, found {len(found)}"
    return found[0]


def slug(heading: str) -> str:
    """Return the anchor GitHub (and the site, through myst_heading_anchors) gives a heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def test_slugs_follow_githubs_rule():
    assert slug("Howard and Ruder 2018") == "howard-and-ruder-2018"
    assert slug("Hu et al. 2021") == "hu-et-al-2021"


def anchors() -> set[str]:
    return {slug(h) for h in re.findall(r"^### (.+)$", REFERENCES.read_text(), re.M)}


def test_the_references_are_complete_entries():
    entries = re.split(r"^### ", REFERENCES.read_text(), flags=re.M)[1:]
    assert len(entries) >= 15
    for entry in entries:
        name = entry.splitlines()[0]
        assert re.search(r"\b(19|20)\d\d\b", name), f"{name}: the heading gives the year"
        assert re.search(r"arXiv:\d{4}\.\d{4,5}|\]\(https://", entry), f"{name}: no arXiv id or link"
    names = [e.splitlines()[0].lower() for e in entries]
    assert names == sorted(names), "docs/references.md is in alphabetical order"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem[:2] for p in CHAPTERS])
def test_every_chapter_has_a_self_check_answered_in_its_solution(path):
    questions = QUESTION.findall(section(path, "## Self-check"))
    assert 4 <= len(questions) <= 8 and questions == [str(n) for n in range(1, len(questions) + 1)], (
        f"{path.name}: the self-check numbers 4-8 questions from 1, found {questions}")
    solution = ROOT / "solutions" / f"{path.stem}_solutions.ipynb"
    answers = QUESTION.findall(section(solution, "## Self-check answers"))
    assert answers == questions, f"{solution.name}: one answer per self-check question, found {answers}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem[:2] for p in CHAPTERS])
def test_every_chapter_ends_with_further_reading_from_the_references(path):
    cited = LINK.findall(section(path, "## Further reading"))
    assert len(cited) >= 2, f"{path.name}: further reading names at least two entries of docs/references.md"


def test_every_citation_links_to_an_existing_entry():
    known, broken = anchors(), []
    pages = CHAPTERS + sorted((ROOT / "solutions").glob("*.ipynb"))
    texts = {p: "\n".join(markdown(p)) for p in pages}
    texts |= {p: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    for path, text in texts.items():
        for target, anchor in LINK.findall(text):
            if (path.parent / target).resolve() != REFERENCES or anchor not in known:
                broken.append(f"{path.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, f"citations that lead nowhere: {broken}"
    cited = {anchor for text in texts.values() for _, anchor in LINK.findall(text)}
    assert len(cited) >= 15, f"only {len(cited)} of the references are cited anywhere"


def test_the_link_check_finds_a_broken_citation(tmp_path):
    # The check itself can fail: an anchor that is no heading of docs/references.md is not among the known ones.
    assert LINK.findall("see [X, 2020](../docs/references.md#nobody-2020).") == [("../docs/references.md",
                                                                                 "nobody-2020")]
    assert "nobody-2020" not in anchors()


def test_every_glossary_entry_says_where_it_is_taught():
    entries = re.findall(r"^\*\*(.+?)\*\*(.*?)(?=\n\n|\Z)", (ROOT / "docs" / "glossary.md").read_text(), re.M | re.S)
    assert len(entries) >= 50
    untaught = [term for term, text in entries if not re.search(r"\((\d\d)[,;)–\- ]", text)]
    assert not untaught, f"glossary entries naming no notebook: {untaught}"
