"""The documentation stands alone: no citation of a file the repository does not contain,
every relative link in README.md and docs/*.md resolves (file and #anchor), and the
README stays a front door (≤ 15,000 bytes)."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_BYTES = 15_000
# pages cited before they exist: written on another branch, due with its merge. An entry
# whose page exists fails test_pending_pages_are_still_missing — then delete the entry.
PENDING: set[str] = set()
# built by concatenation so that this file does not cite them itself
_GONE = re.compile(r"\b(" + "SP" + "EC|" + "ST" + r"YLE)(\.md|'s|\b)")
_DOCS_PATH = re.compile(r"docs/[\w./-]+?\.md\b")
_DESIGN_SECTION = re.compile(r"docs/design\.md §(\d+)")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".yaml", ".yml", ".cpp", ".h", ".cu", ".cfg", ".sh", ".json", ".ini"}
_TEXT_NAMES = {"run", "CMakeLists.txt", ".gitignore"}


def _tracked_files() -> list[Path]:
    """Files of the repository: git's list in a checkout, else the tree minus build output."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
        files = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        skip = {".git", "build", "runs", "__pycache__", ".pytest_cache", ".benchmarks"}
        files = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return [p for p in files if p.is_file() and (p.suffix in _TEXT_SUFFIXES or p.name in _TEXT_NAMES)]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _strip_code(markdown: str) -> str:
    """Markdown without fenced code blocks and inline code spans (links there are not links)."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", markdown)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped, lower case, punctuation
    removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", _text(page), flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6} (.+?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_slug_matches_github():
    assert slug("Plots: `python -m fastjepa.plot RUN_DIR`") == "plots-python--m-fastjepaplot-run_dir"
    assert slug("4. Masks: multi-block `MaskCollator`") == "4-masks-multi-block-maskcollator"
    assert slug("The predictor's head dim") == "the-predictors-head-dim"
    assert slug("What a run logged: CSV, TensorBoard, W&B") == "what-a-run-logged-csv-tensorboard-wb"


def test_readme_is_a_front_door():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, expected at most {README_MAX_BYTES}: move detail into docs/"


def test_no_citation_of_files_outside_the_repository():
    bad = []
    for path in _tracked_files():
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(_text(path).splitlines(), 1):
            if _GONE.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not bad, "cites a file users do not have; cite docs/design.md §N instead:\n" + "\n".join(bad)


def test_cited_docs_pages_exist():
    bad = []
    for path in _tracked_files():
        for n, line in enumerate(_text(path).splitlines(), 1):
            for cited in _DOCS_PATH.findall(line):
                if cited not in PENDING and not (ROOT / cited).is_file():
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {cited}")
    assert not bad, "cites a docs page that does not exist:\n" + "\n".join(bad)


def test_cited_design_sections_exist():
    design = _text(ROOT / "docs" / "design.md")
    sections = set(re.findall(r"^## (\d+)\. ", design, flags=re.M))
    bad = []
    for path in _tracked_files():
        for n, line in enumerate(_text(path).splitlines(), 1):
            for number in _DESIGN_SECTION.findall(line):
                if number not in sections:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: §{number}")
    assert not bad, f"cites a section docs/design.md does not have (it has §{', §'.join(sorted(sections, key=int))}):\n" + "\n".join(bad)


def test_pending_pages_are_still_missing():
    arrived = sorted(p for p in PENDING if (ROOT / p).is_file())
    assert not arrived, f"{arrived} exist now: remove them from PENDING in tests/docs/test_docs.py so their links are checked"


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in _LINK.findall(_strip_code(_text(page))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if rel in PENDING:
            continue
        if not dest.exists():
            bad.append(f"{target}: no such file {rel}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: {rel} has no heading with anchor #{anchor}")
    assert not bad, f"broken links in {page.relative_to(ROOT)}:\n" + "\n".join(bad)
