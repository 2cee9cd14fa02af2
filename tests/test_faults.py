"""Ranks that disagree, die, stall or skip a call: detected, named and recovered, never silent.

CPU (gloo, reference backend), 2 and 4 ranks. Disagreements and bad inputs leave the group
healthy, so they share the session's rank pools (conftest.cpu_ranks); lost and stalled peers
break the group, so each gets a fresh pool with a short EP_COMM_TIMEOUT_S. Every rank must end
within the timeout + 2 s with the named error; results after recovery are checked exactly.
GPU variants (kernels backend, 2 ranks sharing one GPU) are at the end, marked gpu.
"""
import time

import pytest

import fault_cases as fc
from multiproc import RankPool

TIMEOUT_S = 3.0
LIMIT_S = TIMEOUT_S + 2.0


def run_fresh(fn, n, *args, env=None):
    """Run ``fn`` on a fresh pool of ``n`` ranks; returns (results, seconds to close the pool:
    the survivors' exit, which must not hang on a failed group)."""
    pool = RankPool(n, env={"EP_COMM_TIMEOUT_S": str(TIMEOUT_S), **(env or {})}, timeout=120)
    try:
        res = pool.run(fn, *args)
    except BaseException:
        pool.close(force=True)
        raise
    t0 = time.monotonic()
    pool.close()
    return res, time.monotonic() - t0


# ------------------------------------------------------------------ disagreements
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("kind,field", [
    ("hidden", "hidden"), ("num_experts", "num_experts"), ("topk", "num_topk"),
    ("dtype", "dtype"), ("reorder", "hidden"), ("skip", "op"), ("ll_hidden", "hidden"),
    ("ll_fp8", "dtype")])
def test_disagreement_is_named_on_every_rank_before_data_moves(cpu_ranks, n, kind, field):
    odd = n - 1
    results = cpu_ranks(n).run(fc.task_disagree, kind, odd)
    for rank, res in enumerate(results):
        assert res["error"] == "CollectiveMismatchError", (rank, res)
        assert res["field"] == field, (rank, res["message"])
        if n > 2:  # with a majority the culprit is known
            assert res["odd"] == [odd], (rank, res["message"])
        assert f"rank {rank}:" in res["message"] and f"{field}=" in res["message"]
        assert res["elapsed"] < 5, res  # no waiting for a timeout
        assert res["after"] == "exact"
    assert len({r["message"].split(":", 1)[1] for r in results}) == 1, "ranks say different things"


# ------------------------------------------------------------------ expert ids out of range
BAD_IDS = fc.BAD_IDS


@pytest.mark.parametrize("value", list(BAD_IDS))
@pytest.mark.parametrize("where", ["layout", "dispatch", "ll"])
def test_out_of_range_expert_id_is_named_on_one_rank(cpu_ranks, where, value):
    results = cpu_ranks(2).run(fc.task_bad_ids, where, value, 1)
    bad = BAD_IDS[value](16)
    assert results[1]["error"] == "InputError", results[1]
    assert f"topk_idx[3, 1] = {bad}" in results[1]["message"] and "token 3" in results[1]["message"]
    assert "[-1, 16)" in results[1]["message"]
    if where == "layout":  # a local call: the other rank is not involved
        assert results[0]["error"] is None
    else:
        assert results[0]["error"] == "PeerInputError", results[0]
        assert "rank 1 rejected" in results[0]["message"] and f"= {bad}" in results[0]["message"]
        assert results[0]["elapsed"] < 5
    assert all(r["after"] == "exact" for r in results)


@pytest.mark.parametrize("where", ["layout", "dispatch", "ll"])
def test_out_of_range_expert_id_on_every_rank_is_never_inferred(cpu_ranks, where):
    """E+1 on every rank: before, num_experts was inferred as E+2 and results were wrong."""
    results = cpu_ranks(4).run(fc.task_bad_ids, where, "E+1", None)
    for res in results:
        assert res["error"] == "InputError", res
        assert "topk_idx[3, 1] = 17" in res["message"] and "num_experts=16" in res["message"]
        assert res["after"] == "exact"


def test_nan_in_fp8_dispatch_names_the_token_when_checked(cpu_ranks):
    results = cpu_ranks(2).run(fc.task_nan_check, 0)
    assert results[0]["error"] == "InputError"
    assert "x[2, 200]" in results[0]["message"] and "[128, 256)" in results[0]["message"]
    assert results[1]["error"] == "PeerInputError" and "rank 0" in results[1]["message"]


