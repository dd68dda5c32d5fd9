"""The docs stay true to the code: docs/api.md's examples run, and every test they cite exists."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "api.md"
# docs/reliability.md abbreviates the test files it cites.
ABBREVIATIONS = {"R": "test_reliability.py", "V": "test_config_validation.py",
                 "T": "test_train.py", "I": "test_input_pipeline.py"}


def test_api_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
  assert len(blocks) >= 2
  namespace = {}
  exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)  # pylint: disable=exec-used
  state = namespace["state"]
  assert int(state.step) == 6 and state.adv_fifo["image"].shape[0] == 2


def test_every_test_the_docs_cite_exists():
  """A renamed or folded test must not leave the docs citing it as evidence."""
  cited = set()
  for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
    text = doc.read_text()
    for file, name in re.findall(r"tests/(test_\w+\.py)::(test_\w+)", text):
      cited.add((doc.name, file, name))
    for short, name in re.findall(r"\b([RVTI])::(test_\w+)", text):
      cited.add((doc.name, ABBREVIATIONS[short], name))
  assert len(cited) > 50, "the patterns no longer find the docs' citations"
  missing = sorted((doc, f"{file}::{name}") for doc, file, name in cited
                   if f"def {name}(" not in (REPO / "tests" / file).read_text())
  assert not missing, missing
