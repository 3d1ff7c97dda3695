"""REPORT.md of a reproduce plan: each figure with a sentence, and the headline numbers next to the paper's.

Reads only what the plan's parts left (run directories' parquet tables and config, benchmark parquet tables) and
computes with the analysis half (gnsrepro.sweep, gnsrepro.analysis, gnsrepro.cost): no training code. A number
whose inputs are missing (a part that failed or was not run) is reported as such, never invented. The paper's
numbers are Gray et al. 2024 (arXiv 2411.00999) and the authors' released notebook, as docs/method.md cites them.
"""

from __future__ import annotations

import glob
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from gnsrepro.errors import ConfigError

ALPHAS = (0.9, 0.95, 0.99, 0.995, 0.999)
# what the paper reports for each headline (arXiv 2411.00999; the authors' notebook for the last two digits)
PAPER = {
    "correlation": "LayerNorm GNS tracks total GNS: high Pearson r over training at every alpha, a stable slope; "
                   "at 111M LayerNorm ends near half the total (about 100 against 215: slope about 2.2)",
    "schedule": "18% less training time at the fixed batch's final loss (abstract); the authors' notebook's "
                "tokens difference ends near 11-13% of the tokens",
    "schedule_sweep": "one fixed batch, the 111M recipe's 120 sequences (p. 9)",
    "gns_vs_linear": "not compared there: its schedule is linear in tokens (growing the batch with the measured "
                     "GNS is McCandlish et al. 2018's suggestion)",
    "kernel": "as fast as PyTorch's LayerNorm at hidden sizes 768, 2048, 4096 (ratio <= 1)",
    "cost": "simultaneous per-example norms cost fewer FLOPs than Li et al.'s once the sequence is long",
    "overhead": "LayerNorm-only tracking costs no throughput",
}


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _fmt_pct(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.1f} +- {std:.1f} %"


# ---- the numbers ------------------------------------------------------------------------------------------
def correlation_numbers(run_dir: str | os.PathLike) -> dict:
    """Claim 2 from a gns=all run: layernorm against total, per_example source, guarded as training smooths."""
    from gnsrepro.gns import HampelFilter
    from gnsrepro.runs import load_run
    from gnsrepro.sweep import correlation_table

    run = load_run(run_dir)
    rows = run.gns[run.gns["source"] == "per_example"]
    table = correlation_table(rows, list(ALPHAS), guard=HampelFilter())
    ln = table[table["group"] == "layernorm"].set_index("alpha")
    at = ln.loc[0.99]
    return {"r": float(at.pearson_r), "slope": float(at.slope), "r_min": float(ln.pearson_r.min()),
            "r_max": float(ln.pearson_r.max()), "slope_min": float(ln.slope.min()), "slope_max": float(ln.slope.max()),
            "heldout_median": float(at.heldout_median_rel_err), "heldout_p90": float(at.heldout_p90_rel_err),
            "detrended_r": float(at.detrended_r), "steps": int(at.n_steps)}


def _seed_savings(reference: dict, other: dict, seeds: list) -> dict:
    """The savings of `other` against `reference` over `seeds` (both arms: {seed: metrics}), as REPORT.md shows
    them: {tokens_saved, steps_saved, time_saved: (mean %, std %), p: the paired test's, seeds: how many}."""
    from gnsrepro.analysis import smoothing_window, tokens_saved_over_seeds

    window = smoothing_window(*(reference[s] for s in seeds), *(other[s] for s in seeds))
    summary = tokens_saved_over_seeds({s: reference[s] for s in seeds}, {s: other[s] for s in seeds},
                                      window=window).summary
    out = {key: (float(summary.loc[f"{key}_pct", "mean"]), float(summary.loc[f"{key}_pct", "std"]))
           for key in ("tokens_saved", "steps_saved", "time_saved")}
    out["p"] = float(summary.loc["tokens_saved_pct", "p_value"])
    out["seeds"] = len(seeds)
    # seeds whose schedule never reached the fixed run's final loss: no saving exists there (it ended worse)
    out["not_reached"] = int(summary.loc["tokens_saved_pct", "n_undefined"])
    # seeds whose wall time is known (gnsrepro.runs.load_run: a graphed run of an older loop logged host times)
    out["time_seeds"] = int(summary.loc["time_saved_pct", "n"])
    return out