# ------------------------------------------------------------------ lost and stalled peers
def test_stalled_peer_is_named_and_the_buffer_fails_fast():
    stall = TIMEOUT_S + 1.5
    results, close_s = run_fresh(fc.task_stall, 2, 1, stall)
    r0, r1 = results
    assert r0["error"] == "CommTimeoutError" and r0["peer"] == 1, r0
    assert "rank 1 has not made call #" in r0["message"], r0["message"]
    assert r0["elapsed"] < LIMIT_S, r0["elapsed"]
    # The staller wakes into a group its peer gave up on: it must also end with a named error.
    assert r1["error"] in ("CommTimeoutError", "PeerLostError"), r1
    assert r1["elapsed"] < LIMIT_S, r1["elapsed"]
    for res in results:
        assert res["failed"] and res["later"]["error"] == "BufferFailedError", res["later"]
        assert res["later"]["elapsed"] < 0.5
    assert close_s < 15, f"exit took {close_s:.1f} s (hang on a failed group?)"


def test_rank_that_skipped_its_last_call_is_named_by_the_others():
    results, close_s = run_fresh(fc.task_skip_last, 2, 1)
    assert results[1]["skipped"]
    assert results[0]["error"] == "CommTimeoutError" and results[0]["peer"] == 1, results[0]
    assert "rank 1 has not made call #3" in results[0]["message"], results[0]["message"]
    assert results[0]["elapsed"] < LIMIT_S
    assert close_s < 15


def test_crashed_rank_is_named_then_masked_in_both_modes_with_exact_results():
    results, close_s = run_fresh(fc.task_exit_then_mask, 4, 3)
    assert results[3]["died"]
    for res in results[:3]:
        assert res["error"] == "PeerLostError" and res["peers"] == [3], res
        assert res["elapsed"] < LIMIT_S, res["elapsed"]
        assert res["later"]["error"] == "BufferFailedError"
        assert res["failed_after_mask"] is False
        assert res["after"] == "exact"
    assert close_s < 15


def test_stuck_peer_is_named_then_survivors_continue_on_a_new_buffer():
    results, close_s = run_fresh(fc.task_stuck_then_new_buffer, 4, 2)
    assert results[2]["stuck"]
    for res in (results[0], results[1], results[3]):
        assert res["error"] == "CommTimeoutError" and res["peer"] == 2, res
        assert res["elapsed"] < LIMIT_S, res["elapsed"]
        assert res["survivors"] == [0, 1, 3]
        assert res["after"] == "exact"
    assert close_s < 15


# ------------------------------------------------------------------ GPU: kernels backend
@pytest.mark.gpu
def test_gpu_kernels_out_of_range_ids_are_named_before_any_kernel(gpu_ranks):
    """Kernels backend, 2 ranks (sharing one GPU with EP_COMM_TEST_RANKS_PER_GPU=2): ids out of
    range raise InputError naming token and value before any kernel runs."""
    results = gpu_ranks(2).run(fc.task_gpu_bad_ids)
    for res in results:
        assert res["layout"]["error"] == "InputError" and "= 17" in res["layout"]["message"]
        assert res["ll"]["error"] == "InputError" and "= 17" in res["ll"]["message"]


@pytest.mark.gpu
@pytest.mark.parametrize("value,bad_rank", [("E+1", 1), ("-2", None)])
def test_gpu_kernels_bad_ids_of_a_later_call_are_refused_on_every_rank(gpu_ranks, value,
                                                                       bad_rank):
    """Kernels backend, 2 ranks: ids the host does not read (a shape's later call) are found by
    the layout kernel; the notify kernel refuses the dispatch on every rank, naming the bad
    rank's token and value, and the Buffer then gives exact results."""
    results = gpu_ranks(2).run(fc.task_gpu_bad_ids_later_call, value, bad_rank)
    shown = {"E+1": "topk_idx[3, 1] = 17", "-2": "topk_idx[3, 1] = -2"}[value]
    for r, res in enumerate(results):
        if bad_rank is None or r == bad_rank:
            assert res["error"] == "InputError" and shown in res["message"], res
        else:
            assert res["error"] == "PeerInputError" and res["peer"] == bad_rank, res
            assert shown in res["message"], res
        assert res["after"] == "exact"


