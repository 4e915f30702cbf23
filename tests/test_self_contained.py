"""The test suite reads nothing outside the repository: a user's clone has no sibling folders."""
from conftest import ROOT

POINTERS = ["ROOT.parent", "/".join(["..", "shared"]), '"shared" /']  # ways to name a sibling


def test_no_project_file_names_a_folder_beside_the_checkout():
    """Scripts, tests, benchmarks and the tutorial's code never point above the repository."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("tutorial/*.py"), *ROOT.glob("tutorial/*.md")]
    bad = [f"{f.relative_to(ROOT)}: {line.strip()}" for f in files if f.name != "test_self_contained.py"
           for line in f.read_text().splitlines()
           if any(pattern in line for pattern in POINTERS)]
    assert not bad, bad
