"""The tiny scale's headline numbers against tests/golden/tiny.json (issue #16): a change of the code that moves
what `make reproduce` reports at SCALE=tiny fails here, naming each number that moved.

The test runs, each as its own process as `gnsrepro reproduce` runs it, the commands of conf/plan/tiny.yaml's
prepare part, the training commands of its correlation part and its schedule part restricted to seed 0, read
through gnsrepro.reproduce's own plan loading (so they cannot drift from the plan). The commands run verbatim
in a temporary working directory, so the plan's relative data and out directories land there; seed=0 is the
only change. Training uses one thread (OMP_NUM_THREADS=1: one order of floating-point sums) and the CPU (the
tiny plan is the CPU's; CUDA_VISIBLE_DEVICES is emptied). Then gnsrepro.report's own functions compute the
numbers REPORT.md shows (`correlation_numbers`, `schedule_numbers`, `cost_numbers`), and each is compared with
its golden value within the tolerance the golden file states for it, and says why.

The golden numbers hold for the corpus they were measured on, which tiny.json's provenance names by the prepared
token files' sha256: `data=pycode` is the Python source the interpreter finds (README.md, "Data"), so
another Python or another set of installed packages is another corpus and other numbers; a mismatch then says so.

Updating, only with a reason (it is recorded in the file, with the date, the commit and torch's version):

    GNSREPRO_UPDATE_GOLDEN="why the numbers changed" .venv/bin/python -m pytest tests/test_golden.py

rewrites tests/golden/tiny.json with the measured values instead of asserting, keeping every tolerance and its
why; review `git diff tests/golden/tiny.json` and commit it with the change that moved the numbers.
tests/golden/README.md says how the tolerances were chosen.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gnsrepro.cli import conf_dir
from gnsrepro.config import register_configs
from gnsrepro.reproduce import plan_parts

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny.json"
UPDATE_ENV = "GNSREPRO_UPDATE_GOLDEN"
UPDATE_COMMAND = f'{UPDATE_ENV}="why the numbers changed" .venv/bin/python -m pytest tests/test_golden.py'
PLAN = "tiny"
SEED = 0
# the plan's parts whose commands the golden numbers need: the data, the correlation run and the schedule arms
PARTS = ("prepare", "correlation", "schedule")
CORRELATION_KEYS = ("r", "slope", "heldout_median", "heldout_p90", "detrended_r", "steps")
SCHEDULE_KEYS = ("tokens_saved", "steps_saved")  # time_saved is wall-clock: not golden
TOLERANCE_KEYS = ("abs_tol", "rel_tol")


# ---- the plan's commands ----------------------------------------------------------------------------
def load_plan(name: str = PLAN):
    """conf/plan/<name>.yaml as `gnsrepro reproduce plan=<name>` composes it."""
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("reproduce", overrides=[f"plan={name}"]).plan


def golden_commands(plan, seed: int = SEED) -> list[list[str]]:
    """The argv lists (after `gnsrepro`) behind the golden numbers: the prepare part's commands, the correlation
    part's training commands (its sweep only writes tables the report does not read) and the schedule part's
    training commands with their seed sweep replaced by `seed=<seed>`."""
    parts = {part["name"]: part for part in plan_parts(plan)}
    missing = [name for name in PARTS if name not in parts]
    assert not missing, f"plan {plan.name} has no part {', '.join(missing)}: the golden numbers need them"
    commands = [list(argv) for argv in parts["prepare"]["commands"]]
    commands += [list(argv) for argv in parts["correlation"]["commands"] if argv[0] == "train"]
    for argv in parts["schedule"]["commands"]:
        if argv[0] != "train":
            continue
        # the last seed override wins in Hydra: drop the plan's sweep, then name the one seed
        commands.append([arg for arg in argv if not arg.startswith("seed=")] + [f"seed={seed}"])
    return commands


def run_commands(commands: list[list[str]], cwd: Path, threads: int = 1) -> dict[str, float]:
    """Run each `python -m gnsrepro <argv>` in cwd with `threads` OpenMP threads on the CPU; {command: seconds}.

    The prepare commands run first, one after another; the training commands after them side by side, each its
    own process (they write to separate out dirs and only read the prepared data): with one thread each, a
    process's floating-point sums are the same whether another runs beside it, and on two cores the test takes
    the longest run's time instead of their sum."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    seconds = {}
    first = [argv for argv in commands if argv[0] == "prepare"]
    for stage in (first, [argv for argv in commands if argv[0] != "prepare"]):
        running = []
        for argv in stage:
            out = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: nothing blocks on a full pipe
            proc = subprocess.Popen([sys.executable, "-m", "gnsrepro", *argv], cwd=cwd, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, text=True)
            running.append(("gnsrepro " + shlex.join(argv), proc, out, time.perf_counter()))
        for line, proc, out, t0 in running:
            try:
                code = proc.wait(timeout=900)
            except subprocess.TimeoutExpired:
                for _, other, _, _ in running:
                    other.kill()
                raise
            seconds[line] = time.perf_counter() - t0
            out.seek(0)
            tail = "\n".join(out.read().splitlines()[-20:])
            out.close()
            if code != 0:
                for _, other, _, _ in running:
                    other.kill()
                    other.wait()
            assert code == 0, f"`{line}` (in {cwd}) exited {code}:\n{tail}"
    return seconds


