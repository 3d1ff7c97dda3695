"""What the two measured backend tables share: GPU names, their checks, and writing rows into them.

ln_backend.csv (gns.ln_backend=auto, gnsrepro.kernels.ln_backend) and linear_backend.csv
(gns.linear_backend=auto, gnsrepro.kernels.linear_backend) each hold one row per measured situation, with the
two backends' times (torch_ms, triton_ms), the faster one, and where, when and how it was measured (device,
date, commit, command). A choice uses the rows of the same GPU, else of its model, else of its family.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd

# GPU models whose measurements stand in for each other when the exact model has no row: the same chip
# generation (compute capability 9.0, Hopper); H200 is H100's die with more and faster HBM
GPU_FAMILIES = {"H100": "sm90", "H200": "sm90", "H800": "sm90", "H20": "sm90", "GH200": "sm90"}


def gpu_model(device_name: str) -> str:
    """The GPU model in a device name: "NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA A100-SXM4-80GB" -> "A100";
    a name without such a token (letters then digits) is its own model."""
    token = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", device_name.upper())
    return token.group(1) if token else device_name.strip().upper()


def gpu_family(device_name: str) -> str:
    model = gpu_model(device_name)
    return GPU_FAMILIES.get(model, model)


def rows_of_device(rows: pd.DataFrame, device_name: str) -> pd.DataFrame:
    """The rows of this device name, else of its GPU model (gpu_model), else of its family (GPU_FAMILIES); none
    of these: an empty frame."""
    for matches in (rows["device"].str.strip() == device_name.strip(), rows["device"].map(gpu_model) ==
                    gpu_model(device_name), rows["device"].map(gpu_family) == gpu_family(device_name)):
        if matches.any():
            return rows[matches]
    return rows.iloc[:0]


def faster_backend(torch_ms: float, triton_ms: float) -> str:
    return "torch" if torch_ms <= triton_ms else "triton"


def positive_int(value) -> bool:
    try:
        return float(value).is_integer() and int(float(value)) > 0
    except (TypeError, ValueError):
        return False


def positive_number(value) -> bool:
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def check_measured_rows(df: pd.DataFrame, where: str, columns: tuple[str, ...], situation_key: tuple[str, ...],
                        flag_columns: tuple[str, ...], int_columns: tuple[str, ...]) -> None:
    """Raise ValueError naming a table's first problem: its columns (not `columns`), a flag that is not a boolean,
    an int column that is not a positive integer, a time that is not a positive number, a `faster` that is not the
    backend with the smaller time, an empty device, date or command, or two rows for one situation."""
    if tuple(df.columns) != columns:
        raise ValueError(f"{where}: columns {list(df.columns)}; expected {list(columns)}")
    for i, row in enumerate(df.to_dict("records"), start=1):
        line = f"{where} row {i}"
        for key in flag_columns:
            if str(row[key]) not in ("True", "False"):
                raise ValueError(f"{line}: {key}={row[key]!r} is not True or False")
        for key in int_columns:
            if not positive_int(row[key]):
                raise ValueError(f"{line}: {key}={row[key]!r} is not a positive integer")
        if not (positive_number(row["torch_ms"]) and positive_number(row["triton_ms"])):
            raise ValueError(f"{line}: torch_ms={row['torch_ms']!r}, triton_ms={row['triton_ms']!r} must be "
                             "positive numbers")
        if row["faster"] != faster_backend(float(row["torch_ms"]), float(row["triton_ms"])):
            raise ValueError(f"{line}: faster={row['faster']!r} but torch_ms={row['torch_ms']} and "
                             f"triton_ms={row['triton_ms']}")
        for key in ("device", "date", "command"):
            if not str(row[key]).strip():
                raise ValueError(f"{line}: {key} is empty")
    situations = df[list(situation_key)].astype(str)
    duplicated = situations.duplicated()
    if duplicated.any():
        raise ValueError(f"{where} row {int(duplicated.to_numpy().argmax()) + 1}: a second row for the situation "
                         f"{dict(situations[duplicated].iloc[0])}")


def replace_rows(path: Path, old: pd.DataFrame, rows: list[dict], columns: tuple[str, ...],
                 situation_key: tuple[str, ...], flag_columns: tuple[str, ...], check) -> pd.DataFrame:
    """old with rows (dicts of `columns`) in place of the rows of their situations, sorted by situation, checked by
    check(df, where) and written to path atomically. Returns the table."""
    new = pd.DataFrame(rows, columns=list(columns))
    check(new, "the rows to record")
    key = list(situation_key)
    keys = lambda df: df[key].astype(str).agg("|".join, axis=1)  # noqa: E731 - a flag True and "True" alike
    kept = old[~keys(old).isin(set(keys(new)))] if len(old) else old
    table = pd.concat([kept, new], ignore_index=True) if len(kept) else new
    for flag in flag_columns:
        table[flag] = table[flag].astype(str) == "True"
    table = table.sort_values(key, kind="stable", ignore_index=True)
    check(table, str(path))
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return table
