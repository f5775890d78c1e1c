"""pyproject.toml: every console script names a callable that exists, and the dependencies are
requirements.txt's (one list of pins, kept in two files)."""

from __future__ import annotations

import importlib
import pathlib
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _project():
  return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_console_scripts_resolve():
  scripts = _project()["scripts"]
  assert {"ldae-train", "ldae-evaluate", "ldae-convert"} <= set(scripts)
  for name, target in scripts.items():
    module, _, attr = target.partition(":")
    if module == "ldae_jax.cli.train" or module == "ldae_jax.cli.evaluate":
      continue  # importing both would define the absl flag --config twice in one process; checked below
    assert callable(getattr(importlib.import_module(module), attr)), name
  for module in ("ldae_jax.cli.train", "ldae_jax.cli.evaluate"):
    source = (REPO / (module.replace(".", "/") + ".py")).read_text()
    assert "\ndef run() -> None:" in source and "def main(argv)" in source


def test_dependencies_match_requirements_txt():
  reqs = [l.strip() for l in (REPO / "requirements.txt").read_text().splitlines()
          if l.strip() and not l.startswith("#")]
  assert sorted(_project()["dependencies"] + _project()["optional-dependencies"]["test"]) == sorted(reqs)
