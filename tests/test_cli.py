"""The console entry point: help, dispatch, a non-editable install that finds its configs, and user errors
as one line before anything is written (a bad override, a bad job of a sweep, data prepared otherwise)."""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

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


# ---- user errors: one line, exit 2, nothing written (issue 14) ------------------------------------------


def cli(args: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    """`gnsrepro <args>` in a fresh process, run in cwd (where a default out_dir or data_dir would go)."""
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra_env)
    return subprocess.run([sys.executable, "-m", "gnsrepro", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def one_error_line(r: subprocess.CompletedProcess, command: str) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gnsrepro {command}: error: "), r.stderr[-3000:]
    return lines[0].removeprefix(f"gnsrepro {command}: error: ")


def test_composition_errors_are_one_line_and_write_nothing(tmp_path):
    for args, expected in [
        (["model=no_such"], "model=no_such is not known (no conf/model/no_such.yaml); accepted: 1.3B, 111M, 161M, "
                            "20M, 40M, 70M, tiny"),
        (["max_stepz=5"], "max_stepz=5: there is no setting max_stepz; did you mean max_steps or max_tokens?"),
        (["optim.lr=abc"], "optim.lr=abc: optim.lr takes a number"),
    ]:
        r = cli(["train", *args, "max_steps=1"], tmp_path)
        assert one_error_line(r, "train") == expected
    r = cli(["prepare", "data=bogus"], tmp_path)
    assert one_error_line(r, "prepare") == ("data=bogus is not known (no conf/data/bogus.yaml); accepted: "
                                            "openwebtext, pycode, textdir")
    assert not any(tmp_path.iterdir())  # no outputs/, data/, or log file


def test_hydra_full_error_still_gives_hydras_error(tmp_path):
    r = cli(["train", "model=no_such", "max_steps=1"], tmp_path, HYDRA_FULL_ERROR="1")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "Could not find 'model/no_such'" in r.stderr


def test_help_and_cfg_job_still_work(tmp_path):
    r = cli(["train", "--help"], tmp_path)
    assert r.returncode == 0 and "== Configuration groups ==" in r.stdout
    r = cli(["train", "--cfg", "job", "model=20M", "optim.lr=3e-4"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "name: 20M" in r.stdout and "lr: 0.0003" in r.stdout
    assert not any(tmp_path.iterdir())


def test_refused_train_leaves_no_out_dir_and_no_log(tmp_path):
    out = tmp_path / "run"
    r = cli(["train", "optim.lr=-1", "max_steps=1", f"out_dir={out}", f"data.data_dir={tmp_path / 'data'}"], tmp_path)
    assert one_error_line(r, "train") == "optim.lr=-1.0 must be a positive number"
    assert not any(tmp_path.iterdir())  # no out_dir (and no cli.log in it), no data/


def test_a_sweep_with_a_bad_job_runs_no_job(tmp_path):
    sweep = tmp_path / "sweep"
    r = cli(["train", "-m", "optim.lr=1e-3,-1", "max_steps=1", f"hydra.sweep.dir={sweep}",
             f"data.data_dir={tmp_path / 'data'}"], tmp_path)
    assert one_error_line(r, "train") == ("the sweep's job 1 (optim.lr=-1): optim.lr=-1.0 must be a positive number; "
                                          "no job was run")
    assert not any(tmp_path.iterdir())  # the valid job 0 did not run either: no sweep dir, no data
    r = cli(["train", "-m", "model=tiny,no_such", "max_steps=1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert "model=no_such is not known" in one_error_line(r, "train")
    r = cli(["train", "-m", "optim.lr=1e-3,3e-3", "data=textdir", f"data.path={tmp_path / 'absent'}", "max_steps=1",
             f"hydra.sweep.dir={sweep}"], tmp_path)
    assert f"data.path={tmp_path / 'absent'} is not a directory" in one_error_line(r, "train")
    assert not any(tmp_path.iterdir())


def test_a_sweep_job_refused_at_run_time_leaves_no_empty_directories(tmp_path):
    """An empty corpus shows only when job 0 prepares it: Hydra has made the sweep and job directories."""
    (tmp_path / "empty").mkdir()
    r = cli(["train", "-m", "optim.lr=1e-3,3e-3", "data=textdir", f"data.path={tmp_path / 'empty'}", "max_steps=1",
             f"hydra.sweep.dir={tmp_path / 'sweep'}", "data.num_proc=1"], tmp_path)
    assert r.returncode == 2 and "need at least 2" in r.stderr, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_sweep_jobs_are_those_of_hydras_basic_sweeper():
    from hydra import initialize_config_dir

    from gnsrepro.cli import conf_dir, sweep_jobs
    from gnsrepro.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        jobs = sweep_jobs("train", ["optim.lr=1e-3,3e-3", "max_steps=2", "model=tiny,20M"])
    assert jobs == [["optim.lr=0.001", "max_steps=2", "model=tiny"], ["optim.lr=0.001", "max_steps=2", "model=20M"],
                    ["optim.lr=0.003", "max_steps=2", "model=tiny"], ["optim.lr=0.003", "max_steps=2", "model=20M"]]


def test_sweep_jobs_that_need_one_data_set_prepared_two_ways_are_refused(tmp_path):
    from gnsrepro.cli import precompose
    from gnsrepro.errors import ConfigError

    data = tmp_path / "data"
    with pytest.raises(ConfigError) as refused:
        precompose("train", ["-m", "data.max_bytes=1000,2000", f"data.data_dir={data}", "max_steps=1"])
    assert str(refused.value) == (
        f"the sweep's job 0 (data.max_bytes=1000) and job 1 (data.max_bytes=2000) need {data.resolve()}/pycode "
        "prepared with different settings (data.max_bytes=1000 vs 2000); one data directory holds one prepared "
        "set: give the jobs their own data.data_dir; no job was run")
    precompose("train", ["-m", "optim.lr=1e-3,3e-3", f"data.data_dir={data}", "max_steps=1"])  # valid: no error
    with pytest.raises(ConfigError, match=re.escape(f"no prepared data in {data}/pycode and prepare_missing=false")):
        precompose("train", ["-m", "optim.lr=1e-3,3e-3", f"data.data_dir={data}", "max_steps=1",
                             "prepare_missing=false"])
    precompose("train", ["optim.lr=-1"])  # a single run checks its values itself (train.validate)


def _textdir(root: Path, docs: list[str]) -> Path:
    root.mkdir()
    for i, text in enumerate(docs):
        (root / f"{i}.txt").write_text(text)
    return root


def test_train_refuses_data_prepared_from_another_directory(tmp_path):
    """Issue 14: `prepare data=textdir data.path=A` then `train data=textdir data.path=B` trained on A."""
    a = _textdir(tmp_path / "A", ["corpus A, document one", "corpus A, document two"])
    b = _textdir(tmp_path / "B", ["corpus B, document one", "corpus B, document two"])
    work = tmp_path / "work"
    work.mkdir()
    r = cli(["prepare", "data=textdir", f"data.path={a}", "data.num_proc=1"], work)
    assert r.returncode == 0, r.stderr
    meta = (work / "data" / "textdir" / "meta.json").read_text()
    r = cli(["train", "data=textdir", f"data.path={b}", "max_steps=1", "out_dir=run"], work)
    line = one_error_line(r, "train")
    assert f"data.path={b} (prepared: {a})" in line and f"`gnsrepro prepare data=textdir data.path={b}`" in line
    assert not (work / "run").exists() and (work / "data" / "textdir" / "meta.json").read_text() == meta


def test_prepare_is_kept_when_up_to_date_and_rebuilt_on_force(tmp_path):
    a = _textdir(tmp_path / "A", ["corpus A, document one", "corpus A, document two"])
    work = tmp_path / "work"
    work.mkdir()
    args = ["prepare", "data=textdir", f"data.path={a}", "data.num_proc=1"]
    assert cli(args, work).stdout.startswith("prepared data/textdir: 2 documents")
    r = cli(args, work)
    assert r.returncode == 0 and r.stdout.startswith("data/textdir is up to date: prepared ")
    r = cli([*args, "force=true"], work)
    assert r.returncode == 0 and r.stdout.startswith("prepared data/textdir: 2 documents")


def test_refused_prepare_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    assert "at least 2" in one_error_line(cli(["prepare", "data=textdir", f"data.path={empty}"], work), "prepare")
    assert "data=textdir needs data.path=DIR" in one_error_line(cli(["prepare", "data=textdir"], work), "prepare")
    assert not any(work.iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_without_a_gpu_is_one_line(tmp_path):
    assert "bench layernorm needs a CUDA GPU" in one_error_line(cli(["bench", "layernorm"], tmp_path), "bench")
    line = one_error_line(cli(["bench", "train", "device=cuda", "model=tiny"], tmp_path), "bench")
    assert line == "device='cuda' but torch sees no CUDA GPU; use device=auto or device=cpu"
    assert not any(tmp_path.iterdir())


def test_list_settings_take_a_bare_comma_list_per_command():
    from gnsrepro.cli import bracket_list_overrides

    assert bracket_list_overrides(["figure=schedule", "run=a,b", "alphas=0.9,0.99"], "plot") == [
        "figure=schedule", "run=['a','b']", "alphas=[0.9,0.99]"]
    assert bracket_list_overrides(["run=a,b"], "train") == ["run=a,b"]  # train has no list settings: a sweep
