"""``ElasticBuffer.dispatch(do_expand=True)`` on the GPU (issue #24): the kernels backend, whose
NVLink dispatch kernel writes each received token straight into its expanded rows, against the
reference backend bit for bit (rows, FP8 scales, weights, handle), then combine of the expanded
rows, at 1 and 2 ranks (2 ranks may share one GPU: EP_COMM_TEST_RANKS_PER_GPU=2, see
conftest.py). Five cases in one task call per rank count (tests/gpu_cases_elastic.py); the test
logic runs on CPU in test_gpu_cases_on_cpu.py.

Run on the GPU machine: python -m pytest -q -m gpu tests/test_elastic_gpu.py
"""

import pytest

import gpu_cases_elastic as elastic
import gpu_common as common

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("world", common.FULL_WORLDS)
def test_expanded_dispatch_and_combine_equal_the_reference(gpu_ranks, world):
    """bf16 and fp8; alignments 1, 4 and 128; CPU sync and worst-case rows; zero padding on and
    off; ragged counts, -1 entries, an empty rank, one token per rank; hiddens 512 to 4096;
    a cached dispatch along the expanded handle."""
    cases = elastic.expand_cases(common.case_seed(3000 + world))
    assert gpu_ranks(world).run(elastic.task_elastic_expand, common.BACKEND, cases) == \
        [len(cases)] * world
