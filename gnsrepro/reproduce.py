"""`gnsrepro reproduce plan=tiny|small|paper [part=NAME]` (`make reproduce SCALE=...`): every experiment of a
scale, then every figure, then REPORT.md.

A plan (conf/plan/<scale>.yaml) is a list of parts, each a list of `gnsrepro` command lines with an estimate of
its minutes; the figures are one more part, and the report is the last (gnsrepro.report). Every command runs as
its own process (`python -m gnsrepro ...`), as a user would type it, and is idempotent: training commands pass
resume=true, so a finished run is skipped and a killed one continues. A part that fails is recorded (status.json)
and named in the report, and the other parts still run. `part=NAME` runs one part (for a GPU lease of at most
ten minutes a call); `part=report` only rebuilds the report from what the parts left; `part=publish` copies the
report, its figures and the small files of every run it read (no checkpoints) to the plan's publish.dir, to be
committed (the small scale's docs/reproduce/small/), from where they restore into outputs/ to redraw without a GPU.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from gnsrepro.errors import ConfigError

SPECIAL_PARTS = ("figures", "report", "publish")
# what `part=publish` copies of a run directory: its tables, config, provenance, logs and figures (not checkpoints,
# not the PDF twins of the PNGs, not Hydra's own .hydra/ folders)
PUBLISHED_SUFFIXES = (".parquet", ".json", ".yaml", ".md", ".png", ".log", ".csv")


def _fmt_minutes(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes >= 1 else f"{60 * minutes:.0f} s"


def plan_parts(plan) -> list[dict]:
    """The plan's parts, figures last, as plain dicts: name, minutes, commands (argv lists), why, keep_going (the
    figures: one figure that cannot be drawn, its runs missing, does not keep the others from being drawn)."""
    parts = []
    for part in [*plan.parts, {"name": "figures", "minutes": plan.figures_minutes,
                               "commands": [f["command"] for f in plan.figures]}]:
        part = OmegaConf.to_container(part) if not isinstance(part, dict) else part
        parts.append({"name": part["name"], "minutes": float(part.get("minutes", 1)),
                      "commands": [shlex.split(c) for c in part.get("commands", [])], "why": part.get("why", ""),
                      "keep_going": part["name"] == "figures"})
    return parts


def expand_globs(argv: list[str]) -> list[str]:
    """`run=outputs/schedule/tiny/*-seed*` -> `run=DIR1,DIR2,...` (sorted), as a shell would expand a pattern;
    a pattern that matches nothing stays as it is, and the command reports the missing directory."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        matches = sorted(glob.glob(value)) if sep and any(c in value for c in "*?[") else []
        out.append(f"{key}={','.join(matches)}" if matches else arg)
    return out


class StatusFile:
    """outputs/reproduce/<scale>/status.json: per part, ok or failed, its seconds, where and when it finished, the
    failing command and the end of its output; written atomically after every part, so a killed reproduce leaves
    what it finished.

    Parts run on other machines (the small scale's parts, one GPU call each: benchmarks/gpu_session.sh stage
    `reproduce`) come back with their outputs as status-<name>.json beside it; a part's entry is the one that
    finished last among all these files, so the report written here lists every part where it ran.
    """

    def __init__(self, path: Path):
        self.path = path
        self.parts: dict = {}
        for file in sorted(path.parent.glob("status-*.json")) + ([path] if path.exists() else []):
            for name, entry in json.loads(file.read_text()).items():
                if name not in self.parts or entry.get("finished", "") >= self.parts[name].get("finished", ""):
                    self.parts[name] = entry

    def record(self, name: str, **entry) -> None:
        import torch

        from gnsrepro.provenance import code_version

        where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        try:
            import triton
            versions = f"torch {torch.__version__}, triton {triton.__version__}"
        except ImportError:
            versions = f"torch {torch.__version__}"
        commit, dirty = code_version()
        self.parts[name] = {**entry, "device": where, "versions": versions,
                            "commit": (commit or "unknown")[:12] + (" (uncommitted changes)" if dirty else ""),
                            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.parts, indent=2))
        os.replace(tmp, self.path)


