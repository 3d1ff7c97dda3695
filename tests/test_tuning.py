"""The LayerNorm tuning tools (benchmarks/tuning/layernorm.py) and the launch table they write
(gnsrepro/kernels/launch_table.json).

The tools' bookkeeping on CPU with stand-ins for the CUDA timers (the kernels run in Triton's interpreter:
tests/conftest.py sets TRITON_INTERPRET=1); the table a sweep chooses, on made-up times whose answer is known;
and the table file: well-formed, covering every size and dtype the kernels dispatch on, refused when it is not.
"""

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch

import benchmarks.tuning.layernorm as T
import gnsrepro.benchmarks.layernorm as L
from gnsrepro.kernels import layer_norm as K

H200_SWEEP = "sweep H200 2026-11-23"  # the sources of launch_table.json's entries today
BWD_H100 = "sweep_bwd H100 2026-11-23 16:00 UTC"
VARIANTS_BF16 = "variants H100 2026-11-23 17:03 UTC"


def stub_gpu(monkeypatch, sms: int = 2) -> None:
    """The tools' GPU set-up on the CPU: the device, its SM count and the 256 MB flush buffer (16 bytes here)."""
    monkeypatch.setattr(L, "_device", lambda name="auto": torch.device("cpu"))
    monkeypatch.setattr(L, "copy_bandwidth_gbps", lambda device, *a, **k: 1.0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(multi_processor_count=sms, name="NVIDIA Stub GPU"))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(16, dtype=torch.uint8) if a == (256 << 20,)
                        else real_empty(*a, **k))


def package_table() -> dict:
    return json.loads(K.LAUNCH_TABLE.read_text())


def entry(table: dict, name: str, block_n: int, nbytes: int) -> dict:
    return next(e for e in table[name] if (e["block_n"], e["bytes"]) == (block_n, nbytes))


# ---------------------------------------------------------------------------------------- the tools


def test_tuning_modes_try_every_configuration_on_a_stub_device(monkeypatch):
    """sweep_bwd and variants on CPU: every configuration reaches the launcher (and runs in the interpreter),
    with a stand-in graph timer that counts its calls."""
    calls = []
    stub_gpu(monkeypatch)
    monkeypatch.setattr(L, "graph_time_us", lambda f, steps, flush=None: calls.append(f()) or float(len(calls)))
    monkeypatch.setattr(L, "BATCH", 2)
    monkeypatch.setattr(L, "SEQ", 8)
    df = T.sweep_bwd(sizes=(34,), dtypes=("bf16",), steps=1, top=2, jobs=2)  # compiled ahead in 2 processes
    assert len(calls) == len(df) and df.us.notna().all()
    assert {0, 2, 3, 4} <= set(df.stages) and set(df.tail_reduce) == {False, True}
    assert (df.phase == 2).sum() == 2 * 4 * 2  # top 2 × programs per SM 1-4 × reduce kernel / tail
    first = df[df.phase == 1].us.idxmin()  # the timer's first call is phase 2's first configuration
    assert df.loc[df.phase == 2].iloc[0][["block_m", "num_warps", "stages"]].tolist() == \
        df.loc[first][["block_m", "num_warps", "stages"]].tolist()
    dv = T.variants(sizes=(34,), dtypes=("bf16",), steps=1)
    assert len(dv) == 8 and set(dv.pdl) == {False, True} and K.PDL is True
    # longer examples on more SMs: 8 chunks per example, so subgroups of 2 give the tail a middle level; 128 rows
    # per example are the fewest that make 8 chunks
    monkeypatch.setattr(L, "SEQ", 128)  # 8 chunks of 16 rows (the launcher's 16 rows per tile at N = 34)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(multi_processor_count=8, name="stub"))
    dv = T.variants(sizes=(34,), dtypes=("bf16",), steps=1, per_sms=(2,), subs=(0, 2, 8), pdls=(False,),
                    tail_rows=(0, 1))
    assert dv.tail_levels.tolist() == [0, 2, 2, 3, 3] and dv.tail_sub.tolist() == [1, 1, 1, 2, 2]  # sub 8: as 0
    assert dv.tail_rows.tolist() == [0, 8, 1, 8, 1]  # 0: the launcher's 8 rows per load at N = 34
    assert (dv.regs == -1).all()  # the interpreter compiles nothing: registers unknown


