"""`figure=cost`: FLOPs and bytes of the per-example-norm methods against sequence length (Gray et al.
2024, p. 5) and the paper's Table 1, computed by `gnsrepro.cost` (arithmetic on the model's shapes,
nothing is read or trained).

Plotted is what each method adds to a training step: for the simultaneous and Li et al. (ghost norm)
methods the work beyond the ordinary weight gradients of every Linear, for "LayerNorm only" the whole
per-example work of every LayerNorm (`gnsrepro.cost.model_costs`), absolute and as a fraction of the
model's forward+backward (`gnsrepro.cost.model_forward_backward`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from gnsrepro.errors import ConfigError
from gnsrepro.figures.common import new_figure, output_stem, save

SWEPT_METHODS = ("simultaneous", "ghost", "layernorm_only")
COLOURS = {"simultaneous": "tab:blue", "ghost": "tab:red", "layernorm_only": "tab:green"}


def _gpt_config(model):
    """A GPTConfig from a GPTConfig or a model config (ModelConfig, or the `model` node of a Hydra config)."""
    from gnsrepro.model import GPTConfig, gpt_config

    return model if isinstance(model, GPTConfig) else gpt_config(model)


def table1_markdown(table: pd.DataFrame, caption: str) -> str:
    """`gnsrepro.cost.model_costs`' table as markdown: GFLOPs and GB, total and added, and % of the model."""
    from gnsrepro.cost import METHODS

    header = ("| method | GFLOPs | % of model FLOPs | added GFLOPs | added % FLOPs | GB | % of model bytes "
              "| added GB | added % bytes |")
    lines = [caption, "", header, "|" + " --- |" * 9]
    for method, r in table.iterrows():
        lines.append(
            f"| {METHODS[method]} | {r.flops / 1e9:.4g} | {100 * r.flops_fraction:.3g} | {r.extra_flops / 1e9:.4g} "
            f"| {100 * r.extra_flops_fraction:.3g} | {r.bytes / 1e9:.4g} | {100 * r.bytes_fraction:.3g} "
            f"| {r.extra_bytes / 1e9:.4g} | {100 * r.extra_bytes_fraction:.3g} |")
    lines += ["", f"Model forward+backward: {table.attrs['model_flops'] / 1e9:.4g} GFLOPs, "
              f"{table.attrs['model_bytes'] / 1e9:.4g} GB (approximate bytes: gnsrepro.cost.model_forward_backward)."]
    return "\n".join(lines) + "\n"


def draw_cost(sweep: pd.DataFrame, table_seq_len: int, title: str):
    """2 x 2 panels: added FLOPs and bytes (rows), absolute and as % of the model (columns), log-log."""
    from gnsrepro.cost import METHODS

    fig = new_figure(11, 8.2)
    axes = fig.subplots(2, 2)
    model = sweep.drop_duplicates("seq_len").sort_values("seq_len")
    rows = (("flops", "FLOPs", "FLOPs", "GFLOPs"), ("bytes", "bytes moved", "Bytes moved", "GB"))
    for row, (quantity, name, heading, unit) in enumerate(rows):
        scale = 1e9
        absolute, fraction = axes[row]
        for method in SWEPT_METHODS:
            m = sweep[sweep["method"] == method].sort_values("seq_len")
            label = METHODS[method]
            absolute.plot(m["seq_len"], m[f"extra_{quantity}"] / scale, "o-", color=COLOURS[method], label=label)
            fraction.plot(m["seq_len"], 100 * m[f"extra_{quantity}_fraction"], "o-", color=COLOURS[method],
                          label=label)
        absolute.plot(model["seq_len"], model[f"model_{quantity}"] / scale, "k--", label="model forward+backward")
        absolute.set_ylabel(f"added {unit} per step")
        fraction.set_ylabel(f"added {name} (% of model forward+backward)")
        for ax in (absolute, fraction):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length (tokens)")
            ax.axvline(table_seq_len, color="0.6", lw=0.8, ls=":")
            ax.grid(True, which="major", alpha=0.3)
        absolute.set_title(f"{heading}, absolute", fontsize=10)
        fraction.set_title(f"{heading}, relative to the model (dotted: Table 1's {table_seq_len})", fontsize=10)
    # one legend for the four panels, below them: inside a panel it would cover a line somewhere
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def cost(model, out: str | os.PathLike, seq_len: int | None = None, batch_size: int = 1,
         bytes_per_element: int = 2, seq_lens=None) -> list[Path]:
    """Compute and draw the cost figure of `model` (a ModelConfig or GPTConfig) to `<out>.png`, `<out>.pdf`,
    the swept values (`gnsrepro.cost.seq_len_sweep`) to `<out>.parquet` and Table 1 at `seq_len` (default
    the model's block size; `gnsrepro.cost.model_costs`) to `<out>-table1.parquet` and `<out>-table1.md`.
    Returns the paths."""
    from gnsrepro.cost import SWEEP_SEQ_LENS, model_costs, seq_len_sweep

    config = _gpt_config(model)
    seq_len = config.block_size if seq_len is None else seq_len
    for key, value in {"seq_len": seq_len, "batch_size": batch_size, "bytes_per_element": bytes_per_element}.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    seq_lens = sorted(set(SWEEP_SEQ_LENS if seq_lens is None else seq_lens) | {seq_len})
    sweep = seq_len_sweep(config, seq_lens, batch_size, bytes_per_element)
    table = model_costs(config, seq_len, batch_size, bytes_per_element)
    name = getattr(model, "name", None) or f"{config.n_layer}-layer GPT"
    what = (f"model {name} ({config.n_layer} layers, d={config.n_embd}, vocab {config.vocab_size}), "
            f"{batch_size} sequence{'s' if batch_size > 1 else ''} per step, {bytes_per_element} bytes/element")
    fig = draw_cost(sweep, seq_len, f"Cost of per-example gradient norms: {what}")
    paths = save(fig, out, sweep)
    stem = output_stem(out)
    table_parquet = stem.with_name(stem.name + "-table1.parquet")
    table.reset_index().to_parquet(table_parquet, index=False)
    table_md = stem.with_name(stem.name + "-table1.md")
    table_md.write_text(table1_markdown(table, f"Table 1 (Gray et al. 2024): {what}, sequence length {seq_len}."))
    return [*paths, table_parquet, table_md]
