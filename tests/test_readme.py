"""The README's Python code runs as written (each ```python block, in order, in one namespace)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_has_python_blocks_and_each_runs(capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README has no Python block"
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)
    # the library example: rank-5 data plus a little noise, so the fit it shows is a good one
    res = namespace["res"]
    assert res.F.shape == (5, 300) and namespace["F_new"].shape == (5, 40)
    assert res.converged and res.n_active == 5 and max(res.relative_errors.values()) < 0.05
    assert capsys.readouterr().out.strip()
