"""environment.yml (conda/Binder) and pyproject.toml must pin the same packages; notebooks are valid nbformat 4.5."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def test_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_reqs = {_norm(r) for r in pip_list if not r.startswith("-e")}
    assert env_reqs == {_norm(r) for r in project}
    assert all("==" in r for r in project), "every dependency is pinned"


def test_ci_installs_what_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert "make test" in ci


def test_every_notebook_cell_has_an_id():
    """nbformat 4.5 requires cell ids; a cell without one makes every reader of the notebook warn."""
    import json

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "exercises").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = json.loads(path.read_text())
        missing = [i for i, cell in enumerate(nb["cells"]) if not cell.get("id")]
        assert not missing, f"{path.name}: cells {missing} have no id"