def schedule_numbers(runs_dir: str | os.PathLike, reference: int | None = None) -> dict:
    """Claim 4 from the schedule arms' run directories (`<runs_dir>/*-seed*`): each arm against a fixed one, paired
    by seed.

    'linear', 'gns': {tokens_saved, steps_saved, time_saved: (mean, std) in %, p, seeds} against the reference
    fixed arm (`reference`: its batch size; by default `gnsrepro.analysis.reference_fixed_arm`'s, the fixed batch
    equal to the schedules' largest). 'fixed_sweep': {swept, reference (its batch), and when swept: batches
    ({batch: {final_loss, seeds}} at the common token budget, `gnsrepro.analysis.fixed_batch_losses`),
    budget_tokens, best (the batch of the lowest mean final loss), note (the batches' seeds when they differ),
    schedules ({arm: {final_loss, seeds}}: the linear and gns arms read at the same budget, smoothed alike),
    to_linear_loss ({arm: {tokens, steps (means over the seeds that reached it), reached, seeds, level}}: every
    arm's cost to the linear arm's final loss, `gnsrepro.analysis.cost_to_reach`, when there is a linear arm); or
    error, why those losses could not be computed}.
    When the fixed batch was swept, 'linear_vs_best' and 'gns_vs_best' (as 'linear', with 'batch': the best's) are
    the savings against the best fixed batch over the seeds both have. 'gns_vs_linear' (as 'linear'): the gns
    arm against the linear one at the linear arm's final loss, over the seeds both have.
    """
    from gnsrepro.analysis import (
        cost_to_reach,
        fixed_arm_batches,
        fixed_batch_losses,
        losses_at,
        reference_fixed_arm,
        schedule_arm,
        smoothing_window,
    )
    from gnsrepro.runs import load_run

    runs = [load_run(path, need_gns=False) for path in sorted(glob.glob(str(Path(runs_dir) / "*-seed*")))
            if (Path(path) / "metrics.parquet").exists()]
    configs = [run.config for run in runs]
    reference_arm = reference_fixed_arm(configs, reference)
    arms: dict[str, dict] = {}
    for run in runs:
        arms.setdefault(schedule_arm(run.config, configs), {})[run.config["seed"]] = run.metrics
    fixed = fixed_arm_batches(configs)
    out = {}
    for arm in ("linear", "gns"):
        if reference_arm is None or arm not in arms:
            continue
        seeds = sorted(set(arms[reference_arm]) & set(arms[arm]))
        if seeds:
            out[arm] = _seed_savings(arms[reference_arm], arms[arm], seeds)
    seeds = sorted(set(arms.get("linear", {})) & set(arms.get("gns", {})))
    if seeds:  # does following the GNS save more than the ramp: gns against linear, at linear's final loss
        out["gns_vs_linear"] = _seed_savings(arms["linear"], arms["gns"], seeds)
    if reference_arm is None:
        return out
    sweep = {"swept": len(fixed) > 1, "reference": fixed[reference_arm]}
    if sweep["swept"]:
        # one smoothing window for the fixed batches and, below, the schedules read at the same budget
        window = smoothing_window(*(m for arm in fixed for m in arms[arm].values()))
        try:
            losses = fixed_batch_losses({batch: arms[arm] for arm, batch in fixed.items()}, window)
        except ConfigError as e:  # the savings against the reference stand without the sweep's losses
            out["fixed_sweep"] = {**sweep, "error": str(e)}
            return out
        best = int(losses.index[losses["best"]][0])
        sweep |= {"batches": {int(b): {"final_loss": float(row.final_loss), "seeds": list(row.seeds)}
                              for b, row in losses.iterrows()},
                  "budget_tokens": float(losses["budget_tokens"].iloc[0]), "best": best, "note": ""}
        # the schedules' own losses at that budget, smoothed alike: how far each ended from the best fixed batch
        sweep["schedules"] = {}
        for arm in ("linear", "gns"):
            if arms.get(arm):
                at = losses_at(arms[arm], sweep["budget_tokens"], window, name=f"{arm} schedule")
                sweep["schedules"][arm] = {"final_loss": float(np.mean(list(at.values()))), "seeds": sorted(at)}
        seed_sets = {b: tuple(v["seeds"]) for b, v in sweep["batches"].items()}
        if len(set(seed_sets.values())) > 1:
            sweep["note"] = ("the fixed batches have different seeds (" + "; ".join(
                f"{b}: seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}" for b, s in seed_sets.items())
                + "): each batch's loss is the mean over the seeds it has")
        if arms.get("linear"):  # every arm's tokens and steps to the linear ramp's final loss, seed by seed
            cost = cost_to_reach({**{f"fixed {b}": arms[a] for a, b in sorted(fixed.items(), key=lambda x: x[1])},
                                  **{arm: arms[arm] for arm in ("linear", "gns") if arms.get(arm)}}, "linear", window)
            sweep["to_linear_loss"] = {
                arm: {"tokens": float(g.tokens.mean()), "steps": float(g.steps.mean()), "reached": int(g.reached.sum()),
                      "seeds": len(g), "level": float(g.level.mean())}
                for arm, g in cost.groupby("arm", sort=False)}
        best_arm = next(a for a, b in fixed.items() if b == best)
        for arm in ("linear", "gns"):
            seeds = sorted(set(arms[best_arm]) & set(arms.get(arm, {})))
            if seeds:
                out[f"{arm}_vs_best"] = {**_seed_savings(arms[best_arm], arms[arm], seeds), "batch": best}
    out["fixed_sweep"] = sweep
    return out


