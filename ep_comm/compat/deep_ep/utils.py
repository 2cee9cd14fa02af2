"""``deep_ep.utils`` as ep_comm answers it: ``EventOverlap``, ``EventHandle`` and
``check_nvlink_connections`` (Megatron-LM builds ``EventOverlap(EventHandle())``)."""
from ep_comm.compat.event import EventHandle, EventOverlap

EP_COMM_ALIAS = True


def check_nvlink_connections(group) -> None:
    """DeepEP checks NVLink between PCIe GPUs here. ep_comm checks its peers when a Buffer maps
    their memory (and ``python -m ep_comm.doctor`` reports the links), so this does nothing."""
    del group


__all__ = ["EventOverlap", "EventHandle", "check_nvlink_connections"]
