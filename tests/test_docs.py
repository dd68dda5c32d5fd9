"""The Python examples in docs/api.md run as written."""
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
  assert len(blocks) >= 2
  namespace = {}
  exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)  # pylint: disable=exec-used
  state = namespace["state"]
  assert int(state.step) == 6 and state.adv_fifo["image"].shape[0] == 2
