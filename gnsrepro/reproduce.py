"""`gnsrepro reproduce plan=tiny|small|paper [part=NAME]` (`make reproduce SCALE=...`): every experiment of a
scale, then every figure, then REPORT.md.

A plan (conf/plan/<scale>.yaml) is a list of parts, each a list of `gnsrepro` command lines with an estimate of
its minutes; the figures are one more part, and the report is the last (gnsrepro.report). Every command runs as
its own process (`python -m gnsrepro ...`), as a user would type it, and is idempotent: training commands pass
resume=true, so a finished run is skipped and a killed one continues. A part that fails is recorded (status.json)
and named in the report, and the other parts still run. `part=NAME` runs one part (for a GPU lease of at most
ten minutes a call); `part=report` only rebuilds the report from what the parts left.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from gnsrepro.errors import ConfigError

SPECIAL_PARTS = ("figures", "report")


def _fmt_minutes(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes >= 1 else f"{60 * minutes:.0f} s"


def plan_parts(plan) -> list[dict]:
    """The plan's parts, figures last, as plain dicts: name, minutes, commands (argv lists), why."""
    parts = []
    for part in [*plan.parts, {"name": "figures", "minutes": plan.figures_minutes,
                               "commands": [f["command"] for f in plan.figures]}]:
        part = OmegaConf.to_container(part) if not isinstance(part, dict) else part
        parts.append({"name": part["name"], "minutes": float(part.get("minutes", 1)),
                      "commands": [shlex.split(c) for c in part.get("commands", [])], "why": part.get("why", "")})
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

        where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        self.parts[name] = {**entry, "device": where,
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
    if cfg.part is not None and cfg.part not in (*names, "report"):
        raise ConfigError(f"part={cfg.part} is not a part of plan={plan.name}; accepted: {', '.join(names)}, report")
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
                    failed = {"command": line, "exit": code, "output": tail}
                    print(f"  part {part['name']} failed (exit {code}): {line}", flush=True)
                    break
        seconds = round(time.perf_counter() - t0, 1)
        status.record(part["name"], status="failed" if failed else "ok", seconds=seconds, **(failed or {}))
        left -= part["minutes"]
    from gnsrepro.report import write_report

    path = write_report(plan, status.parts)
    print(f"report: {path}", flush=True)
    return path