def run_command(argv: list[str], log) -> tuple[int, str]:
    """Run `python -m gnsrepro <argv>` (or torchrun's argv), echoing its output to the console and the part's
    log; (exit code, the last lines of its output)."""
    # `torchrun ... -m gnsrepro train ...` (several processes) runs as torch.distributed.run, else `gnsrepro ...`
    head = ["-m", "torch.distributed.run", *argv[1:]] if argv[0] == "torchrun" else ["-m", "gnsrepro", *argv]
    proc = subprocess.Popen([sys.executable, *head], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail: list[str] = []
    for line in proc.stdout:
        sys.stdout.write("    " + line)
        log.write(line)
        tail = (tail + [line.rstrip()])[-15:]
    return proc.wait(), "\n".join(tail)


def run_reproduce(cfg) -> Path:
    """Run the plan's parts (or cfg.part alone), then the report; returns the report's path."""
    plan = cfg.plan
    out = Path(plan.out_dir)
    parts = plan_parts(plan)
    names = [p["name"] for p in parts]
    if cfg.part is not None and cfg.part not in (*names, "report", "publish"):
        raise ConfigError(f"part={cfg.part} is not a part of plan={plan.name}; accepted: {', '.join(names)}, report, "
                          "publish")
    if cfg.part == "publish":
        return publish(plan)
    if plan.get("run_here") is False and cfg.part is None and not cfg.force:
        from gnsrepro.report import print_plan

        print_plan(plan, parts)
        return out / "REPORT.md"
    selected = [p for p in parts if cfg.part in (None, p["name"])]
    status = StatusFile(out / "status.json")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    left = sum(p["minutes"] for p in selected)
    for i, part in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] part {part['name']}: about {_fmt_minutes(part['minutes'])} "
              f"(about {_fmt_minutes(left)} left){': ' + part['why'] if part['why'] else ''}", flush=True)
        t0, failed = time.perf_counter(), None
        with open(out / "logs" / f"{part['name']}.log", "a") as log:
            for argv in part["commands"]:
                line = ("" if argv[0] == "torchrun" else "gnsrepro ") + shlex.join(argv)
                print(f"  + {line}", flush=True)
                log.write(f"+ {line}\n")
                code, tail = run_command(expand_globs(argv), log)
                if code != 0:
                    failed = failed or {"command": line, "exit": code, "output": tail}  # the first failure
                    print(f"  part {part['name']} failed (exit {code}): {line}", flush=True)
                    if not part["keep_going"]:
                        break
        seconds = round(time.perf_counter() - t0, 1)
        status.record(part["name"], status="failed" if failed else "ok", seconds=seconds, **(failed or {}))
        left -= part["minutes"]
    from gnsrepro.report import write_report

    path = write_report(plan, status.parts)
    print(f"report: {path}", flush=True)
    return path


def publish(plan) -> Path:
    """`part=publish`: copy the report, its figures and the small files of the runs it read to plan.publish.dir.

    The copy mirrors the paths under the working directory (publish.inputs, e.g. outputs/schedule/small, lands at
    <dir>/outputs/schedule/small) and replaces the previous copy whole, so a run left out of the plan does not
    linger there and come back into a redrawn figure. <dir>/REPORT.md is the report with its figure links pointing
    into the copy. Refused before anything is touched when the report has not been written. Returns its path.
    """
    if not plan.get("publish"):
        raise ConfigError(f"plan={plan.name} has no publish section (publish.dir, publish.inputs)")
    report = Path(plan.out_dir) / "REPORT.md"
    if not report.exists():
        raise ConfigError(f"part=publish: {report} does not exist; run the parts and `part=report` first")
    inputs = [Path(i) for i in plan.publish.inputs]
    for path in inputs:
        if path.is_absolute() or ".." in path.parts:
            raise ConfigError(f"publish.inputs: {path} must be a path inside the working directory, as the plan's "
                              "commands write it (e.g. outputs/schedule/small)")
    target = Path(plan.publish.dir)
    staging = target.with_name(target.name + ".publishing")
    shutil.rmtree(staging, ignore_errors=True)
    copied = 0
    for root in inputs:
        if not root.exists():
            print(f"  {root}: not there (its part has not run), left out", flush=True)
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in PUBLISHED_SUFFIXES and ".hydra" not in path.parts:
                dest = staging / path
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
                copied += 1
    out = Path(plan.out_dir).as_posix()
    text = report.read_text().replace("](figures/", f"]({out}/figures/")
    restore = (f"Written by `gnsrepro reproduce plan={plan.name}` (then `part=publish`). The tables every figure and "
               f"number here was made from are under `outputs/` beside this file; to redraw the figures and rewrite "
               f"the report without a GPU, from the repository root: `mkdir -p outputs && cp -rn {target.as_posix()}/"
               f"outputs/. outputs/`, then `gnsrepro reproduce plan={plan.name} part=figures` and `part=report`.")
    head, _, rest = text.partition("\n\n")
    (staging / "REPORT.md").write_text(f"{head}\n\n{restore}\n\n{rest}")
    for keep in plan.publish.get("keep", []):  # files written by hand beside the copy (findings.md)
        if (target / keep).exists():
            shutil.copy2(target / keep, staging / keep)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    print(f"published {copied} files and REPORT.md to {target}", flush=True)
    return target / "REPORT.md"
