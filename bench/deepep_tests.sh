#!/usr/bin/env bash
# Run DeepEP's own tests against ep_comm, from a temporary folder, with only the import line
# changed. Prints one PASS/FAIL line per test and a summary line.
#
#   bash bench/deepep_tests.sh DEEPEP                 run (DEEPEP: see below)
#   bash bench/deepep_tests.sh --export GITDIR DEST   extract the needed DeepEP files from a git
#                                                     dir (e.g. a bare mirror) into DEST, to carry
#                                                     to a machine without network (DEST under
#                                                     build/, which git ignores)
#
# DEEPEP is either a DeepEP git dir (its files are extracted with `git archive`) or a folder
# made by --export (v1/ = commit 567632d, v2/ = commit dd758ca). DeepEP's code is never copied
# into the repository: it is extracted into mktemp -d and run there.
#
# What the harness changes, exactly (nothing else; no assertion):
#   * every test:            `import deep_ep` -> `import ep_comm.compat.deep_ep as deep_ep` (DeepEP v1 semantics:
#                            dispatch zeroes the weights of experts on other ranks)
#   * v1 tests/utils.py:     two lines appended that wrap bench_kineto with
#                            ep_comm.compat.kineto.wrap_bench_kineto: the hook-mode timing
#                            (num_kernels_per_period > 1) looks for C++ '::dispatch' /
#                            '::combine' kernel names that ep_comm's extern "C" kernels lack; the
#                            wrapper times ep_comm's kernels by substring instead. Timing only.
#   * v2:                    DeepEP's deep_ep/utils/*.py are used verbatim under the package name
#                            deep_ep; its __init__.py is replaced by a two-line shim re-exporting
#                            ep_comm.compat.deep_ep, and deep_ep/_C.py re-exports
#                            ep_comm.compat.deepep_c (topk_idx_t, Config, EventHandle, ...).
#   * v2 test_ep runs with --skip-perf-test (its own flag): its perf section profiles
#     DeepEP's kernel names (dispatch_impl, ...), which ep_comm's kernels do not have.
#
# Environment: NPROC (processes per test, default 1; DeepEP's init_dist binds rank i to
# cuda:i, so NPROC needs NPROC GPUs), V1_INTRANODE_ARGS, V1_LL_ARGS, V2_EP_ARGS (extra
# arguments), ONLY (regex of test names to run), TEST_TIMEOUT (seconds per test, default 900),
# PARALLEL (1: the tests run at once, each on its own port; 2: two lanes at once, v1's tests one
# after the other beside v2's; default 0, one after the other),
# LOG_DIR (default $OUT or the temp folder), PYTHON (default python).
set -uo pipefail
V1=567632d
V2=dd758ca
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

extract() {  # extract GITDIR DEST: the DeepEP files the harness needs, both commits
    local git="$1" dest="$2" tmp
    mkdir -p "$dest/v1" "$dest/v2"
    tmp="$(mktemp -d)"
    git --git-dir="$git" archive "$V1" tests | tar -x -C "$tmp" && cp -r "$tmp/tests" "$dest/v1/"
    rm -rf "$tmp"; tmp="$(mktemp -d)"
    git --git-dir="$git" archive "$V2" deep_ep/utils tests | tar -x -C "$tmp" \
        && cp -r "$tmp/deep_ep" "$tmp/tests" "$dest/v2/"
    rm -rf "$tmp"
}