def test_fixed_costs_on_a_stub_device(monkeypatch):
    """The fixed-cost benchmark's bookkeeping on CPU (interpreter): every kernel and PyTorch op is timed at
    each row count, the line through the timings is fitted, and the backward's main kernel launched alone
    (partials_only) gives the launcher's dx: the same launch, less the reduction."""
    calls = []
    stub_gpu(monkeypatch)
    # a stand-in timer: 10 µs fixed plus 1 µs per 8 rows of the tensors the last call wrote
    monkeypatch.setattr(L, "graph_time_us",
                        lambda f, steps, flush=None: calls.append(f()) or 10.0 + L.BATCH * seq[0] / 8)
    monkeypatch.setattr(L, "BATCH", 2)
    seq = [0]  # the rows per example of the case being timed
    real_cases = L._cases

    def cases(*a, **k):
        seq[0] = k["seq"]
        return real_cases(*a, **k)

    monkeypatch.setattr(L, "_cases", cases)
    df = T.fixed_costs(sizes=(34,), dtypes=("bf16",), seqs=(4, 12), steps=1)
    assert len(df) == 2 and len(calls) == 2 * 7 and df.rows.tolist() == [8, 24]
    for k, tensors in (("copy", 2), ("bwd", 3), ("fwd+bwd", 5)):  # 8 rows per µs of (tensors × 34 bf16) bytes
        assert df[f"{k} fixed_us"].tolist() == pytest.approx([10.0, 10.0])
        assert df[f"{k} steady_pct"].tolist() == pytest.approx([100 * tensors * 34 * 2 * 8 / 1e3] * 2)

    x, w, b, dy, _ = real_cases(torch.device("cpu"), torch.bfloat16, 34, batch=2, seq=12)
    x, w, b = x.detach(), w.detach(), b.detach()
    _, stats, _ = K.layer_norm_forward(x, w, b, 1e-5)
    dx = K.layer_norm_backward(dy, x, w, b, stats)[0]
    assert torch.equal(K.layer_norm_backward(dy, x, w, b, stats, partials_only=True)[0], dx)


def test_precompile_reports_each_configuration_that_fails():
    """The sweep's compile processes run each configuration once and hand back its error, in order."""
    case = ("cpu", "bf16", 40, 2, 6)
    good = dict(block_m=2, num_warps=4, target_programs=3)
    errors = T.precompile_bwd([(*case, good), (*case, dict(good, block_m=3)), (*case, good)], jobs=2)
    assert errors[0] is None and errors[2] is None
    assert errors[1] is not None and "power of 2" in errors[1]
    assert T.precompile_bwd([(*case, good)], jobs=1) == [None]  # one process: nothing compiled ahead


# ---------------------------------------------------------------------------- the table from a sweep


def sweep_rows(kind: str, N: int, dtype: str, times: dict) -> list[dict]:
    """sweep()'s rows for one case: {(block_m, num_warps, per_sm, tail): µs}."""
    return [dict(kind=kind, N=N, dtype=dtype, block_m=bm, num_warps=nw, per_sm=sm, tail=tail, us=us)
            for (bm, nw, sm, tail), us in times.items()]


