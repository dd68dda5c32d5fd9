"""The docs stay true to the code: api.md's examples run, every test they cite exists, and
architecture.md names every module and only what exists."""
import ast
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


def _top_level_names(tree: ast.AST) -> set[str]:
  names = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, ast.Assign):
      names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      names.add(node.target.id)
  return names


def test_architecture_names_every_module_and_only_what_exists():
  """docs/architecture.md matches the code: every module of the package is in it, and each
  module path, `module.name` and `Class.member` it names exists."""
  text = (REPO / "docs" / "architecture.md").read_text()
  assert "(docs/architecture.md)" in (REPO / "README.md").read_text(), "README links to it"
  modules = {p.relative_to(REPO).as_posix(): p for p in (REPO / "conadv_jax").rglob("*.py")
             if p.name != "__init__.py"}
  named = set(re.findall(r"conadv_jax/[\w/]+\.py", text))
  assert named - set(modules) == set(), "paths that do not exist"
  assert set(modules) - named == set(), "modules the architecture page does not place"
  trees = {p.stem: ast.parse(p.read_text()) for p in modules.values()}
  members = {}  # Class name -> its methods and fields.
  for tree in trees.values():
    for node in tree.body:
      if isinstance(node, ast.ClassDef):
        members[node.name] = _top_level_names(node) | {
            n.name for n in node.body if isinstance(n, ast.FunctionDef)}
  checked, missing = 0, []
  for owner, name in re.findall(r"`(\w+)\.(\w+)", text):
    if name == "py":
      continue  # A file name, checked above.
    if owner in trees:
      ok = name in _top_level_names(trees[owner])
    elif owner in members:
      ok = name in members[owner]
    else:
      continue  # Not a module or class of the package (e.g. `config.FIELD`).
    checked += 1
    if not ok:
      missing.append(f"{owner}.{name}")
  assert checked >= 10, "the pattern no longer finds the page's references"
  assert not missing, missing
  for name in re.findall(r"`(\w+)`", text):  # Bare names that look like code must exist too.
    if name[0].isupper() and name not in members and not name.isupper():
      missing.append(name)
  assert not missing, missing