def kernel_numbers(table: str | os.PathLike) -> dict:
    """Claim 3 from `gnsrepro bench layernorm`'s parquet: the Triton kernel's time over PyTorch's, as device time
    (the best measurement the table has, as the lnbench figure draws: what a step replayed on the GPU pays) and
    called eagerly (host time included, what an eager step pays at small sizes)."""
    from gnsrepro.figures.lnbench import device_time_kind, read_bench_table

    df = read_bench_table(table)
    prefix, kind = device_time_kind(df)
    device = df[f"{prefix}triton_us"] / df[f"{prefix}torch_us"]
    eager = df["triton_us"] / df["torch_us"]
    return {"min": float(device.min()), "max": float(device.max()), "kind": kind,
            "eager_min": float(eager.min()), "eager_max": float(eager.max()),
            "sizes": sorted(int(n) for n in df["N"].unique())}


def cost_numbers(model: str, seq_len: int) -> dict:
    """Claim 1: the methods' extra FLOPs as a fraction of the model's forward+backward (gnsrepro.cost)."""
    from gnsrepro.config import named_model
    from gnsrepro.cost import model_costs
    from gnsrepro.model import gpt_config

    costs = model_costs(gpt_config(named_model(model, setting="cost_model")), seq_len)
    return {m: float(costs.loc[m, "extra_flops_fraction"]) for m in ("simultaneous", "ghost", "layernorm_only")}


def overhead_numbers(table: str | os.PathLike) -> dict:
    df = pd.read_parquet(table)
    return dict(zip(df["variant"], df["relative_step_time"].astype(float)))


