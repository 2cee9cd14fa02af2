#!/bin/bash
# Run one pytest selection at several commits at once on a GPU machine, in one device call.
#
# Here (prepare):  bash bench/gpu_bisect.sh prepare NAME=COMMIT [NAME=COMMIT ...]
#   writes build/bisect/NAME/ (ep_comm, kernels, tests, pyproject.toml of COMMIT; build/ is
#   ignored by git): carry ".whl" and "build/bisect" in the device call.
# There (run):     bash bench/gpu_bisect.sh run [ENV=VALUE ...] -- PYTEST_ARGS...
#   runs `pytest PYTEST_ARGS` in every build/bisect/NAME at once (each tree on PYTHONPATH, its
#   kernels/ linked as ep_comm/kernels, as bench/gpu_suite.sh's tree of links), each with
#   BISECT_TIMEOUT seconds (default 200), ranks sharing the GPU as in the suite; ENV=VALUE pairs
#   are set for every tree, and a tree NAME whose name ends in "-nocpp" also gets
#   EP_COMM_HOST_EXT=0 (the Python path only). Writes $OUT/bisect-NAME.log and prints one line
#   per tree (rc, seconds, pytest's result line) as each ends, then the failures' first lines.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
case ${1:-} in
prepare)
    shift
    for spec in "$@"; do
        name=${spec%%=*} sha=${spec#*=}
        rm -rf "build/bisect/$name" && mkdir -p "build/bisect/$name"
        git archive "$sha" ep_comm kernels tests pyproject.toml | tar -x -C "build/bisect/$name"
        echo "build/bisect/$name: $(git log --oneline -1 "$sha" | cut -c1-100)"
    done
    ;;
run)
    shift
    ENVS=()
    while (($#)) && [[ $1 != -- ]]; do ENVS+=("$1"); shift; done
    shift
    OUT=${OUT:-/tmp/bisect_out}
    mkdir -p "$OUT"
    PY=${PYTHON:-python3}
    shopt -s nullglob
    WHEELS=(.whl/*.whl)
    if ((${#WHEELS[@]})); then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "${WHEELS[@]}" > /dev/null 2>&1
    fi
    export EP_COMM_TEST_RANKS_PER_GPU=${EP_COMM_TEST_RANKS_PER_GPU:-8}
    export EP_COMM_TEST_MAX_GPU_PROCS=${EP_COMM_TEST_MAX_GPU_PROCS:-6}
    T0=$SECONDS
    for d in build/bisect/*/; do
        d=$REPO/${d%/}
        name=$(basename "$d")
        ln -sfn ../kernels "$d/ep_comm/kernels"
        extra=()
        [[ $name == *-nocpp ]] && extra=(EP_COMM_HOST_EXT=0)
        ( cd "$d" && env "${ENVS[@]}" "${extra[@]}" PYTHONPATH="$d:/tmp/site" \
            EP_COMM_TEST_PRINT_DURATIONS=1 timeout -k 5 "${BISECT_TIMEOUT:-200}" \
            "$PY" -m pytest -q -p no:cacheprovider "$@" > "$OUT/bisect-$name.log" 2>&1
          rc=$?
          echo "$name rc=$rc $((SECONDS - T0))s $(grep -E '(passed|failed|error|skipped)' "$OUT/bisect-$name.log" | tail -n 1)" ) &
    done
    wait
    for f in "$OUT"/bisect-*.log; do
        echo "=== $f"
        grep -E "^E  |^FAILED" "$f" | head -n 12 | cut -c1-300
    done
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
