"""`gnsrepro reproduce`: every plan composes; a plan's parts run as commands, a failing part is recorded and named
in REPORT.md while the others still run and report; globs expand; the report's numbers come from the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gnsrepro.cli import conf_dir
from gnsrepro.config import register_configs
from gnsrepro.errors import ConfigError
from gnsrepro.reproduce import expand_globs, plan_parts, run_reproduce

PLANS = sorted(p.stem for p in (Path(conf_dir()) / "plan").glob("*.yaml"))


def reproduce_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("reproduce", overrides=list(overrides))


@pytest.mark.parametrize("plan", PLANS)
def test_every_plan_composes_and_names_known_commands(plan):
    from gnsrepro.cli import TASKS

    cfg = reproduce_cfg(f"plan={plan}")
    parts = plan_parts(cfg.plan)
    assert parts[-1]["name"] == "figures" and len({p["name"] for p in parts}) == len(parts)
    for part in parts:
        for argv in part["commands"]:
            if argv[0] == "torchrun":  # torchrun [options] -m gnsrepro <command> ...
                argv = argv[argv.index("gnsrepro") + 1:]
            command = argv[0] if argv[0] != "-m" else argv[1]
            assert command in TASKS, f"plan {plan}, part {part['name']}: {argv}"
    assert cfg.plan.report.get("cost_model")


def test_globs_expand_to_a_sorted_list(tmp_path):
    for name in ("b-seed1", "a-seed0", "other"):
        (tmp_path / name).mkdir()
    assert expand_globs(["plot", f"run={tmp_path}/*-seed*", "x=1"]) == [
        "plot", f"run={tmp_path}/a-seed0,{tmp_path}/b-seed1", "x=1"]
    assert expand_globs([f"run={tmp_path}/none*"]) == [f"run={tmp_path}/none*"]


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "rep"
    plan = OmegaConf.create({
        "name": "test", "out_dir": str(out), "about": "a test plan",
        "parts": [{"name": "broken", "minutes": 0.1, "commands": ["train model=no_such max_steps=1"]},
                  {"name": "costs", "minutes": 0.1, "commands": ["cost model=tiny seq_len=64"]}],
        "figures_minutes": 0.1,
        "figures": [{"name": "cost", "command": f"plot figure=cost model=tiny seq_len=64 out={out}/figures/cost",
                     "caption": "the cost figure"}],
        "report": {"cost_model": "111M", "cost_seq_len": 2048, "correlation_run": str(tmp_path / "missing")},
    })
    cfg = OmegaConf.create({"plan": plan, "part": None, "force": False})
    report = run_reproduce(cfg).read_text()
    status = json.loads((out / "status.json").read_text())
    assert status["broken"]["status"] == "failed" and status["broken"]["exit"] == 2
    assert "model=no_such is not known" in status["broken"]["output"]
    assert status["costs"]["status"] == "ok" and status["figures"]["status"] == "ok"
    assert "| broken | failed: `gnsrepro train model=no_such max_steps=1` exited 2 |" in report
    assert "![cost](figures/cost.png)" in report and (out / "figures" / "cost.png").exists()
    # the headline numbers: the cost model's, and a missing run reported as missing
    from gnsrepro.report import cost_numbers

    ghost = cost_numbers("111M", 2048)["ghost"]
    assert f"Li et al. {100 * ghost:.1f} %" in report
    assert "Claim 2: LayerNorm GNS against total GNS | not measured (ConfigError: run directory" in report
    printed = capsys.readouterr().out
    assert "[1/3] part broken" in printed and "[3/3] part figures" in printed
    # one part alone, then the report alone from what is there
    run_reproduce(OmegaConf.create({"plan": plan, "part": "costs", "force": False}))
    assert json.loads((out / "status.json").read_text())["broken"]["status"] == "failed"  # kept
    with pytest.raises(ConfigError, match="part=nope is not a part of plan=test; accepted: broken, costs, figures"):
        run_reproduce(OmegaConf.create({"plan": plan, "part": "nope", "force": False}))


@pytest.mark.parametrize("plan,part_limit", [("tiny", 20), ("small", 10)])
def test_a_plans_parts_fit_its_time_limits(plan, part_limit):
    """tiny: the whole plan in 20 minutes on a CPU (its minutes are measured ones); small: each part in 10 minutes on
    one GPU, the longest a device call may run (its minutes are estimates until a whole run has measured them)."""
    cfg = reproduce_cfg(f"plan={plan}").plan
    minutes = {p.name: float(p.minutes) for p in cfg.parts}
    assert all(m <= part_limit for m in minutes.values()), minutes
    if plan == "tiny":
        assert sum(minutes.values()) + float(cfg.figures_minutes) <= 20, minutes


def test_status_merges_the_parts_that_ran_elsewhere_newest_first(tmp_path):
    """Parts run on a GPU machine come back as status-<name>.json beside status.json; each part's newest entry
    counts, and the report's table says where and when each one ran."""
    from gnsrepro.reproduce import StatusFile

    out = tmp_path / "reproduce"
    out.mkdir()
    gpu = {"status": "ok", "seconds": 300.0, "device": "NVIDIA H200", "finished": "2026-11-30T10:00:00+00:00"}
    (out / "status-correlation.json").write_text(json.dumps({"correlation": gpu, "schedule0": {
        **gpu, "status": "failed", "command": "gnsrepro train", "exit": 1, "finished": "2026-11-30T10:05:00+00:00"}}))
    local = {"schedule0": {**gpu, "device": "CPU (2 cores)", "finished": "2026-11-29T09:00:00+00:00"}}
    (out / "status.json").write_text(json.dumps(local))
    status = StatusFile(out / "status.json")
    assert status.parts["correlation"] == gpu
    assert status.parts["schedule0"]["status"] == "failed"  # the GPU's later run, not the older local one
    status.record("figures", status="ok", seconds=1.0)
    entry = json.loads((out / "status.json").read_text())["figures"]
    assert entry["device"] and entry["finished"] > gpu["finished"]
    assert set(StatusFile(out / "status.json").parts) == {"correlation", "schedule0", "figures"}


