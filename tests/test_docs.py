"""The documentation as a new user meets it: a short front door, links that lead somewhere, and one source per figure.

* The README stays a front door (at most 200 lines); the details live in ``docs/`` and ``training/README.md``.
  Bug caught: the README growing back into a manual.
* Every relative link of the README, the docs pages and training/README names a file that exists, and a ``#anchor``
  a heading of that file. Bug caught: a section moved to another page with its old links left behind.
* A figure (a number with two or more decimals, or with a unit of bytes or time) is stated in one page only, so two
  pages cannot disagree about it (the SiD toy's distance once read 0.087 in one README and 0.107 in the other).
  What is not a measurement (the released LoRAs' η, card sizes and budgets, optimiser constants) is listed in
  ``SETTINGS`` with its reason. Bug caught: a figure copied into a second page, which then goes stale.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = (README, REPO / "training" / "README.md", *sorted((REPO / "docs").glob("*.md")))

#: a figure: 2+ decimals (0.087, 14.69) or a number with a unit of bytes or time (2.20 GiB, 13 s, 22 min)
FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?\s?(?:GiB|MiB|GB|ms|min|s)\b|\d+\.\d{2,})(?![\w.]*\d)")
#: numbers that are settings or definitions, not measurements, and may appear on several pages
SETTINGS = {
    "0.65", "0.75", "0.85", "0.95",  # the released LoRAs' start strengths η
    "0.33",  # ComfyUI 0.33, a version
    "0.999",  # Adam's β₂ and EMA decays, settings of the official runs
    "8GB", "12GB", "24GB", "8GiB", "12GiB", "24GiB", "4GiB",  # GPU sizes and memory budgets a user picks
}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def figures(text: str) -> set[str]:
    found = set()
    for match in FIGURE.finditer(text):
        token = match.group(1).replace(" ", "")
        if re.fullmatch(r"\d{4}\.\d{5}", token):  # an arXiv id
            continue
        found.add(token)
    return found - SETTINGS


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", page.read_text(encoding="utf-8"), re.M)}


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move details to docs/"
    assert "<this-repository-url>" not in README.read_text()


def test_every_relative_link_leads_somewhere():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(README.read_text())}
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_each_figure_has_one_source():
    where = defaultdict(set)
    for page in PAGES:
        for figure in figures(page.read_text(encoding="utf-8")):
            where[figure].add(str(page.relative_to(REPO)))
    twice = {f: sorted(p) for f, p in where.items() if len(p) > 1}
    assert not twice, f"figures stated on more than one page (keep one, link to it from the others): {twice}"


def test_the_figure_check_can_fail():
    assert figures("sliced Wasserstein 1.278 → 0.087 in 3000 steps, 13 s; 2.20 GiB; η 0.75; arXiv 2412.18945") == {
        "1.278", "0.087", "13s", "2.20GiB"}
    assert figures("ComfyUI 0.3.48 and 0.33.0; eta0.75") == set()
    assert slug("STD vs CD: the evidence bench") == "std-vs-cd-the-evidence-bench"
    assert slug("The target window: official or the paper's γ") == "the-target-window-official-or-the-papers-γ"