def test_table_from_sweep_takes_the_least_total_time_over_an_entrys_sizes():
    """N = 768 and 1024 share the 16-bit BLOCK_N = 1024 entry: the configuration fastest at 768 alone (B) loses
    to the one with the least sum (A); one that failed at 1024 (C, NaN) or was not timed there (D) is out, though
    faster at 768. Only the swept fields change and name the new source; the rest keeps its values and sources."""
    import pandas as pd

    a, b, c, d = (2, 8, 1, False), (4, 4, 2, True), (8, 8, 1, False), (1, 4, 4, True)
    df = pd.DataFrame(
        sweep_rows("bwd", 768, "bf16", {a: 40.0, b: 39.0, c: 30.0, d: 20.0})
        + sweep_rows("bwd", 1024, "bf16", {a: 60.0, b: 70.0, c: float("nan")})
        + sweep_rows("bwd", 2048, "bf16", {(1, 8, 2, False): 90.0, (4, 8, 2, False): 80.0})
        + sweep_rows("fwd", 34, "bf16", {(16, 4, 0, False): 5.0})  # BLOCK_N = 64: the launcher's rule, not the table
    )
    base = package_table()
    base["sources"]["only (2048, 2)"] = dict(device="x", date="x", commit=None, command="x")
    entry(base, "backward", 2048, 2)["chosen_by"] = {"block_m": "only (2048, 2)"}
    new = T.table_from_sweep(df, base, "new sweep", dict(device="NVIDIA Stub GPU", date="d", commit="c", command="x"))

    got = entry(new, "backward", 1024, 2)
    assert (got["block_m"], got["num_warps"], got["per_sm"], got["tail"]) == a
    assert type(got["tail"]) is bool and type(got["block_m"]) is int
    assert (got["stages"], got["tail_sub"]) == (3, True)  # not swept: the table's
    assert got["chosen_by"] == dict(block_m="new sweep", num_warps="new sweep", per_sm="new sweep", tail="new sweep",
                                    stages=BWD_H100, tail_sub=VARIANTS_BF16)
    assert entry(new, "backward", 2048, 2)["block_m"] == 4
    for name in ("forward", "backward"):  # what the sweep did not cover is as it was
        for e in new[name]:
            if name == "forward" or e["block_n"] > 2048 or e["bytes"] == 4:
                assert e == entry(base, name, e["block_n"], e["bytes"])
    records = new["sources"]["new sweep"]["measured"]
    measured = {(r["N"], tuple(r["config"].values()), r["chosen"]): r["us"] for r in records}
    assert measured == {(768, a, True): 40.0, (768, d, False): 20.0, (1024, a, True): 60.0,
                        (2048, (4, 8, 2, False), True): 80.0}
    assert "only (2048, 2)" not in new["sources"]  # no entry names it any more
    assert {H200_SWEEP, BWD_H100, VARIANTS_BF16} <= set(new["sources"])
    assert "only (2048, 2)" in base["sources"]  # the table given is left as it was


def test_sweep_writes_the_table_with_its_provenance(monkeypatch, tmp_path, capsys):
    """`--sweep --write-table PATH` end to end on a stub device: the real sweep's rows (a stand-in timer that
    numbers its calls, so each entry's first configuration timed is its fastest), the table the kernel's loader
    accepts, in the tool's own layout, and the run's device, date, commit and command as its source."""
    calls = []
    stub_gpu(monkeypatch, sms=3)
    monkeypatch.setattr(L, "graph_time_us", lambda f, steps, flush=None: calls.append(1) or float(len(calls)))
    monkeypatch.setattr(L, "BATCH", 2)
    monkeypatch.setattr(L, "SEQ", 8)
    path = tmp_path / "launch_table.json"
    argv = ["--sweep", "--sizes", "1000", "--write-table", str(path), "--commit", "abc1234"]
    T.main(argv)
    assert f"written: {path}" in capsys.readouterr().out
    table = json.loads(path.read_text())
    assert path.read_text() == T.launch_table_json(table) + "\n"
    fwd, bwd = K.load_launch_table(path)
    assert fwd[(1024, 2)] == fwd[(1024, 4)] == (1, 1)  # the first forward configuration: 1 row, 1 warp
    assert bwd[(1024, 2)][:4] == (1, 1, 1, False) and bwd[(1024, 2)][4:] == K._BWD_CONFIG[(1024, 2)][4:]
    for key in K.launch_table_keys() - {(1024, 2), (1024, 4)}:
        assert (fwd[key], bwd[key]) == (K._FWD_CONFIG[key], K._BWD_CONFIG[key])
    name = entry(table, "forward", 1024, 2)["chosen_by"]["block_m"]
    source = table["sources"][name]
    assert name.startswith("sweep Stub ") and source["device"] == "NVIDIA Stub GPU" and source["sms"] == 3
    assert source["commit"] == "abc1234" and source["torch"] == torch.__version__
    assert source["command"] == "python -m benchmarks.tuning.layernorm " + " ".join(argv)
    assert {(r["table"], r["dtype"]) for r in source["measured"]} == {
        (t, d) for t in ("forward", "backward") for d in ("bf16", "fp32")}


