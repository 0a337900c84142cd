"""jaxdef as a user installs it: the wheel in a fresh venv, run outside the checkout.

The venv sees this machine's installed dependencies (``--system-site-packages``:
no network, no second copy of jax) but gets its own jaxdef from the wheel
(``--no-deps``), which must be the one that runs: the test checks that the
imported package lies in the venv, not in this checkout.
"""

import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_folder():
  listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
               ["packages"])
  found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "jaxdef").rglob("__init__.py")}
  assert listed == found | {"jaxdef.configs"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  """A fresh venv with the jaxdef wheel built from this checkout installed."""
  tmp = tmp_path_factory.mktemp("install")
  wheels = tmp / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(wheels), str(ROOT)], check=True, cwd=tmp, timeout=300)
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")],
                 check=True, timeout=300)
  pip = [str(tmp / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
         "--no-index"]
  subprocess.run([*pip, *map(str, wheels.glob("jaxdef-*.whl"))], check=True, timeout=300)
  return tmp


def _run(venv, *argv, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAXDEF_COMPILATION_CACHE="off",
             PYTHONPATH="")
  return subprocess.run([str(venv / "venv" / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_wheel_ships_the_command_and_the_configs(venv, tmp_path):
  where = _run(venv, "python", "-c", "import jaxdef, jaxdef.configs.default as d; "
               "print(jaxdef.__file__); print(d.__file__)", cwd=tmp_path)
  assert where.returncode == 0, where.stderr[-2000:]
  assert all(line.startswith(str(venv / "venv")) for line in where.stdout.split()), where.stdout
  listed = _run(venv, "jaxdef", "configs", cwd=tmp_path)
  assert listed.returncode == 0, listed.stderr[-2000:]
  assert "pgd_at\n" in listed.stdout and "cifar10_resnet18" in listed.stdout


def test_installed_command_trains_one_step_outside_the_checkout(venv, tmp_path):
  run = _run(venv, "jaxdef", "train", "--config", "default", "--workdir", "run",
             "--config.data.max_train=16", "--config.data.max_test=16",
             "--config.train.batch_size=16", "--config.train.epochs=1",
             "--config.attack.steps=1", "--config.attack.warmup_epochs=0.0",
             "--config.model.kwargs.width=0.25", "--config.train.eval_examples=16",
             "--config.train.eval_batch_size=16", "--config.train.eval_pgd_steps=1",
             cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  summary = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
  assert summary["split"] == "summary" and summary["steps"] == 1