@pytest.mark.gpu
def test_gpu_ll_bad_ids_of_a_later_call_are_named_by_the_dispatch_kernel(gpu_ranks):
    """Kernels backend, low-latency, 2 ranks: an id the host does not read (a shape's later
    call) is skipped and reported by the dispatch kernel: InputError naming token and value on
    that rank at its next status read, the others unaffected, the Buffer exact afterwards."""
    results = gpu_ranks(2).run(fc.task_gpu_ll_bad_ids_later_call, 1)
    assert results[0]["error"] is None, results[0]
    assert results[1]["error"] == "InputError", results[1]
    assert "topk_idx[3, 1] = 17 (token 3)" in results[1]["message"], results[1]
    assert all(res["after"] == "exact" for res in results)


def run_fresh_gpu(fn, *args, env=None, world: int = 2):
    """Run ``fn`` on a fresh pool of ``world`` GPU ranks with the short timeout (a test that
    breaks its group; ``env``: more variables); skips without that many GPUs or ranks per
    GPU."""
    import conftest
    if conftest.gpu_count() == 0:
        pytest.skip("needs a GPU")
    if conftest.gpu_count() * conftest.ranks_per_gpu() < world:
        pytest.skip(f"needs {world} GPUs or EP_COMM_TEST_RANKS_PER_GPU={world}")
    pool = RankPool(world, use_gpu=True,
                    env={"EP_COMM_TIMEOUT_S": str(TIMEOUT_S), **(env or {})}, timeout=300)
    try:
        return pool.run(fn, *args)
    finally:
        pool.close(force=True)


@pytest.mark.gpu
def test_gpu_kernels_stuck_peer_is_named_and_buffer_fails_fast():
    results = run_fresh_gpu(fc.task_gpu_stuck, 1)
    r0 = results[0]
    assert r0["error"] in ("CommTimeoutError", "PeerLostError"), r0
    assert r0["elapsed"] < LIMIT_S + 2, r0["elapsed"]  # + kernel launch on a shared GPU
    assert r0["later"]["error"] == "BufferFailedError", r0["later"]


KERNEL_FIELDS = {"hidden": "hidden", "num_experts": "num_experts", "topk": "num_topk",
                 "dtype": "dtype"}


def _refused_on_every_rank(results: list[dict], elapsed_limit: float):
    """Checks, for each kind of ``KERNEL_FIELDS`` in the ranks' ``results``, that every rank
    raised CollectiveMismatchError naming itself and the field, within ``elapsed_limit``
    seconds, and that the Buffer gave exact results after. Yields each kind's per-rank results
    for the caller's own checks."""
    for kind, field in KERNEL_FIELDS.items():
        per_rank = [r[kind] for r in results]
        for rank, res in enumerate(per_rank):
            assert res["error"] == "CollectiveMismatchError", (kind, rank, res)
            assert res["field"] == field, (kind, rank, res["message"])
            assert f"rank {rank}:" in res["message"] and f"{field}=" in res["message"]
            assert res["elapsed"] < elapsed_limit, (kind, rank, res)
            assert res["after"] == "exact", (kind, res)
        yield per_rank


@pytest.mark.gpu
def test_gpu_kernels_disagreement_is_refused_by_the_notify_kernel_on_every_rank(gpu_ranks):
    """Kernels backend, 2 ranks, no EP_COMM_CHECK_AGREEMENT: the call signature travels in the
    NVLink notify kernel's counts row; a disagreement on hidden / num_experts / top-k / dtype
    raises the same CollectiveMismatchError on every rank before data moves, and the Buffer
    then gives exact results."""
    results = gpu_ranks(2).run(fc.task_gpu_disagree, list(KERNEL_FIELDS), 1)
    for per_rank in _refused_on_every_rank(results, 5):  # refused at once, no timeout
        assert len({r["message"].split(":", 1)[1] for r in per_rank}) == 1, per_rank


