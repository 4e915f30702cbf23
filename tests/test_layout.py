"""The repository's shape: no line of the three main files is wider than 100 columns."""
import pytest

from conftest import ROOT

WIDTH = 100


@pytest.mark.parametrize("name", ["tah.py", "train.py", "generate.py"])
def test_no_line_is_wider_than_100_columns(name):
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    wide = [f"{name}:{i}: {len(line)} columns" for i, line in enumerate(lines, 1)
            if len(line) > WIDTH]
    assert not wide, "\n".join(wide[:10])
