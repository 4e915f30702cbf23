"""The repository's shape: no line of the three main files is wider than 100 columns, and
tah.py's sections are the tutorial's map: the header lists the `# ---` banners in order, and
tutorial/README.md gives each chapter's sections with the lines they span."""
import re

import pytest

from conftest import ROOT

WIDTH = 100
BANNER = re.compile(r"^# --- (.+?) \(chapters? ([\d, and]+)\) -+$")


@pytest.mark.parametrize("name", ["tah.py", "train.py", "generate.py"])
def test_no_line_is_wider_than_100_columns(name):
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    wide = [f"{name}:{i}: {len(line)} columns" for i, line in enumerate(lines, 1)
            if len(line) > WIDTH]
    assert not wide, "\n".join(wide[:10])


def sections() -> list[tuple[str, set[int], int, int]]:
    """(name, chapters, first line, last non-blank line) of each banner of tah.py, in order."""
    lines = (ROOT / "tah.py").read_text(encoding="utf-8").splitlines()
    starts = [(i, m) for i, line in enumerate(lines, 1) if (m := BANNER.match(line))]
    out = []
    for (i, m), (j, _) in zip(starts, starts[1:] + [(len(lines) + 1, None)]):
        last = max(k for k in range(i, j) if lines[k - 1].strip())
        out.append((m[1], {int(c) for c in re.findall(r"\d+", m[2])}, i, last))
    return out


def test_the_header_lists_the_sections_in_order():
    header = (ROOT / "tah.py").read_text(encoding="utf-8").split('"""')[1]
    listed = re.findall(r"([\w' -]+?) \((chapters? [\d, and]+)\)", " ".join(header.split()))
    banners = [(name, chapters) for name, chapters, _, _ in sections()]
    assert [(n.strip(" |"), {int(c) for c in re.findall(r"\d+", ch)}) for n, ch in listed] == \
        banners, "tah.py's header and its `# ---` banners disagree"


def test_the_tutorial_map_gives_each_sections_lines():
    """Each chapter row of tutorial/README.md names the sections whose banner names that chapter,
    each with the lines it spans (banner to last line), so the map cannot go stale."""
    real = {name: (chapters, a, b) for name, chapters, a, b in sections()}
    table = (ROOT / "tutorial" / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| \[(\d+)\. .*\| (.*) \|$", table, re.M)
    assert len(rows) == 10, "one table row per chapter, 0 to 9"
    want = "\n".join(f"{name} ({a}-{b})" for name, (_, a, b) in real.items())
    for chapter, cell in rows:
        given = re.findall(r"([\w' -]+?) \((\d+)-(\d+)\)", cell)
        names = [n.strip() for n, _, _ in given]
        assert names == [n for n, (chs, _, _) in real.items() if int(chapter) in chs], \
            f"chapter {chapter}: the sections whose banner names it, in file order"
        for name, a, b in given:
            assert real[name.strip()][1:] == (int(a), int(b)), \
                f"chapter {chapter}: {name.strip()} spans other lines now; tah.py's are:\n{want}"
