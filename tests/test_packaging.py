"""The built wheel carries the Hydra configs: installed outside the checkout, it runs on its own.

conf/ lives at the repository root (what users edit); pyproject.toml maps it into the package
as `dist_trainer/conf/`, and `dist_trainer.config.CONF_DIR` finds it there once installed. The
wheel is built from a copy of the working tree (no build/ or egg-info left in the checkout),
offline (`--no-build-isolation --no-index`: the venv's setuptools), and installed with
`--no-deps` into a fresh venv that sees this venv's packages (torch, Ray, ...) through a .pth
file placed after its own site-packages, so nothing is downloaded. Every command runs from a
folder outside the checkout with PYTHONPATH unset (conftest points it at the checkout).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# What a build needs from the working tree (MANIFEST.in only if the project has one).
_SOURCES = ("pyproject.toml", "README.md", "MANIFEST.in", "dist_trainer", "conf")


@dataclass
class Installed:
    wheel: Path
    venv: Path
    python: Path
    cli: Path
    workdir: Path  # outside the checkout: the commands' cwd


def _env() -> dict[str, str]:
    """os.environ without PYTHONPATH (the checkout), torchrun's variables or pip's network."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for key in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def _run(cmd: list[str | Path], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("packaging")
    assert ROOT not in tmp.parents, f"the test folder {tmp} must lie outside the checkout"
    src = tmp / "src"
    src.mkdir()
    for name in _SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", dist, src],
        cwd=tmp,
    )
    (wheel,) = dist.glob("dist_trainer-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    own = Path(_run([python, "-c", purelib], tmp).stdout.strip())
    # A .pth line is appended to sys.path after the venv's own site-packages, and the .pth
    # files in that folder (this checkout's editable install) are not run.
    (own / "zz_dist_trainer_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed"]
        + [wheel],
        cwd=tmp,
    )
    workdir = tmp / "work"
    workdir.mkdir()
    return Installed(wheel, venv, python, venv / "bin" / "dist-trainer", workdir)


def test_wheel_holds_every_config(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {f"dist_trainer/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert "dist_trainer/conf/config.yaml" in names
    assert len(expected) > 10, "conf/ should hold the config and its groups"
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"


def test_installed_package_reads_its_own_configs(installed: Installed) -> None:
    probe = (
        "import json, dist_trainer; from dist_trainer.config import CONF_DIR; "
        "print(json.dumps([dist_trainer.__file__, str(CONF_DIR)]))"
    )
    out = _run([installed.python, "-c", probe], installed.workdir).stdout
    module, conf_dir = map(Path, json.loads(out.strip().splitlines()[-1]))
    assert installed.venv in module.parents, f"imported {module}, not the installed package"
    assert ROOT not in module.parents
    assert conf_dir == module.parent / "conf"
    assert (conf_dir / "config.yaml").is_file()


def test_installed_cli_composes_a_preset(installed: Installed) -> None:
    out = _run(
        [installed.cli, "train", "--cfg", "job", "experiment=digits_cnn"], installed.workdir
    ).stdout
    assert "_target_: dist_trainer.models.SmallCNN" in out, out
    assert "_target_: dist_trainer.data.digits" in out, out
    assert "experiment: digits_cnn" in out, out


def test_installed_package_trains_a_short_job(installed: Installed) -> None:
    from mlflow.tracking import MlflowClient

    tmp = installed.workdir.parent
    uri = f"sqlite:///{tmp / 'm.db'}"
    _run(
        [installed.python, "-m", "dist_trainer.torchrun", "trainer.max_steps=2"]
        + [f"tracking.uri={uri}", f"scaling.storage_path={tmp / 's'}", "scaling.use_gpu=false"]
        + ["tracking.system_metrics=false", "tracking.experiment=packaging_test"],
        installed.workdir,
        timeout=180,
    )
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("packaging_test").experiment_id])
    assert run.info.status == "FINISHED"
    assert "val/loss" in run.data.metrics