def _try(fn, *args):
    """(value, None) or (None, why): a missing input is reported, not raised."""
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 - any failure of an input becomes a line of the report
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ---- the report -------------------------------------------------------------------------------------------
def headline_numbers(plan) -> dict:
    """Every headline of the plan's report, or why it is missing: {name: (value, why)}. The plan's report may set
    schedule_reference, the fixed batch the schedules' savings are against (default: `schedule_numbers`')."""
    r = plan.report
    numbers = {}
    if r.get("correlation_run"):
        numbers["correlation"] = _try(correlation_numbers, r.correlation_run)
    if r.get("schedule_runs"):
        numbers["schedule"] = _try(schedule_numbers, r.schedule_runs, r.get("schedule_reference"))
    if r.get("lnbench_table"):
        numbers["kernel"] = _try(kernel_numbers, r.lnbench_table)
    if r.get("cost_model"):
        numbers["cost"] = _try(cost_numbers, r.cost_model, int(r.cost_seq_len))
    if r.get("overhead_table"):
        numbers["overhead"] = _try(overhead_numbers, r.overhead_table)
    return numbers


def _rows(numbers: dict) -> list[tuple[str, str, str]]:
    """(what, measured here, the paper) rows of the headline table."""
    rows = []
    value, why = numbers.get("correlation", (None, None))
    if value is not None:
        rows.append(("Claim 2: LayerNorm GNS against total GNS (per-example, alpha 0.99)",
                     f"r = {value['r']:.4f}, slope = {value['slope']:.2f} (total = slope x LayerNorm); across alpha "
                     f"r {value['r_min']:.4f}-{value['r_max']:.4f}, slope {value['slope_min']:.2f}-"
                     f"{value['slope_max']:.2f}; held-out error median {100 * value['heldout_median']:.1f} %, p90 "
                     f"{100 * value['heldout_p90']:.1f} %; detrended r {value['detrended_r']:.2f} "
                     f"({value['steps']} steps)", PAPER["correlation"]))
    elif why:
        rows.append(("Claim 2: LayerNorm GNS against total GNS", f"not measured ({why})", PAPER["correlation"]))
    value, why = numbers.get("schedule", (None, None))
    if value and ("linear" in value or "gns" in value):
        rows += _schedule_rows(value)
    elif why is not None or "schedule" in numbers:
        rows.append(("Claim 4: batch-size schedules", f"not measured ({why or 'no runs'})", PAPER["schedule"]))
    value, why = numbers.get("kernel", (None, None))
    if value is not None:
        eager = ("" if value["kind"] == "eager" else
                 f"; called eagerly, host time included: {value['eager_min']:.2f}-{value['eager_max']:.2f}")
        rows.append(("Claim 3: LayerNorm kernel time / PyTorch's", f"{value['kind']}: {value['min']:.2f}-"
                     f"{value['max']:.2f} at N = {', '.join(map(str, value['sizes']))}{eager}", PAPER["kernel"]))
    elif why:
        rows.append(("Claim 3: LayerNorm kernel time / PyTorch's", f"not measured ({why})", PAPER["kernel"]))
    value, why = numbers.get("cost", (None, None))
    if value is not None:
        rows.append(("Claim 1: extra FLOPs / model forward+backward", f"simultaneous {100 * value['simultaneous']:.3f} "
                     f"%, Li et al. {100 * value['ghost']:.1f} %, LayerNorm only {100 * value['layernorm_only']:.4f} %",
                     PAPER["cost"]))
    elif why:
        rows.append(("Claim 1: extra FLOPs / model forward+backward", f"not computed ({why})", PAPER["cost"]))
    value, why = numbers.get("overhead", (None, None))
    if value is not None:
        rows.append(("Step time against gns=off", ", ".join(f"{k} {v:.3f}x" for k, v in value.items()),
                     PAPER["overhead"]))
    elif why:
        rows.append(("Step time against gns=off", f"not measured ({why})", PAPER["overhead"]))
    return rows