def _kernel_mismatch_named(rank: int, res: dict, field: str) -> None:
    """``res`` (rank ``rank`` of 2) is the NVLink kernels' refusal of a call whose peer runs
    another kernel or layout as the same kernel number: a CollectiveMismatchError naming
    ``field`` and the other rank, raised at once (not after the timeout), with the Buffer
    failed (later calls: BufferFailedError)."""
    other = 1 - rank
    assert res["error"] == "CollectiveMismatchError", (rank, res)
    assert res["field"] == field, (rank, res["message"])
    assert f"rank {rank}:" in res["message"] and f"[{other}]" in res["message"], res["message"]
    assert "The NVLink kernels found it" in res["message"], res["message"]
    assert "The Buffer is failed" in res["message"], res["message"]
    assert res["elapsed"] < TIMEOUT_S, (rank, res["elapsed"])  # found, not timed out
    assert res["later"]["error"] == "BufferFailedError", (rank, res["later"])


@pytest.mark.gpu
def test_gpu_kernels_skipped_dispatch_is_named_by_every_rank():
    """Kernels backend, 2 ranks, no EP_COMM_CHECK_AGREEMENT: rank 1 skips a dispatch from a
    layout (and combines instead), so its kernel of that number is a combine where rank 0's is
    the dispatch's count exchange. Each kernel announces itself to its peers; each rank's
    waiting kernel sees the other's announcement and both stop at once: a
    CollectiveMismatchError naming the operation and the other rank on both ranks, well within
    the timeout; later calls raise BufferFailedError at once."""
    results = run_fresh_gpu(fc.task_gpu_skip, 1)
    for rank, res in enumerate(results):
        _kernel_mismatch_named(rank, res, "op")
        assert "combine" in res["message"] and "count exchange" in res["message"], res


@pytest.mark.gpu
def test_gpu_kernels_skipped_dispatch_of_one_of_three_ranks_is_named_by_every_rank():
    """As above with 3 ranks: rank 2 combines where ranks 0 and 1 run the dispatch's count
    exchange. Ranks 0 and 1 agree with each other; whichever rank finds the other kernel first
    publishes its finding to all three, and every rank stops on it: a CollectiveMismatchError
    naming the operation on all three, at once, each naming rank 2 alone on its side (every
    finding is between rank 2 and another, and a third rank stands beside the rank whose
    kernel it ran)."""
    results = run_fresh_gpu(fc.task_gpu_skip, 2, world=3)
    for rank, res in enumerate(results):
        assert res["error"] == "CollectiveMismatchError" and res["field"] == "op", (rank, res)
        assert "ranks [2] have op=combine" in res["message"], (rank, res["message"])
        assert "The NVLink kernels found it" in res["message"], (rank, res["message"])
        assert res["elapsed"] < TIMEOUT_S, (rank, res["elapsed"])
        assert res["later"]["error"] == "BufferFailedError", (rank, res["later"])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", fc.RING_LAYOUT_DISAGREEMENTS)
