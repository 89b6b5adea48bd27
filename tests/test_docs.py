"""The README is a front door and the docs pages hold the rest: every relative link resolves, the README
stays small and names the two commands.

docs/reference.md is generated from the schema by `python -m runner.config.reference` (its own test
checks it is up to date), so links to a file named reference.md are left to that test.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT_BYTES = 12_000

# [text](target) outside code; a target is cut at its first space (an optional "title") or #anchor.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]*)[^)]*\)")
FENCE_OR_INDENTED = re.compile(r"^(```.*?^```|(?: {4}|\t).*?)$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(page):
    text = CODE_SPAN.sub("", FENCE_OR_INDENTED.sub("", page.read_text(encoding="utf-8")))
    for target in LINK.findall(text):
        if not target or re.match(r"[a-z][a-z0-9+.-]*:", target):  # an #anchor alone, http:, mailto:
            continue
        yield target


def broken_links(page):
    return [target for target in relative_links(page)
            if Path(target).name != "reference.md" and not (page.parent / target).exists()]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(page):
    assert broken_links(page) == []


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [anchor](#x) [web](https://example.org/a.md) [gone](docs/gone.md)\n"
                    "`[code](no.md)`\n\n    [indented](no.md)\n", encoding="utf-8")
    assert broken_links(page) == ["docs/gone.md"]


def test_readme_is_a_front_door_under_12_kb():
    assert (ROOT / "README.md").stat().st_size < README_LIMIT_BYTES


def test_readme_names_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make run" in readme and "make test" in readme
