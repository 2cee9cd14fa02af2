"""The ``deep_ep`` namespace as ep_comm answers it (see ``ep_comm.compat.install_deep_ep``).

v1 names (``Buffer``, ``Config``, ``EventOverlap``, ``topk_idx_t``) and v2 names
(``ElasticBuffer``, ``EPHandle``, ``EventHandle``, the domain-size functions) together: DeepEP
v2 exports both generations too.
"""
from ep_comm.compat.deep_ep.buffer import Buffer
from ep_comm.compat.event import EventHandle, EventOverlap
from ep_comm.config import Config
from ep_comm.core.checks import topk_idx_t
from ep_comm.elastic import (ElasticBuffer, EPHandle, get_logical_domain_size,
                             get_physical_domain_size)
from ep_comm.compat.deep_ep import buffer, utils  # noqa: F401  (deep_ep.utils, deep_ep.buffer)

#: Marks this module as ep_comm's alias (``install_deep_ep`` never replaces a real DeepEP).
EP_COMM_ALIAS = True
__version__ = "2.1.0+ep_comm"

__all__ = ["Buffer", "ElasticBuffer", "EPHandle", "EventOverlap", "EventHandle", "Config",
           "topk_idx_t", "get_physical_domain_size", "get_logical_domain_size"]
