"""The test suite reads nothing outside the repository: a user's clone has no sibling folders."""
import pytest

from conftest import OPENED_OUTSIDE, ROOT, outside_repository


def test_guard_flags_a_sibling_folder_and_spares_the_repository(tmp_path):
    sibling = ROOT.parent.joinpath("shared")  # where the fixture once lived, beside the checkout
    assert outside_repository(sibling / "fixtures" / "official-tiny" / "config.json")
    assert outside_repository(ROOT.parent / "anything")
    assert not outside_repository(ROOT / "tests" / "fixtures" / "official-tiny" / "config.json")
    assert not outside_repository(ROOT / ".." / ROOT.name / "tah.py")  # resolved before comparing
    assert not outside_repository(tmp_path / "x")


def test_guard_sees_an_open_beside_the_checkout():
    """The audit hook records a real open() of a sibling path, even one that does not exist."""
    before = len(OPENED_OUTSIDE)
    with pytest.raises(OSError):
        open(ROOT.parent / "no-such-sibling-of-the-checkout" / "f.txt")
    assert OPENED_OUTSIDE[before:] == [str(ROOT.parent / "no-such-sibling-of-the-checkout" / "f.txt")]
    del OPENED_OUTSIDE[before:]  # this test opened it on purpose


POINTERS = ["ROOT.parent", "/".join(["..", "shared"]), '"shared" /']  # ways to name a sibling


def test_no_project_file_names_a_folder_beside_the_checkout():
    """Scripts, tests, benchmarks and the tutorial's code never point above the repository."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("tutorial/*.py"), *ROOT.glob("tutorial/*.md")]
    guard = ("conftest.py", "test_self_contained.py")  # they name it to look for it
    bad = [f"{f.relative_to(ROOT)}: {line.strip()}" for f in files if f.name not in guard
           for line in f.read_text().splitlines()
           if any(pattern in line for pattern in POINTERS)]
    assert not bad, bad
