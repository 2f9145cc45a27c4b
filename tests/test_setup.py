"""The README's set-up commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert "torch==2.13.0" in demo and "lorex demo" in demo
    assert "torch==2.13.0" in tests and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    # CI adds quiet flags and calls python3; otherwise the command is the README's.
    normalised = ci.replace("pip install -q ", "pip install ")
    assert tests in normalised


def test_torch_requirement_is_a_range():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.3"' in pyproject and "torch==" not in pyproject


def test_code_passes_ruff():
    import shutil
    import subprocess
    import sys

    import pytest

    if shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists():
        pytest.skip("ruff is not installed (it comes with the test extra)")
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
