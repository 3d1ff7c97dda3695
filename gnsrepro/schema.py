"""The two parquet tables of a run directory, declared once: column names and dtypes (README, "Logs").

The training side writes them (gnsrepro.logs) and the analysis side reads them (gnsrepro.runs); this module
imports nothing, so the analysis half stays free of training code.
"""

# metrics.parquet, one row per optimizer step
METRIC_COLUMNS = {
    "step": "int64", "tokens": "int64", "batch_size": "int64", "lr": "float64", "loss": "float64",
    "val_loss": "float64", "grad_norm": "float64", "schedule_gns": "float64", "step_time_s": "float64",
    "tokens_per_s": "float64", "mfu": "float64",
}
# gns.parquet, one row per step, group and source
GNS_COLUMNS = {
    "step": "int64", "tokens": "int64", "group": "str", "source": "str", "b_big": "int64", "b_small": "int64",
    "sqnorm_big": "float64", "sqnorm_small": "float64", "gtg": "float64", "trsigma": "float64",
}
# columns that runs logged before they existed lack: a reader accepts tables without them
LATER_METRIC_COLUMNS = ("grad_norm", "schedule_gns")