def test_a_figure_that_cannot_be_drawn_does_not_keep_the_others_from_being_drawn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = OmegaConf.create({
        "name": "test", "out_dir": "rep", "parts": [], "figures_minutes": 0.1,
        "figures": [{"name": "schedule", "command": "plot figure=schedule run=missing out=rep/figures/schedule",
                     "caption": "no runs"},
                    {"name": "cost", "command": "plot figure=cost model=tiny seq_len=64 out=rep/figures/cost",
                     "caption": "the cost figure"}],
        "report": {"cost_model": "tiny", "cost_seq_len": 64}})
    report = run_reproduce(OmegaConf.create({"plan": plan, "part": "figures", "force": False})).read_text()
    status = json.loads(Path("rep/status.json").read_text())["figures"]
    assert status["status"] == "failed" and "figure=schedule" in status["command"]
    assert Path("rep/figures/cost.png").exists() and "![cost](figures/cost.png)" in report


def test_publish_copies_the_report_and_the_runs_small_files_and_refuses_without_a_report(tmp_path, monkeypatch):
    """part=publish: the report (figure links into the copy), the figures and every input run's tables, config and
    provenance land under publish.dir mirroring their paths; no checkpoint, PDF or .hydra/ file; a hand-written
    file named in keep survives; a run dropped from the outputs is dropped from the copy."""
    monkeypatch.chdir(tmp_path)
    findings = tmp_path / "pub" / "findings.md"
    findings.parent.mkdir()
    findings.write_text("The numbers, said.\n\n## cost\nThe cost figure agrees.\n")
    plan = OmegaConf.create({
        "name": "test", "out_dir": "outputs/rep", "parts": [], "figures_minutes": 0.1,
        "figures": [{"name": "cost", "command": "plot figure=cost model=tiny seq_len=64 out=outputs/rep/figures/cost",
                     "caption": "the cost figure"}],
        "report": {"cost_model": "tiny", "cost_seq_len": 64, "findings": "pub/findings.md"},
        "publish": {"dir": "pub", "inputs": ["outputs/rep", "outputs/runs", "outputs/never_ran"],
                    "keep": ["findings.md"]}})
    cfg = OmegaConf.create({"plan": plan, "part": "publish", "force": False})
    with pytest.raises(ConfigError, match="outputs/rep/REPORT.md does not exist"):
        run_reproduce(cfg)
    for run in ("a-seed0", "b-seed0"):
        d = Path("outputs/runs") / run
        (d / ".hydra").mkdir(parents=True)
        for name in ("metrics.parquet", "gns.parquet", "config.yaml", "meta.json", "ckpt.pt", ".hydra/config.yaml"):
            (d / name).write_text(name)
    run_reproduce(OmegaConf.create({**cfg, "part": "figures"}))
    report = Path("pub/REPORT.md")
    assert run_reproduce(cfg) == report
    text = report.read_text()
    assert "![cost](outputs/rep/figures/cost.png)" in text and Path("pub/outputs/rep/figures/cost.png").exists()
    assert "cp -rn pub/outputs/. outputs/" in text
    assert "## What the numbers say\n\nThe numbers, said." in text and "The cost figure agrees." in text
    published = {p.relative_to("pub").as_posix() for p in Path("pub").rglob("*") if p.is_file()}
    for run in ("a-seed0", "b-seed0"):
        assert {f"outputs/runs/{run}/{n}" for n in ("metrics.parquet", "gns.parquet", "config.yaml", "meta.json")} \
            <= published
    assert not any(p.endswith((".pt", ".pdf")) or "/.hydra/" in p for p in published), published
    assert "findings.md" in published and findings.read_text().startswith("The numbers, said.")
    import shutil

    shutil.rmtree("outputs/runs/b-seed0")
    run_reproduce(cfg)
    assert not Path("pub/outputs/runs/b-seed0").exists() and Path("pub/outputs/runs/a-seed0/meta.json").exists()


def test_findings_name_only_the_plans_figures(tmp_path):
    from gnsrepro.report import read_findings, write_report

    path = tmp_path / "findings.md"
    path.write_text("Overall.\n\n## phase\nOn the phase plot.\n\n## nosuch\nx\n")
    assert read_findings(path) == ("Overall.", {"phase": "On the phase plot.", "nosuch": "x"})
    assert read_findings(tmp_path / "absent.md") == ("", {})
    plan = OmegaConf.create({"name": "t", "out_dir": str(tmp_path / "rep"), "parts": [],
                             "figures": [{"name": "phase", "command": "plot figure=phase", "caption": "c"}],
                             "report": {"findings": str(path)}})
    with pytest.raises(ConfigError, match="sections nosuch name no figure of plan=t"):
        write_report(plan, {})