def _schedule_rows(value: dict) -> list[tuple[str, str, str]]:
    """The rows of claim 4 from `schedule_numbers`: each schedule against the reference fixed batch and, when the
    fixed batch was swept, against the best one, and what the fixed batches were."""
    def savings(v: dict) -> str:
        missed = v.get("not_reached", 0)
        if missed == v["seeds"]:
            return (f"none: at no seed did the schedule reach that fixed batch's final loss within the token budget "
                    f"(it ended worse; {missed} of {v['seeds']} seeds)")
        reached = v["seeds"] - missed
        timed = "" if v.get("time_seeds", reached) >= reached else \
            f" (over {v['time_seeds']} seeds: the others' step times are unknown)"
        text = (f"tokens {_fmt_pct(*v['tokens_saved'])} saved (p = {v['p']:.3g}); steps "
                f"{_fmt_pct(*v['steps_saved'])}; wall time {_fmt_pct(*v['time_saved'])}{timed}")
        return text + (f"; {missed} of {v['seeds']} seeds never reached its final loss (left out of the mean; no "
                       "p-value)" if missed else "")

    sweep = value.get("fixed_sweep", {})
    swept, reference = sweep.get("swept", False), sweep.get("reference")
    rows = []
    for arm in ("linear", "gns"):
        if arm in value:
            v = value[arm]
            against = f"fixed batch {reference} (the reference)" if swept else "fixed batch"
            rows.append((f"Claim 4: {arm} schedule against the {against}, at its final loss ({_seeds(v['seeds'])})",
                         savings(v), PAPER["schedule"]))
        if f"{arm}_vs_best" in value:
            v = value[f"{arm}_vs_best"]
            rows.append((f"Claim 4: {arm} schedule against the best fixed batch, {v['batch']}, at its final loss "
                         f"({_seeds(v['seeds'])})", savings(v), PAPER["schedule_sweep"]))
    if "gns_vs_linear" in value:
        v = value["gns_vs_linear"]
        rows.append((f"Claim 4: gns schedule against the linear one, at the linear one's final loss "
                     f"({_seeds(v['seeds'])})", savings(v), PAPER["gns_vs_linear"]))
    if not sweep:
        return rows
    if not swept:
        rows.append(("Claim 4: the fixed batch", f"{reference} sequences: the fixed batch was not swept",
                     PAPER["schedule_sweep"]))
    elif "error" in sweep:
        rows.append(("Claim 4: the fixed batch, swept", f"not measured ({sweep['error']})", PAPER["schedule_sweep"]))
    else:
        losses = ", ".join(f"{b}: {v['final_loss']:.4f} ({_seeds(len(v['seeds']))})"
                           for b, v in sweep["batches"].items())
        note = f"; {sweep['note']}" if sweep["note"] else ""
        schedules = ", ".join(f"{arm} {v['final_loss']:.4f} ({_seeds(len(v['seeds']))})"
                              for arm, v in sweep.get("schedules", {}).items())
        rows.append(("Claim 4: the fixed batch, swept (final smoothed training loss, mean over seeds)",
                     f"at {sweep['budget_tokens']:,.0f} tokens, batch {losses}; best: {sweep['best']}, reference: "
                     f"{reference}{note}" + (f"; the schedules there: {schedules}" if schedules else ""),
                     PAPER["schedule_sweep"]))
        if "to_linear_loss" in sweep:
            def cost(v: dict) -> str:
                if not v["reached"]:
                    return "never"
                some = "" if v["reached"] == v["seeds"] else f", {v['reached']} of {v['seeds']} seeds"
                return f"{v['tokens'] / 1e6:.1f}M tokens, {v['steps']:,.0f} steps{some}"

            to = sweep["to_linear_loss"]
            level = to["linear"]["level"]
            rows.append((f"Claim 4: tokens and steps to the linear schedule's final loss ({level:.4f}, mean over "
                         "seeds of where each arm first reached it)", "; ".join(f"{arm}: {cost(v)}"
                                                                                for arm, v in to.items()),
                         PAPER["schedule_sweep"]))
    return rows


