"""The committed report of a plan with a publish section (the small scale's docs/reproduce/small/): its headline
numbers are what the committed code computes from the committed tables, so a change to the analysis that moves
them fails here until the report is rewritten (`gnsrepro reproduce plan=<scale> part=report`, then
`part=publish`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gnsrepro.cli import conf_dir
from gnsrepro.config import register_configs
from gnsrepro.report import write_report

REPO = Path(__file__).resolve().parent.parent


def published_plans() -> list[str]:
    register_configs()
    plans = []
    for path in sorted((Path(conf_dir()) / "plan").glob("*.yaml")):
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            plan = compose("reproduce", overrides=[f"plan={path.stem}"]).plan
        if plan.get("publish") and (REPO / plan.publish.dir / "REPORT.md").exists():
            plans.append(path.stem)
    return plans


def headline_rows(report: str) -> list[str]:
    section = report.split("## Headline numbers", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| what")]


@pytest.mark.parametrize("name", published_plans())
def test_the_published_headline_numbers_come_from_the_published_tables(name, tmp_path, monkeypatch):
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        plan = compose("reproduce", overrides=[f"plan={name}"]).plan
    published = REPO / plan.publish.dir
    shutil.copytree(published / "outputs", tmp_path / "outputs")  # the restore its REPORT.md describes
    monkeypatch.chdir(tmp_path)
    rewritten = write_report(plan, {}).read_text()
    committed = headline_rows((published / "REPORT.md").read_text())
    assert committed and headline_rows(rewritten) == committed
