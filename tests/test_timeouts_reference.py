"""Never a hang: a rank that skips a call makes the others fail fast with rank and phase."""
from cases import Case
from multiproc import run_ranks
from timeout_cases import task_skip_dispatch


def test_skipped_dispatch_times_out_with_rank_and_phase():
    results = run_ranks(task_skip_dispatch, 2, Case(seed=3), 1,
                        env={"EP_COMM_TIMEOUT_S": "2"}, timeout=120)
    assert results[1] == "skipped"
    assert 1.5 < results[0] < 20, f"timed out after {results[0]:.1f} s, expected about 2 s"


def test_low_latency_timeout_names_the_peer_that_never_calls():
    """3 ranks, rank 2 never calls low_latency_dispatch: ranks 0 and 1 raise CommTimeoutError
    whose ``peer`` and message name rank 2 (end to end through Buffer, reference backend)."""
    from low_latency_cases import LLCase, task_ll_skip_dispatch
    case = LLCase(seed=5, max_tokens=8, num_tokens=6, hidden=256, num_experts=6, num_topk=3)
    results = run_ranks(task_ll_skip_dispatch, 3, case, 2, env={"EP_COMM_TIMEOUT_S": "2"},
                        timeout=120)
    assert results[2] == "skipped"
    assert all(1.0 < t < 20 for t in results[:2]), results
