"""The console entry point: help, dispatch, and a non-editable install that finds its configs."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_the_commands():
    r = subprocess.run([sys.executable, "-m", "gnsrepro", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0
    for command in ("prepare", "train", "bench", "cost"):
        assert f"  {command} " in r.stdout


def test_unknown_command_names_the_accepted_ones():
    r = subprocess.run([sys.executable, "-m", "gnsrepro", "trian"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "unknown command 'trian'; accepted: prepare, train, bench, cost" in r.stderr


def test_non_editable_install_ships_the_configs(tmp_path):
    """pip install (not -e) copies conf/ into the package; Hydra must find it there, far from the checkout."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (target / "gnsrepro" / "conf" / "model" / "111M.yaml").is_file()
    # -S: skip site-packages' .pth files, so an editable install of the checkout cannot shadow the copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *site.getsitepackages()])}
    code = "import gnsrepro.cli as c; print(c.__file__); c.main(['cost', 'model=111M', 'seq_len=256'])"
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(str(target))
    assert "model 111M" in r.stdout and "simultaneous" in r.stdout
