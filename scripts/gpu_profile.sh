#!/usr/bin/env bash
# Runs on the GPU machine (staged as .device/profile.sh by scripts/gpu_session.sh): ncu sections and
# stall-reason samples of the fused GEMV for three configurations, one text report each under $OUT.
set -u
export PATH="$PATH:/usr/local/cuda/bin"
here=$(cd "$(dirname "$0")" && pwd)
source <(sed -n '/^libdir=/,/^export LD_LIBRARY_PATH/p' $here/run_on_gpu.sh)
# The bench is staged gzipped (scripts/gpu_session.sh); run_on_gpu.sh unpacks it, or this does.
[ -x "$here/benches/gemv" ] || { mkdir -p "$here/benches" && gunzip -c "$here/packed/benches/gemv.gz" > "$here/benches/gemv" && chmod +x "$here/benches/gemv"; }
for cfg in "4096x14336 16 16 2" "14336x4096 1 1 2" "4096x4096 16 16 2"; do
  set -- $cfg
  MESWITCH_BENCH_SHAPES=$1 MESWITCH_BENCH_BATCH=$2 MESWITCH_BENCH_EXPERTS=$3 MESWITCH_BENCH_BITS=$4 MESWITCH_BENCH_BASELINES=0 \
  MESWITCH_BENCH_WARMUP_MS=10 MESWITCH_BENCH_MEASURE_MS=10 MESWITCH_BENCH_OUT=/tmp/bo CRITERION_HOME=/tmp/crit \
  timeout 200 ncu --kernel-name regex:meswitch_multi_expert --launch-skip 5 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy --section SchedulerStats \
    --metrics smsp__pcsamp_warps_issue_stalled_long_scoreboard,smsp__pcsamp_warps_issue_stalled_wait,smsp__pcsamp_warps_issue_stalled_math_pipe_throttle,smsp__pcsamp_warps_issue_stalled_short_scoreboard,smsp__pcsamp_warps_issue_stalled_barrier,smsp__pcsamp_warps_issue_stalled_not_selected,smsp__pcsamp_warps_issue_stalled_selected,smsp__pcsamp_warps_issue_stalled_lg_throttle,smsp__pcsamp_warps_issue_stalled_mio_throttle,smsp__pcsamp_warps_issue_stalled_no_instructions,smsp__inst_executed.sum \
    $here/benches/gemv --bench > $OUT/ncu_$1_B$2_E$3.txt 2>&1
  echo "ncu $cfg rc=$?"
done
