"""The one place that carves raw memory into regions (ep_comm.core.regions.Carver): aligned,
disjoint, in order, for any byte counts (not only the multiples the real layouts use)."""
import pytest


@pytest.mark.parametrize("sizes", [[1, 1, 1], [17, 64, 65, 129], [0, 3, 0, 2048 + 1], [4096]])
def test_regions_are_aligned_disjoint_and_ordered(sizes):
    from ep_comm.core.constants import REGION_ALIGN
    from ep_comm.core.regions import Carver
    c = Carver()
    regions = [c.claim(f"r{i}", n) for i, n in enumerate(sizes)]
    end = 0
    for reg, n in zip(regions, sizes):
        assert reg.nbytes == n and reg.offset % REGION_ALIGN == 0
        assert reg.offset >= end, f"{reg} overlaps the region before (which ends at {end})"
        end = reg.offset + n
    assert c.total_bytes >= end and c.total_bytes % REGION_ALIGN == 0
    assert c.total_bytes - end < REGION_ALIGN, "more padding than alignment needs"
    assert c[f"r{len(sizes) - 1}"] is regions[-1]