def test_gpu_kernels_ring_layout_disagreement_is_named_never_silent(kind):
    """Kernels backend, 2 ranks, no EP_COMM_CHECK_AGREEMENT: after an agreed dispatch, rank 1
    combines (``combine_hidden``) or makes a cached dispatch (``cached_dispatch_hidden``) with
    half the hidden size. No signature exchange checks these calls; the NVLink rings' tags hash
    the row layout (``ring_shape``), so neither rank takes the other's words, and the kernels'
    announcements name the difference: a CollectiveMismatchError on both ranks naming hidden
    with both values and the other rank, at once, never a silent result; later calls raise
    BufferFailedError at once. ``combine_hidden_queued``: rank 1 has a second combine queued
    behind, which no peer kernel meets; it stops on the published finding, so rank 1's
    synchronisation still returns well within the timeout."""
    results = run_fresh_gpu(fc.task_gpu_ring_layout, kind, 1)
    for rank, res in enumerate(results):
        _kernel_mismatch_named(rank, res, "hidden")
        for h in (res["hidden"], res["hidden"] // 2):
            assert f"hidden={h}" in res["message"], res["message"]


# ------------------------------ GPU: low-latency call agreement in the count words
LL_AGREE = {"EP_COMM_LL_KERNEL_AGREEMENT": "1"}


@pytest.mark.gpu
def test_gpu_ll_kernel_agreement_refuses_disagreeing_dispatch_on_every_rank():
    """EP_COMM_LL_KERNEL_AGREEMENT=1, 2 ranks: rank 1 passes another hidden / num_experts /
    top-k / use_fp8 to low_latency_dispatch. Every rank's kernel finds the other call's tag in
    a count word and refuses it: CollectiveMismatchError (field "signature", naming the other
    rank) on both ranks, at once (no timeout); after clean_low_latency_buffer a round is
    exact."""
    results = run_fresh_gpu(fc.task_gpu_ll_disagree, list(fc.LL_KERNEL_DISAGREEMENTS), 1,
                            env=LL_AGREE)
    for kind in fc.LL_KERNEL_DISAGREEMENTS:
        for rank, res in enumerate(r[kind] for r in results):
            assert res["error"] == "CollectiveMismatchError", (kind, rank, res)
            assert res["field"] == "signature", (kind, rank, res["message"])
            assert f"rank {rank}:" in res["message"], (kind, res["message"])
            assert f"Rank {1 - rank}'s call differs" in res["message"], (kind, res["message"])
            assert res["elapsed"] < TIMEOUT_S, (kind, rank, res)  # refused, not timed out
            assert res["after"] == "exact", (kind, rank, res)


def _named_other(rank: int, res: dict) -> bool:
    """``res`` is an error of ``rank`` that names the other rank: a timeout waiting for it, or
    a call refused because its count words carried another call number."""
    other = 1 - rank
    if res["error"] == "CommTimeoutError":
        return res["peer"] == other
    return (res["error"] == "CollectiveMismatchError" and res["field"] == "seq"
            and "skipped a call" in res["message"] and f"[{other}]" in res["message"])


@pytest.mark.gpu
@pytest.mark.parametrize("skip", ["dispatch", "combine"])
def test_gpu_ll_kernel_agreement_skipped_call_is_named_by_every_rank(skip):
    """EP_COMM_LL_KERNEL_AGREEMENT=1, 2 ranks: rank 1 skips a low_latency_dispatch (combining
    the previous handle instead) or a low_latency_combine (dispatching again at once). Each rank
    names the other within the timeout + 2 s (+ launch on a shared GPU): a timeout, or a refusal
    of a count word of another call number ("skipped a call"); never a silent result."""
    results = run_fresh_gpu(fc.task_gpu_ll_skip, 1, skip, env=LL_AGREE)
    for rank, res in enumerate(results):
        assert res["error"] is not None and _named_other(rank, res), (rank, res)
        assert res["elapsed"] < LIMIT_S + 2, (rank, res["elapsed"])
        assert res["later"]["error"] is not None, (rank, res["later"])


# ------------------------------ GPU: internode call agreement in the kernels' exchanges
@pytest.mark.gpu
def test_gpu_internode_disagreement_is_refused_by_the_notify_kernel_on_every_rank():
    """Internode kernels (2 nodes x 1 rank, ``ranks_per_node=1``), no EP_COMM_CHECK_AGREEMENT:
    the call signature travels at the head of the notify kernel's counts row; a disagreement on
    hidden / num_experts / top-k / dtype raises the same CollectiveMismatchError on every rank,
    at once (no timeout), with no token slot written, and the Buffer then gives exact
    results."""
    import internode_fault_cases as ifc
    results = run_fresh_gpu(ifc.task_gpu_internode_disagree, list(KERNEL_FIELDS), 1)
    for per_rank in _refused_on_every_rank(results, TIMEOUT_S):  # refused, not timed out
        assert all(res["untouched"] for res in per_rank), ("a token slot was written", per_rank)
        assert len({r["message"].split(":", 1)[1] for r in per_rank}) == 1, (kind, per_rank)


@pytest.mark.gpu
def test_gpu_internode_skipped_dispatch_is_named_by_every_rank():
    """Internode kernels, 2 nodes x 1 rank: rank 1 skips a dispatch and combines instead. Rank
    0's notify and rank 1's combine kernel each see the other's flag carry another kernel and
    call tag: every rank refuses, nothing moves, and each names the other in a
    CollectiveMismatchError (rank 0 at its count wait, rank 1 at its next call) before the
    timeout; then the Buffer gives exact results on both (the call numbers stayed in step)."""
    import internode_fault_cases as ifc
    results = run_fresh_gpu(ifc.task_gpu_internode_skip, 1)
    for rank, res in enumerate(results):
        other = 1 - rank
        assert res["error"] == "CollectiveMismatchError", (rank, res)
        assert f"Rank {other}'s call differs" in res["message"], (rank, res["message"])
        assert res["elapsed"] < TIMEOUT_S, (rank, res)
        assert res["untouched"], (rank, "a token slot was written")
        assert res["after"] == "exact", (rank, res)