@pytest.mark.parametrize("argv, message", [
    (["--variants", "--write-table", "t.json"], "--write-table: accepted with --sweep alone"),
    (["--sweep", "--write-table", "no/such/dir/t.json"], "directory does not exist"),
])
def test_write_table_refused_before_any_work(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(T, "sweep", lambda **k: pytest.fail("the sweep ran"))
    with pytest.raises(SystemExit) as exit_:
        T.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and message in err[-1]


# ---------------------------------------------------------------------------------- the table file


def test_launch_table_file_is_well_formed_and_covers_every_dispatched_size():
    """The kernel's table is the file's; it has an entry for every BLOCK_N from 1024 to MAX_N in 2 and 4 bytes,
    so every N and dtype the launchers take finds one; every chosen field names a source that says where and
    how it was measured; and the file is laid out as the tool writes it (a rewrite changes only what changed)."""
    assert (K._FWD_CONFIG, K._BWD_CONFIG) == K.load_launch_table(K.LAUNCH_TABLE)
    assert set(K._FWD_CONFIG) == set(K._BWD_CONFIG) == K.launch_table_keys()
    assert K.launch_table_keys() == {(bn, nb) for bn in (1024, 2048, 4096, 8192) for nb in (2, 4)}
    for N in [1, 512, 513, 768, 1000, 1024, 1025, 2048, 3000, 4097, K.MAX_N]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            key = (K._next_pow2(N), dtype.itemsize)
            fwd, bwd = K._fwd_config(*key), K._bwd_config(*key)
            if N > 512:
                assert (fwd, bwd) == (K._FWD_CONFIG[key], K._BWD_CONFIG[key])
            else:  # the launcher's rule for short rows
                assert key not in K._FWD_CONFIG and bwd.block_m == fwd[0] == min(16, 4096 // key[0])
    table = package_table()
    assert K.LAUNCH_TABLE.read_text() == T.launch_table_json(table) + "\n"
    for name in ("forward", "backward"):
        for e in table[name]:
            assert e["chosen_by"] and set(e["chosen_by"]) <= set(e)
            assert set(e["chosen_by"].values()) <= set(table["sources"])
    for source in table["sources"].values():
        assert source["device"].startswith("NVIDIA ") and re.match(r"\d{4}-\d\d-\d\d", source["date"])
        assert source["command"] and (source["commit"] is None or re.fullmatch("[0-9a-f]{7,40}", source["commit"]))
        assert all(isinstance(r["us"], float) and r["us"] > 0 for r in source["measured"])


def test_launch_table_is_package_data():
    """The kernel reads the file at import, so the wheel the GPU machine installs must carry it."""
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    assert re.search(r'^"gnsrepro\.kernels" = \[[^\]]*"launch_table\.json"', pyproject, re.MULTILINE)


def broken(change):
    table = package_table()
    change(table)
    return table


@pytest.mark.parametrize("change, message", [
    (lambda t: t["backward"].pop(), r"'backward' has no entry for \(block_n, bytes\) \[\(8192, 4\)\]"),
    (lambda t: t["forward"].append(copy.deepcopy(t["forward"][0])), r"\(1024, 2\) is given twice"),
    (lambda t: t["forward"][0].update(block_n=768), "block_n must be a power of two from 1024 to 8192"),
    (lambda t: t["forward"][1].update(num_warps=3), "num_warps must be a power of two, got 3"),
    (lambda t: t["backward"][0].update(tail=1), "tail must be true or false, got 1"),
    (lambda t: t["backward"][0].update(depth=3), "depth must be 1 or 2"),
    (lambda t: t["backward"][0].update(tail_subs=True), "fields must be block_m, num_warps, per_sm"),
    (lambda t: t["backward"][0].pop("maxnreg"), "fields must be"),
    (lambda t: t["forward"][0]["chosen_by"].update(block_m="nobody"), "chosen_by must map its fields to names"),
    (lambda t: t["sources"][H200_SWEEP].pop("commit"), f"source '{H200_SWEEP}' lacks commit"),
])
def test_load_launch_table_refuses_a_malformed_table(change, message, tmp_path):
    path = tmp_path / "launch_table.json"
    path.write_text(json.dumps(broken(change)))
    with pytest.raises(ValueError, match=message) as error:
        K.load_launch_table(path)
    assert str(error.value).startswith(f"launch table {path}: ") and "\n" not in str(error.value)
