"""The repository's shape: no line of the three main files is wider than 100 columns."""
import pytest

from conftest import ROOT

WIDTH = 100
# TODO(coordinator): train.py and generate.py are being shortened on other branches; drop this
# list (check all three files) once they are merged.
NOT_YET = {"train.py", "generate.py"}


@pytest.mark.parametrize("name", ["tah.py", "train.py", "generate.py"])
def test_no_line_is_wider_than_100_columns(name):
    if name in NOT_YET:
        pytest.skip(f"{name}: still over {WIDTH} columns on this branch (see the TODO above)")
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    wide = [f"{name}:{i}: {len(line)} columns" for i, line in enumerate(lines, 1)
            if len(line) > WIDTH]
    assert not wide, "\n".join(wide[:10])