if [ "${1:-}" = "--export" ]; then
    [ $# -eq 3 ] || { echo "usage: $0 --export GITDIR DEST" >&2; exit 2; }
    extract "$2" "$3" && echo "DeepEP test files of $V1 and $V2 in $3"
    exit $?
fi
[ $# -eq 1 ] || { echo "usage: $0 DEEPEP_GITDIR_OR_EXPORTED_FOLDER" >&2; exit 2; }
SRC="$1"
PY="${PYTHON:-python}"
NPROC="${NPROC:-1}"
TIMEOUT="${TEST_TIMEOUT:-900}"
WORK="$(mktemp -d /tmp/deepep_tests.XXXXXX)"
LOG_DIR="${LOG_DIR:-${OUT:-$WORK}}"
mkdir -p "$LOG_DIR"

if [ -d "$SRC/v1/tests" ] && [ -d "$SRC/v2/deep_ep/utils" ]; then
    cp -r "$SRC/v1" "$SRC/v2" "$WORK/"
else
    extract "$SRC" "$WORK" || { echo "FAIL  extract DeepEP files from $SRC"; exit 1; }
fi

# The import line, and nothing else, in every test that runs.
for f in "$WORK/v1/tests/test_intranode.py" "$WORK/v1/tests/test_low_latency.py" \
         "$WORK/v2/tests/elastic/test_ep.py"; do
    sed -i 's/^import deep_ep$/import ep_comm.compat.deep_ep as deep_ep/' "$f"
    grep -q '^import ep_comm.compat.deep_ep as deep_ep$' "$f" || { echo "FAIL  import line not found in $f"; exit 1; }
done
cat >> "$WORK/v1/tests/utils.py" <<'EOF'
from ep_comm.compat.kineto import wrap_bench_kineto as _ep_comm_wrap_bench_kineto  # ep_comm harness
bench_kineto = _ep_comm_wrap_bench_kineto(bench_kineto)  # ep_comm harness: hook-mode timing by ep_comm kernel names
EOF
cat > "$WORK/v2/deep_ep/__init__.py" <<'EOF'
# ep_comm harness: DeepEP's deep_ep/utils run verbatim; the package's names come from ep_comm.
from ep_comm.compat.deep_ep import *  # noqa: F401,F403
EOF
cat > "$WORK/v2/deep_ep/_C.py" <<'EOF'
# ep_comm harness: DeepEP's compiled module, answered by ep_comm.
from ep_comm.compat.deepep_c import *  # noqa: F401,F403
EOF

export PYTHONPATH="$ROOT:$WORK/v2${PYTHONPATH:+:$PYTHONPATH}"
export EP_SUPPRESS_NCCL_CHECK=1
port=29600
# run NAME DIR ARGS...: one test; its PASS/FAIL line (and a failure's last error lines) goes to
# $WORK/result-NAME, printed in order at the end (the tests may run at once: PARALLEL=1)
run() {
    local name="$1" dir="$2"; shift 2
    port=$((port + 7))  # each test its own port, so that tests at once do not collide
    if [ -n "${ONLY:-}" ] && ! [[ "$name" =~ $ONLY ]]; then return; fi
    NAMES+=("$name")
    [ "${DRY:-0}" = 1 ] && return  # names only (the lanes of PARALLEL=2)
    local log="$LOG_DIR/deepep-$name.log" res="$WORK/result-$name"
    (
        t0=$SECONDS
        (cd "$dir" && MASTER_PORT=$port timeout "$TIMEOUT" "$PY" "$@") > "$log" 2>&1
        rc=$?
        if [ $rc -eq 0 ]; then
            printf 'PASS  %-28s %4ds  %s\n' "$name" $((SECONDS - t0)) "$log" > "$res"
        else
            printf 'FAIL  %-28s %4ds  rc=%d  %s\n' "$name" $((SECONDS - t0)) $rc "$log" > "$res"
            grep -E 'Error|assert' "$log" | tail -3 | sed 's/^/      /' >> "$res"
        fi
        [ "${PARALLEL:-0}" = 0 ] && cat "$res"
    ) &
    [ "${PARALLEL:-0}" = 1 ] || wait $!
}
NAMES=()
v1_tests() {
    run v1-test_intranode "$WORK/v1/tests" test_intranode.py --num-processes "$NPROC" ${V1_INTRANODE_ARGS:-}
    run v1-test_low_latency "$WORK/v1/tests" test_low_latency.py --num-processes "$NPROC" ${V1_LL_ARGS:-}
}
v2_tests() {
    run v2-test_ep "$WORK/v2" tests/elastic/test_ep.py --num-processes "$NPROC" --skip-perf-test ${V2_EP_ARGS:-}
    run v2-test_ep-deterministic "$WORK/v2" tests/elastic/test_ep.py --num-processes "$NPROC" --skip-perf-test --deterministic ${V2_EP_ARGS:-}
    run v2-test_ep-no-cpu-sync "$WORK/v2" tests/elastic/test_ep.py --num-processes "$NPROC" --skip-perf-test --do-cpu-sync 0 --masked-ratio 0.1 ${V2_EP_ARGS:-}
}
if [ "${PARALLEL:-0}" = 2 ]; then
    # two lanes at once, each one test after the other: v1's and v2's (one GPU of 80 GB ran
    # out of memory with all three at once beside the GPU tests, 2026-12-07 run 7, and one
    # after the other they take ~340 s: more than the GPU suite's test step)
    DRY=1 v1_tests
    DRY=1 v2_tests
    ( PARALLEL=3; v1_tests ) &
    ( PARALLEL=3; port=29800; v2_tests ) &  # its own ports: the lanes' counters are copies
fi
if [ "${PARALLEL:-0}" != 2 ]; then
    v1_tests
    v2_tests
fi
wait
pass=0; fail=0
for name in "${NAMES[@]}"; do
    [ "${PARALLEL:-0}" != 0 ] && cat "$WORK/result-$name"
    if grep -q '^PASS' "$WORK/result-$name" 2> /dev/null; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
done
echo "deepep_tests: $pass passed, $fail failed (NPROC=$NPROC, DeepEP v1 $V1 / v2 $V2, logs in $LOG_DIR)"
[ $fail -eq 0 ]