def _environment() -> list[str]:
    import torch

    from gnsrepro.provenance import code_version

    commit, dirty = code_version()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    return [f"- written {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {device} "
            f"({os.cpu_count()} CPU cores), Python {platform.python_version()}, torch {torch.__version__}",
            f"- code: commit {commit or 'unknown'}{' with uncommitted changes' if dirty else ''}"]


def read_findings(path: str | os.PathLike | None) -> tuple[str, dict[str, str]]:
    """What a person wrote of the measured numbers (the plan's report.findings, a markdown file): the text before
    its first `## ` heading, said of the numbers as a whole, and {heading: text} for the rest, each heading a
    figure's name whose text goes under that figure. ("", {}) when the plan names no file or it is not there."""
    if not path or not Path(path).exists():
        return "", {}
    preamble, sections, name = [], {}, None
    for line in Path(path).read_text().splitlines():
        if line.startswith("## "):
            name = line[3:].strip()
            sections[name] = []
        elif name is None:
            preamble.append(line)
        else:
            sections[name].append(line)
    return "\n".join(preamble).strip(), {k: "\n".join(v).strip() for k, v in sections.items()}


def write_report(plan, status: dict) -> Path:
    """Write <plan.out_dir>/REPORT.md and return its path."""
    out = Path(plan.out_dir)
    numbers = headline_numbers(plan)
    findings, by_figure = read_findings(plan.report.get("findings"))
    unknown = set(by_figure) - {fig.name for fig in plan.figures}
    if unknown:
        raise ConfigError(f"{plan.report.findings}: sections {', '.join(sorted(unknown))} name no figure of "
                          f"plan={plan.name} (figures: {', '.join(fig.name for fig in plan.figures)})")
    lines = [f"# gnsrepro reproduction at the {plan.name} scale", "", plan.get("about", "").strip(), "",
             *_environment(), "", "## Parts", "",
             "| part | status | minutes | where, finished (UTC) | versions, commit |",
             "| --- | --- | --- | --- | --- |"]
    for name, entry in status.items():
        failed = entry["status"] == "failed"
        what = entry["status"] + (f": `{entry['command']}` exited {entry['exit']}" if failed else "")
        code = ", ".join(entry[k] for k in ("versions", "commit") if entry.get(k))
        lines.append(f"| {name} | {what} | {entry['seconds'] / 60:.1f} | {entry.get('device', '')} "
                     f"{entry.get('finished', '')} | {code} |")
    lines += ["", "## Headline numbers", "", "| what | measured here | the paper |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _rows(numbers)]
    if findings:
        lines += ["", "## What the numbers say", "", findings]
    lines += ["", "## Figures", ""]
    for fig in plan.figures:
        png = out / "figures" / f"{fig.name}.png"
        shown = f"![{fig.name}](figures/{fig.name}.png)" if png.exists() else "(not drawn: see the parts above)"
        lines += [f"### {fig.name}", "", fig.caption.strip(), "", shown, "", f"`gnsrepro {fig.command}`", ""]
        if by_figure.get(fig.name):
            lines += [by_figure[fig.name], ""]
    if plan.get("gives_up"):
        lines += ["## What this scale gives up", "", plan.gives_up.strip(), ""]
    path = out / "REPORT.md"
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def print_plan(plan, parts: list[dict]) -> None:
    """A plan that is not run here (the paper's scale): its commands and their estimated GPU-hours."""
    print(f"plan {plan.name}: {plan.get('about', '').strip()}")
    for part in parts:
        print(f"\npart {part['name']}: about {part['minutes'] / 60:.1f} GPU-hours")
        for argv in part["commands"]:
            print("  gnsrepro " + " ".join(argv))
    print("\nNot run here: pass force=true to run it (days of GPU time).")
