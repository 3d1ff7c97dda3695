"""The README's table of main training settings states the defaults that `gnsrepro train` composes."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gnsrepro.cli import conf_dir
from gnsrepro.config import register_configs

README = Path(__file__).resolve().parents[1] / "README.md"
GROUPS = {"model": "model.name", "schedule": "schedule.name", "gns": "gns.mode"}  # a config group: its choice
DESCRIBED = {"-", "end of run", "model.block_size"}  # defaults the table describes rather than states


def make_cfg():
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("train")


def settings_table() -> list[tuple[list[str], list[str]]]:
    """(keys, defaults) per row of the README's "Main training settings" table."""
    text = README.read_text()
    table = text.split("### Main training settings", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines()[2:]:
        keys_cell, default_cell = (cell.strip() for cell in line.strip("|").split("|")[:2])
        keys = re.findall(r"`([^`]+)`", keys_cell)
        assert keys, f"README settings row without a `key`: {line}"
        rows.append((keys, [d.strip() for d in default_cell.split(",")]))
    return rows


def test_readme_settings_table_is_found():
    keys = [k for row in settings_table() for k in row[0]]
    assert {"model", "gns.ln_backend", "cuda_graphs", "model.loss_kernel", "log_interval"} <= set(keys)


@pytest.mark.parametrize("keys, defaults", settings_table(), ids=lambda v: ",".join(v) if isinstance(v, list) else v)
def test_readme_default_is_the_config_default(keys, defaults):
    cfg = make_cfg()
    if len(defaults) != len(keys):  # one default for several keys ("`max_steps` / `max_tokens` | -")
        assert defaults == ["-"], (keys, defaults)
        assert all(OmegaConf.select(cfg, k) is None for k in keys), keys
        return
    for key, default in zip(keys, defaults):
        if default in DESCRIBED or "<" in default:  # out_dir's outputs/\<model\>-...
            continue
        value = OmegaConf.select(cfg, GROUPS.get(key, key), throw_on_missing=True)
        if isinstance(value, bool):
            assert str(value).lower() == default, key
        elif isinstance(value, (int, float)):
            assert value == float(default), key
        else:
            assert str(value) == default, key
