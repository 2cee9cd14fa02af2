"""Never a hang: a rank that skips a call makes the others fail fast with rank and phase."""
from cases import Case
from multiproc import run_ranks
from timeout_cases import task_skip_dispatch


def test_skipped_dispatch_times_out_with_rank_and_phase():
    results = run_ranks(task_skip_dispatch, 2, Case(seed=3), 1,
                        env={"EP_COMM_TIMEOUT_S": "2"}, timeout=120)
    assert results[1] == "skipped"
    assert 1.5 < results[0] < 20, f"timed out after {results[0]:.1f} s, expected about 2 s"
