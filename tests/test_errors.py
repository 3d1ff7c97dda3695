"""Hydra's composition errors as the one line the README promises (gnsrepro.errors.hydra_error_line),
through gnsrepro.cli.precompose, which every command runs before Hydra does."""

from __future__ import annotations

from pathlib import Path

import pytest

from gnsrepro.cli import conf_dir, precompose
from gnsrepro.errors import ConfigError

CONF = Path(conf_dir())  # the nested experiment options are listed too (experiment=schedule/small)


def refusal(command: str, *argv: str) -> str:
    with pytest.raises(ConfigError) as refused:
        precompose(command, list(argv))
    message = str(refused.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override, expected", [
    ("gns=bogus", "gns=bogus is not known (no conf/gns/bogus.yaml); accepted: all, ln, off"),
    ("data=bogus", "data=bogus is not known (no conf/data/bogus.yaml); accepted: openwebtext, pycode, textdir"),
    ("experiment=nope", "experiment=nope is not known (no conf/experiment/nope.yaml); accepted: " + ", ".join(
        sorted(p.relative_to(CONF / "experiment").with_suffix("").as_posix()
               for p in (CONF / "experiment").rglob("*.yaml")))),
    ("model.n_layr=3", "model.n_layr=3: there is no setting model.n_layr; did you mean model.n_layer?"),
    ("model.zzz=1", "model.zzz=1: there is no setting model.zzz; model accepts: model.name, model.n_layer, "
                    "model.n_head, model.n_embd, model.block_size, model.vocab_size, model.bias, model.dropout, "
                    "model.cosine_attn_blocks, model.attention, model.sdpa_backend, model.loss_kernel"),
    ("seq_len=1.5", "seq_len=1.5: seq_len takes an integer or null"),
    ("resume=maybe", "resume=maybe: resume takes true or false"),
    ("model.cosine_attn_blocks=abc", "model.cosine_attn_blocks=abc: model.cosine_attn_blocks takes a list of "
                                     "integers such as [0, 1]"),
    ("optim.lr=1,2", "optim.lr=1,2 is a sweep: add -m to run one job per value, or write optim.lr=[1,2] for a list, "
                     "optim.lr='1,2' for a string"),
    ("optim.lr=[1", "cannot read the override 'optim.lr=[1': no viable alternative at input '[1' (the grammar: "
                    "https://hydra.cc/docs/advanced/override_grammar/basic/)"),
])
def test_train_override_errors(override, expected):
    assert refusal("train", override, "max_steps=1") == expected


def test_group_options_are_the_yaml_files_not_the_stored_schemas():
    message = refusal("train", "schedule=nope")
    assert message.startswith("schedule=nope is not known (no conf/schedule/nope.yaml); accepted: ")
    assert "constant" in message and "_schema" not in message


def test_a_hydra_group_outside_conf_lists_hydras_options():
    assert refusal("train", "hydra/launcher=nope") == "hydra/launcher=nope is not known; accepted: basic"


@pytest.mark.parametrize("command, override, expected", [
    ("cost", "seq_lem=256", "seq_lem=256: there is no setting seq_lem; did you mean seq_len?"),
    ("bench", "model=nope", "model=nope is not known (no conf/model/nope.yaml); accepted: 1.3B, 111M, 161M, 20M, "
                            "40M, 70M, tiny"),
    ("prepare", "data.max_bytes=lots", "data.max_bytes=lots: data.max_bytes takes an integer"),
    ("prepare", "force=yes please", "force=yes please: force takes true or false"),
])
def test_every_command_gets_the_one_line(command, override, expected):
    assert refusal(command, override) == expected


def test_flags_that_print_help_or_use_another_config_are_left_to_hydra():
    for argv in (["--help", "model=nope"], ["--hydra-help"], ["--info", "model=nope"], ["--config-name", "x"]):
        precompose("train", argv)  # no error here: Hydra handles these itself
    precompose("no_such_command", ["model=nope"])  # no conf/no_such_command.yaml: nothing to compose
