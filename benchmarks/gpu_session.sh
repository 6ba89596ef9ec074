#!/usr/bin/env bash
# What one device session runs on the H200 (see BENCHMARKS.md): wheels, a GPU smoke run through
# `invoke train`, the throughput benchmark, then the shapes-4k convergence run for the time left.
# EPOCH_SPEED: the trainer's --speed for `epoch` and `parts` (e.g. fast-without:prefetch: a lever's effect).
# EPOCH_TRAIN / EPOCH_VAL: the set's sizes for `epoch` and `parts`; PARTS_WORKERS: epoch_parts --workers.
# usage: bash benchmarks/gpu_session.sh PART...   (PART: smoke | doctor | bench | coco | syncs | profile | epoch | parts | masks | trees | layout | eval | converge | stability)
# SYNCS_FLAGS: profile_step.py's flags for `syncs` (the host waits of one step at 12, by site), e.g. --roialign.
# BENCH_VARIANTS: train_throughput.py --variants (default: its own); BENCH_CHECKS: its --checks (default: all).
# BENCH_CALIBRATE: its --calibrate-on for `coco` (e.g. /tmp/mlperf-epoch-level/coco-shaped/train2017 after `parts`).
# BENCH_LR: its --lr for `bench` and `coco` (default: the closed schedule from a run's first step; 0.01: the old constant).
# CONVERGE_SPEED: the trainer's --speed for `converge` (default: fast).
# PROFILE_FLAGS: profile_step.py's flags for `profile` (stages and top operators of a step at 12).
# `trees` times the step of each tree named in TREES, one process each, alternating, TREES_RUNS times
# (default 2): `new` is this tree, anything else .b/NAME, made beforehand on a machine with the clone:
# mkdir -p .b/C && git archive C object_detection benchmarks mlperf | tar -x -C .b/C  (carry .b).
# `layout` times the tree in .old/
# (an earlier commit: git archive COMMIT | tar -x -C .old) and this one on the same legacy batches.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
df -h /dev/shm | tee -a "$OUT/gpu.txt"; nproc | tee -a "$OUT/gpu.txt"
# cores against hardware threads: loader workers share the cores the trainer's host thread runs on
lscpu | grep -E "^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|CPU\(s\)|NUMA node\(s\))" >> "$OUT/gpu.txt"
export INVOKE_MLPERF_DATA_DIR=/tmp/data INVOKE_MLPERF_RESULTS_DIR=/tmp/results
for part in "${@:-bench}"; do
case "$part" in
  smoke)
    python3 -m invoke fetch --dataset shapes && python3 -m invoke verify --dataset shapes || exit 1
    timeout 120 python3 -m invoke train --dataset shapes --max-epochs 1 --log "$OUT/smoke.txt" 2>&1 | tail -15
    python3 -m mlperf_logging.compliance_checker --usage training --ruleset 3.1.0 "$OUT/smoke.txt" 2>&1 | tail -3
    ;;
  doctor)
    python3 -m invoke doctor --dataset shapes 2>&1 | tee "$OUT/doctor.txt" | tail -30
    ;;
  epoch)
    tag=$(echo "${EPOCH_SPEED:-fast}" | tr ':,' '--')
    timeout ${EPOCH_S:-420} python3 -m benchmarks.epoch_level --train-images ${EPOCH_TRAIN:-6000} \
      --val-images ${EPOCH_VAL:-5000} --epochs ${EPOCH_N:-2} --speed ${EPOCH_SPEED:-fast} \
      --output "$OUT/epoch_level-$tag.json" > "$OUT/epoch-$tag.txt" 2>&1
    echo "epoch_level ${EPOCH_SPEED:-fast} exit $?"
    grep -E "img/s\)|evaluation|warmed|run_stop|error|Error|train_s" "$OUT/epoch-$tag.txt" | cut -c1-200 | tail -14
    ;;
  parts)
    timeout ${PARTS_S:-300} python3 -m benchmarks.epoch_parts --steps ${PARTS_STEPS:-100} \
      --train-images ${EPOCH_TRAIN:-6000} --val-images ${EPOCH_VAL:-5000} --workers ${PARTS_WORKERS:-8} --speed ${EPOCH_SPEED:-fast} --output "$OUT/epoch_parts.json" > "$OUT/parts.txt" 2>&1
    echo "epoch_parts exit $?"; grep -v "^epoch 1 iter" "$OUT/parts.txt" | tail -22
    ;;
  masks)  # the mask targets' ways (fast.rasterise's kernel: its time and the RoIs it draws differently)
    timeout ${MASKS_S:-180} python3 -m benchmarks.mask_targets --output "$OUT/mask_targets.json" 2>&1 | tail -3
    ;;
  bench)
    timeout ${BENCH_S:-330} python3 -m benchmarks.train_throughput --check --batch-sizes 8,16,32 --iterations 15 \
      ${BENCH_VARIANTS:+--variants "$BENCH_VARIANTS"} ${BENCH_LR:+--lr "$BENCH_LR"} --output "$OUT/train_throughput.json" 2>&1 \
      | tee "$OUT/bench.txt" | grep -v '^{' | tail -20
    ;;
  coco)
    timeout ${BENCH_S:-300} python3 -m benchmarks.train_throughput --check --batch-sizes 12 --iterations 15 \
      --rounds ${BENCH_ROUNDS:-2} ${BENCH_CHECKS:+--checks "$BENCH_CHECKS"} ${BENCH_VARIANTS:+--variants "$BENCH_VARIANTS"} \
      ${BENCH_CALIBRATE:+--calibrate-on "$BENCH_CALIBRATE"} ${BENCH_LR:+--lr "$BENCH_LR"} --output "$OUT/train_throughput-coco.json" 2>&1 \
      | tee "$OUT/coco.txt" | grep -v '^{' | tail -24
    ;;
  syncs)
    timeout ${SYNCS_S:-150} python3 -m benchmarks.profile_step --recipe reference --batch 12 --syncs ${SYNCS_FLAGS:-} 2>&1 \
      | tee "$OUT/syncs$(echo ${SYNCS_FLAGS:-} | tr -d ' -').txt" | tail -12
    ;;
  profile)
    report="$OUT/profile$(echo ${PROFILE_FLAGS:-} | tr -d ' -' | tr / _).txt"
    timeout ${PROFILE_S:-150} python3 -m benchmarks.profile_step --recipe reference --batch 12 ${PROFILE_FLAGS:-} \
      > "$report" 2>&1; echo "profile_step exit $?"
    head -9 "$report"
    ;;
  trees)
    v=${TREES_VARIANT:-ref-bf16-rpncl-fused-roialign}
    for run in $(seq ${TREES_RUNS:-2}); do
      for tree in ${TREES:?TREES: the trees to time}; do
        dir=.b/$tree; [ "$tree" = new ] && dir=.
        (cd "$dir" && PYTHONPATH=/tmp/site:. timeout ${TREES_S:-90} python3 -m benchmarks.train_throughput --rounds 1 \
          --iterations 20 --variants $v --baseline $v --output "$OUT/trees-$tree-$run.json" 2>&1 | grep "^$v" | sed "s/^/$tree $run /")
      done
    done
    ;;
  layout)
    for bs in ${LAYOUT_BATCHES:-16}; do
      (cd .old && PYTHONPATH=/tmp/site timeout 150 python3 benchmarks/train_throughput.py --batch-sizes $bs \
        --iterations 15 --variants stock-fp16,ours-bf16-rpncl-fused --output "$OUT/before-$bs.json" 2>&1 | tail -4)
      timeout 150 python3 -m benchmarks.train_throughput --shapes legacy --batches 3 --rounds 1 --batch-sizes $bs \
        --iterations 15 --variants stock-fp16,ours-bf16-rpncl-fused --baseline stock-fp16 \
        --output "$OUT/after-$bs.json" 2>&1 | tail -4
    done
    ;;
  eval)
    timeout 300 python3 -m benchmarks.eval_loader --workers 8 --loader-images 256 --eval-images 256 \
      --output "$OUT/eval_loader.json" 2>&1 | tail -12
    for t in 0 0.05; do
      timeout 90 python3 -m benchmarks.profile_eval --score-thresh $t > /dev/null 2>&1; head -3 "$OUT/profile_eval-$t.txt"
    done
    ;;
  converge)
    t0=$(date +%s)
    python3 -m invoke fetch --dataset shapes-4k && python3 -m invoke verify --dataset shapes-4k || exit 1
    echo "dataset ready in $(( $(date +%s) - t0 )) s"
    timeout ${CONVERGE_S:-480} python3 -m invoke train --dataset shapes-4k --max-epochs 40 --seed 1 \
      ${CONVERGE_SPEED:+--speed "$CONVERGE_SPEED"} --log "$OUT/shapes4k.txt" > "$OUT/converge_stdout.txt" 2>&1
    echo "train exit $?"
    grep -E "eval_accuracy|run_stop|img/s\)" "$OUT/converge_stdout.txt" | cut -c1-220 | tail -40
    ;;
  stability)
    timeout ${STABILITY_S:-480} python3 -m benchmarks.stability ${STABILITY_VARIANTS:-base,amp16,ampoff} 2>&1 \
      | tee "$OUT/stability.txt" | grep -E "^[a-z0-9-]+: exit"
    ;;
  *) echo "unknown part $part" >&2; exit 1 ;;
esac
done
