#!/usr/bin/env bash
# One lease of a GPU machine, used in one call: every GPU check of the numba_cuda
# backend, each phase under its own time limit, logs under $OUT.
#
# Usage on the device machine (from the repository root, .whl carried; see
# docs/numba_cuda.md "Running the GPU checks"):
#
#     bash tools/gpu_session.sh [PHASE ...]
#
# Phases: env overhead asv tests (the group "first": what session 24's run, 2026-11-28,
# left open or could not read; its limits add up to ~9 min, so give GPU_SESSION_SECONDS=565
# in a 600 s call, carry .whl and .git) and torch trainloop small gemm ncu sanitizer (the
# group "second", ~10 min).
# Default: "first"; "all" runs both, most valuable first,
# for a machine without the 10-minute cap. Every phase appends to
# $OUT/session.log (the device tool returns at most 8 files); a phase that runs
# past its limit is killed and the next one starts. GPU_SESSION_SECONDS=N caps the
# whole run at N seconds (each phase gets at most what is left). The image's NumPy 2.5 cannot
# compile numba-cuda 0.30.4 kernels, so NumPy 2.4 is installed from the carried
# wheels first.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > /tmp/wheels.txt 2>&1 || { echo "wheel install failed"; cat /tmp/wheels.txt; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LSTMENG_REAL_CUDA=1
unset NUMBA_ENABLE_CUDASIM

first=(env overhead asv tests)
second=(torch trainloop small gemm ncu sanitizer)
phases=()
for name in "${@:-first}"; do
    case $name in
    first) phases+=("${first[@]}") ;;
    second) phases+=("${second[@]}") ;;
    all) phases+=("${first[@]}" "${second[@]}") ;;
    *) phases+=("$name") ;;
    esac
done
START=$(date +%s)

run_phase() {   # name, limit in seconds, command...
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    if [ -n "${GPU_SESSION_SECONDS:-}" ]; then
        # One device call's budget for all phases: a phase gets what is left of it (less 10 s
        # for the copy back), and none starts with under 20 s.
        local left=$(( START + GPU_SESSION_SECONDS - t0 - 10 ))
        if [ "$left" -lt 20 ]; then echo "== $name skipped: ${left}s left" | tee -a "$OUT/session.log"; return; fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "== $name (limit ${limit}s) at +$((t0 - START))s"
    echo "==== phase $name" >> "$OUT/session.log"
    # Streamed into session.log as it runs, so a phase cut short by the call's end still reports.
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/session.log" > "/tmp/phase_$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/session.log" >> "/tmp/phase_$name.txt"
    tail -n 25 "/tmp/phase_$name.txt"
}

for phase in "${phases[@]}"; do
    case $phase in
    env)
        run_phase env 45 bash -c 'nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv;
            python3 -c "import numpy, numba, numba_cuda, torch, cupy; print(\"numpy\", numpy.__version__, \"numba\", numba.__version__,
            \"numba-cuda\", numba_cuda.__version__, \"torch\", torch.__version__, \"cudnn\", torch.backends.cudnn.version(), \"cupy\", cupy.__version__)";
            python3 -m lstmeng info 2>&1 | tail -n 30' ;;
    small)
        run_phase small 170 python3 benchmarks/gpu_small_batch.py --out "$OUT" ;;
    torch)
        # Issue 19 on a GPU: lstmeng.torch on CUDA tensors (zero-copy numba_cuda, PyTorch's
        # streams) against torch.nn.LSTM, then the training benchmark against cuDNN.
        run_phase torch 150 bash -c 'python3 -m pytest -q -p no:cacheprovider --timeout=100 tests/test_torch_module.py -k cuda;
            python3 benchmarks/torch_fit.py --device cuda --quick' ;;
    gemm)
        run_phase gemm 100 python3 benchmarks/gpu_gemm.py --out "$OUT" ;;
    overhead)
        # --profile: launch and allocation costs and cProfile of the calls (where the host time goes);
        # then the same calls with numba allocating through a cache (is it cuMemAlloc / cuMemFree?),
        # and inside one require_context scope each (what do numba's context lookups cost?).
        run_phase overhead 150 bash -c 'python3 benchmarks/gpu_bench.py --overhead --profile;
            python3 benchmarks/gpu_bench.py --overhead --caching-allocator;
            python3 benchmarks/gpu_bench.py --overhead --context-scope' ;;
    trainloop)
        run_phase trainloop 75 python3 benchmarks/gpu_bench.py --train-loop ;;
    tests)
        # On an H200 (2026-11-28) each small-batch case took 14-30 s, nearly all of it compiling
        # (numba, NVVM, the cooperative-launch link): 12 pytest-xdist workers compile on 12 of
        # the 16 cores (collection order is the order workers take cases in). Session 24's run
        # (cfb74ac) held 295 of these 621 cases in 200 s, the light files first, and
        # test_backend_numba_cuda.py whole in a call of its own; the small-batch file, least run
        # on a GPU, goes first now.
        run_phase tests 200 python3 -m pytest -q -n 12 -rfE --durations=8 -p no:cacheprovider --timeout=150 \
            tests/test_cuda_small_batch.py tests/test_cuda_gemm.py tests/test_optim.py tests/test_device_layers.py \
            tests/test_device_residency.py tests/test_backend_numba_cuda.py ;;
    ncu)
        # One kernel of the small-batch forward at B=1, H=1024, T=200 (clocks left alone).
        run_phase ncu 90 ncu --clock-control none --kernel-name regex:'forward' --launch-skip 2 --launch-count 1 \
            --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
            python3 benchmarks/gpu_profile_one.py ;;
    sanitizer)
        run_phase sanitizer 90 bash -c 'for tool in racecheck synccheck; do
            compute-sanitizer --tool $tool --print-limit 20 python3 benchmarks/gpu_profile_one.py --small; done' ;;
    asv)
        # numba_cuda rows of the asv suite for this commit, filed under the GPU's machine name.
        # The image has no asv (2026-11-28): its wheels are carried in .whl/asv (docs/numba_cuda.md)
        # and installed apart. asv drops PYTHONPATH in the benchmarks' processes and sets
        # ASV_PYTHONPATH there instead: NumPy 2.4 and the project must come from it. asv reads
        # the commit's hash and date from git: the call carries .git too.
        run_phase asv 150 bash -c 'git rev-parse HEAD > /dev/null 2>&1 || { echo "no git repository here: carry .git"; exit 1; }
            python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/asvsite .whl/asv/*.whl \
                > /tmp/asv_wheels.txt 2>&1 || { echo "asv wheels missing in .whl/asv"; cat /tmp/asv_wheels.txt; exit 1; }
            export ASV_PYTHONPATH=$PYTHONPATH:/tmp/asvsite PYTHONPATH=/tmp/asvsite:$PYTHONPATH PATH=/tmp/asvsite/bin:$PATH
            cd asv_bench && machine=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr " " "-" | tr A-Z a-z) &&
            asv machine --yes --machine "$machine" > /dev/null &&
            LSTMENG_ASV_BACKENDS=numba_cuda asv run -E existing:python3 --set-commit-hash $(git rev-parse HEAD) --machine "$machine" \
                -a repeat=5 -a warmup_time=0.2 --show-stderr &&
            tar -cf "$OUT/asv_results.tar" results/"$machine"' ;;
    *) echo "unknown phase $phase" ;;
    esac
done
echo "== done in $(( $(date +%s) - START ))s"