# ---- the numbers ------------------------------------------------------------------------------------
def measured_numbers(plan, root: Path) -> dict[str, float]:
    """The golden numbers of the runs under root, computed by gnsrepro.report as REPORT.md computes them."""
    from gnsrepro.report import correlation_numbers, cost_numbers, schedule_numbers

    report = plan.report
    correlation = correlation_numbers(root / report.correlation_run)
    numbers = {f"correlation.{key}": float(correlation[key]) for key in CORRELATION_KEYS}
    schedule = schedule_numbers(root / report.schedule_runs)
    for arm in ("linear", "gns"):
        assert arm in schedule, f"no {arm} arm against the fixed one in {root / report.schedule_runs}: {schedule}"
        assert schedule[arm]["seeds"] == 1, schedule[arm]
        # one seed: the mean over seeds is that seed's saving (std and the t-test's p are NaN, not golden)
        numbers.update({f"schedule.{arm}.{key}_pct": schedule[arm][key][0] for key in SCHEDULE_KEYS})
    cost = cost_numbers(report.cost_model, int(report.cost_seq_len))
    numbers.update({f"cost.{method}.extra_flops_fraction": value for method, value in cost.items()})
    return numbers


def corpus_identity(data_root: Path) -> dict:
    """The prepared data sets under data_root by their token files' sha256 (from their meta.json)."""
    sets = {}
    for meta_path in sorted(data_root.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        sets[meta_path.parent.name] = {split: {"tokens": entry["tokens"], "sha256": entry["sha256"]}
                                       for split, entry in meta["splits"].items()}
    return sets


# ---- comparing and updating -------------------------------------------------------------------------
def tolerance(entry: dict) -> float:
    """The absolute difference an entry allows: abs_tol, or rel_tol x |value|."""
    if "abs_tol" in entry:
        return float(entry["abs_tol"])
    return float(entry["rel_tol"]) * abs(float(entry["value"]))


def mismatches(golden: dict, measured: dict[str, float]) -> list[str]:
    """One line per golden number the measurement misses by more than its tolerance (a NaN matches only NaN),
    or that one of the two lacks, in the golden file's order."""
    lines = []
    for name in [*golden["numbers"], *sorted(set(measured) - set(golden["numbers"]))]:
        entry = golden["numbers"].get(name)
        if entry is None:
            lines.append(f"{name}: measured {measured[name]!r} has no golden value")
            continue
        if name not in measured:
            lines.append(f"{name}: golden {entry['value']!r} was not measured")
            continue
        value, got = float(entry["value"]), float(measured[name])
        same = math.isnan(value) and math.isnan(got) or abs(got - value) <= tolerance(entry)
        if not same:
            allowed = (f"abs_tol {entry['abs_tol']:g}" if "abs_tol" in entry
                       else f"rel_tol {entry['rel_tol']:g} = {tolerance(entry):.3g}")
            lines.append(f"{name}: golden {value!r}, measured {got!r}, differs by {abs(got - value):.3g} > {allowed}")
    return lines


def mismatch_message(golden: dict, measured: dict[str, float], corpus: dict) -> str:
    lines = mismatches(golden, measured)
    head = [f"{len(lines)} of the tiny scale's golden numbers ({GOLDEN}) moved:"]
    if corpus != golden["provenance"].get("corpus"):
        head.append("NOTE: the prepared corpus differs from the golden one (token files' sha256; another Python or "
                    f"other installed packages make another pycode corpus): golden {golden['provenance'].get('corpus')}"
                    f", here {corpus}")
    return "\n".join([*head, *("  " + line for line in lines),
                      f"If the change is intended, rewrite the file with its reason: {UPDATE_COMMAND}"])


def updated_golden(golden: dict, measured: dict[str, float], reason: str, corpus: dict) -> dict:
    """The golden file with the measured values, every tolerance and why kept, and a new reason and provenance.

    A number the file does not know yet gets abs_tol 0 and a why to be written: the structure test refuses it
    until someone states its tolerance."""
    import torch

    from gnsrepro.provenance import code_version

    commit, dirty = code_version()
    numbers = {}  # the file's order, then any new number
    for name in [*(n for n in golden["numbers"] if n in measured), *sorted(set(measured) - set(golden["numbers"]))]:
        entry = golden["numbers"].get(name, {"abs_tol": 0.0, "why": "TODO: state the tolerance and why"})
        numbers[name] = {"value": measured[name], **{key: v for key, v in entry.items() if key != "value"}}
    provenance = {
        "command": UPDATE_COMMAND.replace("why the numbers changed", reason.replace('"', "'")),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "uncommitted_changes": dirty,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "omp_num_threads": 1,
        "corpus": corpus,
    }
    return {"about": golden.get("about", ""), "reason": reason, "provenance": provenance, "numbers": numbers}


def write_golden(data: dict, path: Path = GOLDEN) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ---- the checker itself, in milliseconds --------------------------------------------------------------
def test_the_golden_file_states_a_reason_provenance_and_a_justified_tolerance_for_every_number():
    golden = json.loads(GOLDEN.read_text())
    assert golden["reason"].strip(), "tests/golden/tiny.json needs the reason for its latest change"
    for key in ("command", "date", "commit", "torch", "corpus"):
        assert golden["provenance"].get(key), f"provenance.{key} is missing"
    assert len(golden["numbers"]) == len(CORRELATION_KEYS) + 2 * len(SCHEDULE_KEYS) + 3
    for name, entry in golden["numbers"].items():
        assert sum(key in entry for key in TOLERANCE_KEYS) == 1, f"{name}: give exactly one of {TOLERANCE_KEYS}"
        assert tolerance(entry) >= 0 and isinstance(entry["value"], (int, float)), name
        assert entry.get("why", "").strip() and not entry["why"].startswith("TODO"), f"{name}: say why its tolerance"


def test_a_number_outside_its_tolerance_is_named_with_golden_measured_tolerance_and_the_update_command():
    golden = {"provenance": {"corpus": {"c": 1}},
              "numbers": {"a": {"value": 1.0, "abs_tol": 0.25, "why": "."},
                          "b": {"value": 200.0, "rel_tol": 0.01, "why": "."},
                          "n": {"value": math.nan, "abs_tol": 0.0, "why": "."}}}
    assert mismatches(golden, {"a": 1.25, "b": 198.0, "n": math.nan}) == []  # at the edge of both tolerances
    lines = mismatches(golden, {"a": 0.7, "b": 203.0, "n": 1.0})
    assert lines == ["a: golden 1.0, measured 0.7, differs by 0.3 > abs_tol 0.25",
                     "b: golden 200.0, measured 203.0, differs by 3 > rel_tol 0.01 = 2",
                     "n: golden nan, measured 1.0, differs by nan > abs_tol 0"]
    assert mismatches(golden, {"a": 1.0, "b": 200.0, "extra": 2.0}) == [
        "n: golden nan was not measured", "extra: measured 2.0 has no golden value"]
    message = mismatch_message(golden, {"a": 0.7, "b": 200.0, "n": math.nan}, corpus={"c": 2})
    assert "1 of the tiny scale's golden numbers" in message and "the prepared corpus differs" in message
    assert message.endswith(UPDATE_COMMAND)
    assert "corpus differs" not in mismatch_message(golden, {"a": 0.0}, corpus={"c": 1})


def test_an_update_keeps_tolerances_and_records_the_reason_and_provenance(tmp_path):
    golden = {"about": "x", "reason": "old", "provenance": {},
              "numbers": {"a": {"value": 1.0, "rel_tol": 0.05, "why": "two runs moved it 1%"}}}
    new = updated_golden(golden, {"a": 1.5, "b": 2.0}, reason="the kernel changed", corpus={"c": 1})
    assert new["reason"] == "the kernel changed" and new["about"] == "x"
    assert new["numbers"]["a"] == {"value": 1.5, "rel_tol": 0.05, "why": "two runs moved it 1%"}
    assert new["numbers"]["b"]["why"].startswith("TODO")  # the structure test refuses it until it is stated
    assert new["provenance"]["corpus"] == {"c": 1} and new["provenance"]["torch"]
    assert "the kernel changed" in new["provenance"]["command"]
    write_golden(new, tmp_path / "g.json")
    assert json.loads((tmp_path / "g.json").read_text()) == new


def test_the_commands_are_the_plans_with_one_seed():
    plan = load_plan()
    commands = golden_commands(plan)
    parts = {part["name"]: part["commands"] for part in plan_parts(plan)}
    assert commands[0] == parts["prepare"][0]
    assert parts["correlation"][0] in commands
    schedule = [argv for argv in commands if any(a.startswith("experiment=schedule/") for a in argv)]
    assert len(schedule) == 1 and schedule[0][-1] == f"seed={SEED}"
    assert [a for a in schedule[0] if a.startswith("seed=")] == [f"seed={SEED}"]
    assert [a for a in schedule[0] if not a.startswith("seed=")] == [
        a for a in parts["schedule"][0] if not a.startswith("seed=")]


# ---- the golden numbers -------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_tiny_scales_report_numbers_match_the_golden_file(tmp_path):
    reason = os.environ.get(UPDATE_ENV)
    if reason is not None and not reason.strip():
        pytest.fail(f"{UPDATE_ENV} is set but empty: it takes the reason the numbers changed, e.g. {UPDATE_COMMAND}")
    plan = load_plan()
    seconds = run_commands(golden_commands(plan), tmp_path)
    print("\n".join(f"{s:6.1f} s  {line}" for line, s in seconds.items()))
    measured = measured_numbers(plan, tmp_path)
    corpus = corpus_identity(tmp_path / "data")
    golden = json.loads(GOLDEN.read_text())
    if reason is not None:
        write_golden(updated_golden(golden, measured, reason.strip(), corpus))
        pytest.skip(f"{GOLDEN} rewritten ({reason.strip()}): review `git diff {GOLDEN}` and commit it")
    assert not mismatches(golden, measured), mismatch_message(golden, measured, corpus)
