"""Every bad argument gets a clear InputError (or BufferTooSmallError / BackendUnavailableError)
before any communication; tested on 2 gloo ranks: every rank raises."""
import pytest

from check_cases import CHECKS, run_check


@pytest.mark.parametrize("which", CHECKS)
def test_bad_input_raises_clear_error(cpu_ranks, which):
    messages = cpu_ranks(2).run(run_check, which)
    assert all(m for m in messages)  # every rank raised, with the expected message
