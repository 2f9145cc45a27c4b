"""lorex.experiments sits above the library: nothing below imports it, and a finished stage is
reused only when its record matches."""

import ast
from pathlib import Path

from lorex.experiments import stages
from lorex.models.stamps import reusable, stage_record, stamp

LOREX = Path(__file__).resolve().parents[1] / "lorex"


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_only_the_cli_imports_the_experiments():
    for path in LOREX.rglob("*.py"):
        part = path.relative_to(LOREX).parts[0]
        if part in ("experiments", "cli", "cli.py", "__main__.py"):
            continue
        wrong = {n for n in _imported(path) if n.startswith("lorex.experiments")}
        assert not wrong, f"{path.relative_to(LOREX)} imports {sorted(wrong)}"


def test_a_stage_runs_once_per_record(tmp_path):
    made, lines = [], []

    def make():
        made.append(1)
        for name in ("config.json", "model.safetensors"):
            (tmp_path / "m" / name).write_text("{}")
        return "result"

    (tmp_path / "m").mkdir()
    value = stamp(stage=1, cfg={"lr": 1e-3})
    record = {"stamp": value}
    assert stages.run_stage(tmp_path / "m", record, make, "s", lines.append) == "result"
    assert stage_record(tmp_path / "m") == record and reusable(tmp_path / "m", value)
    assert stages.run_stage(tmp_path / "m", record, make, "s", lines.append) is None
    assert made == [1] and lines[-1].startswith("s: reusing")
    other = {"stamp": stamp(stage=1, cfg={"lr": 1e-4})}
    assert stages.run_stage(tmp_path / "m", other, make, "s", lines.append) == "result"
    assert made == [1, 1] and not reusable(tmp_path / "m", value)
