"""Normal mode across nodes: the host side of ``kernels/internode.cu``.

``InternodeRuntime(comm, num_rdma_bytes)`` owns this rank's part of an NVSHMEM symmetric buffer
(``ep_comm.core.regions.InternodeRegions``), a host-mapped status word, the communication stream and
the compiled kernels. ``ep_comm.backends.kernels.backend`` routes normal-mode calls here when the group
spans several nodes (``Buffer(..., ranks_per_node=k)`` with k below the group size, or ranks on
several hosts). Results equal the reference backend's bit for bit (dispatch) and within bf16
rounding (combine), handles included.

The design is in the header of ``kernels/internode.cu``: a token crosses the network once per
destination node (to the rank of that node with the sender's local index, its proxy), and the
ranks of the node pull it from the proxy over NVLink; combine sums each token's rows inside the
node first and sends one row per token and node back.

A fresh dispatch is: plain torch ops for the token positions (``local_pos``: a token's place
among this rank's tokens for each rank; ``node_pos``: for each node), ``inter_notify`` (counts to
every rank, prefix matrix on the GPU), then ``inter_dispatch``. Without ``num_worst_tokens`` the
host waits for the notify kernel to size the outputs (after checking the status word); with it,
nothing waits and the call is CUDA-graph capturable. A cached dispatch runs ``inter_dispatch``
alone; combine copies its input into the symmetric buffer and runs ``inter_combine``.

Failures: every wait is bounded by ``EP_COMM_TIMEOUT_S``; a kernel that gives up writes the
status word, and the host raises ``CommTimeoutError`` naming rank, node, phase and peer.

Agreement (docs/faults.md, "Which calls are checked where"): the notify kernel receives the
call's signature words (``Comm.call_words``) as its ``sig`` argument and sends them at the head
of its counts row; every kernel receives the call's tag (``agreement.ll_tag``: sequence number
and a hash of the signature) as ``call_tag`` and carries it in the flags it already sets. A call
whose ranks disagree (or run different kernels: a skipped call) is refused by every rank's
kernel before anything moves, and the host raises the reference backend's
``CollectiveMismatchError`` / ``InputError`` / ``PeerInputError``: after the count wait of a
dispatch from a layout, else at the next call (``num_worst_tokens``, cached dispatch, combine:
nothing waits for them). A refusal leaves every rank's kernels in step: the Buffer stays usable.
"""
from __future__ import annotations

import dataclasses

import torch

from ep_comm.core import agreement
from ep_comm.runtime import jit
from ep_comm.runtime.comm import timeout_s
from ep_comm.core.constants import (CALL_SIG_WORDS, FP8_BLOCK, INTER_DISPATCH_CHUNKS,
                                    INTER_MAX_EXPERTS, INTER_MAX_NODES, NORMAL_MAX_TOPK,
                                    NVL_MAX_LOCAL_EXPERTS, NVL_MAX_RANKS)
from ep_comm.errors import BackendUnavailableError, BufferTooSmallError, EpCommError, InputError
from ep_comm.handles import DispatchHandle
from ep_comm.backends.kernels import args, status
from ep_comm.backends.kernels.intranode import (KERNEL_SMEM, KERNEL_THREADS, aligned_counts,
                                                combine_outputs, dispatch_outputs)
from ep_comm.backends.kernels.layout import LayoutKernel
from ep_comm.core.constants import (NVL_INFO_CALL_SIGS, NVL_INFO_EXPERT_COUNTS, NVL_INFO_NUM_RECV,
                                    NVL_STATUS_WORDS, STATUS_DISAGREE, STATUS_DISAGREE_TAG)
from ep_comm.core.regions import InternodeRegions


@dataclasses.dataclass(slots=True)
class InternodeDispatchState:
    """The internode dispatch's part of a ``DispatchHandle`` (``backend_state``); device
    tensors unless said otherwise, T tokens, N nodes, P ranks per node.

    Attributes:
        local_pos: [T, P] int32, row of each token in the proxy's forward to local rank p.
        node_pos: [T, N] int32, slot of each token in node n's region (-1: not sent there).
        tokens_per_node: [N] int32, tokens this rank sends to each node.
        node_counts: counts rows of the notify step (per source node and rank).
        proxy_rows: [N, cap, P] int32, as a proxy: the output row of each forwarded slot.
        num_recv: [1] int32, rows received.
        counts_host: received rows per local expert (host list), None with num_worst_tokens.
        num_topk: top-k of the dispatch (a cached dispatch has no topk_idx to read it from).
        cap: slots per node region of the buffer layout the handle was made with.
    """

    local_pos: torch.Tensor
    node_pos: torch.Tensor
    tokens_per_node: torch.Tensor
    node_counts: torch.Tensor
    proxy_rows: torch.Tensor
    num_recv: torch.Tensor
    counts_host: list | None
    num_topk: int
    cap: int


class InternodeRuntime:
    """Normal-mode dispatch/combine of one Buffer across nodes (see the module docstring)."""

    #: The notify kernel checks the call agreement (``KernelsBackend.fuses_agreement``).
    carries_call_signature = True

    def __init__(self, comm, num_rdma_bytes: int):
        from ep_comm.runtime import ipc
        from ep_comm.runtime import nvshmem
        self.comm = comm
        self.rank, self.num_ranks = comm.rank, comm.num_ranks
        self.ranks_per_node, self.num_nodes = comm.ranks_per_node, comm.num_nodes
        self.node, self.local_rank = comm.node, comm.local_rank
        self.device = comm.device
        if self.ranks_per_node > NVL_MAX_RANKS or self.num_nodes > INTER_MAX_NODES:
            raise BackendUnavailableError(
                "kernels", f"{self.num_nodes} nodes x {self.ranks_per_node} ranks: the internode "
                f"kernels support at most {INTER_MAX_NODES} nodes of {NVL_MAX_RANKS} ranks",
                "Use backend='reference'.")
        if num_rdma_bytes <= 0:
            raise InputError("normal mode across nodes needs num_rdma_bytes > 0 "
                             "(Config.get_rdma_buffer_size_hint)")
        self.num_rdma_bytes = num_rdma_bytes
        self.num_device_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._broken: EpCommError | None = None
        self._module = jit.compile_kernels("internode", ["internode.cu"], nvshmem=True)
        # No bad-id record (constants.ID_CHECK_*): the internode layout also sums tokens per
        # node in torch, and its ids are checked on the host on a shape's first call only.
        self._layout = LayoutKernel(self.num_ranks, self.device)
        self.sym = nvshmem.acquire(comm, num_rdma_bytes)
        nvshmem.bind_module(self._module)
        self.base = self.sym.tensor.data_ptr()
        # A refused notify copies every rank's signature words from NVL_INFO_CALL_SIGS: R rows
        # (the NVLink word holds NVL_MAX_RANKS; internode groups are larger).
        self.status = ipc.HostStatus(
            max(NVL_STATUS_WORDS, NVL_INFO_CALL_SIGS + self.num_ranks * CALL_SIG_WORDS),
            self.device.index)
        # This rank's bad input in the last notify launched (its InputError text, if refused).
        self._notify_input = None
        self._stream = torch.cuda.Stream(self.device)
        self._net_bytes: torch.Tensor | None = None
        # Read once per Buffer: a change of EP_COMM_TIMEOUT_S applies to Buffers created later.
        self._timeout_s = timeout_s()
        self._timeout_ns = int(self._timeout_s * 1e9)
        control = InternodeRegions(16, self.num_ranks, self.ranks_per_node, 0).control_bytes
        self.sym.tensor[:control].zero_()
        # Peers signal into this buffer as soon as they pass their first barrier.
        torch.cuda.synchronize(self.device)
        comm.barrier("internode/init")

    # ------------------------------------------------------------------ plumbing
    def comm_stream(self):
        return self._stream

    def check_status(self, earlier_call: bool = False) -> None:
        """Raise the failure a kernel reported in the status word, if any (no device sync).

        A refusal (``STATUS_DISAGREE`` / ``STATUS_DISAGREE_TAG``: every rank refused the call
        alike, nothing moved, the kernels stay in step) clears the word and leaves the runtime
        usable; any other failure breaks it. ``earlier_call``: the word is read at the start of
        a call, so a refusal found there belongs to an earlier call that did not wait for its
        kernels; the current call then gives its sequence number back (it raises before any
        exchange, like a local error), so that a rank whose refused call did not wait and a rank
        whose refused call did (a dispatch's count wait) go on with the same call numbers."""
        code, err = status.read_normal_status(self.status, status.INTERNODE, self.rank,
                                              self._timeout_s, self.num_ranks, node=self.node,
                                              own_input=self._notify_input, seq=self.comm.seq)
        if err is None:
            return
        if code in (STATUS_DISAGREE, STATUS_DISAGREE_TAG):
            self.status.clear()
            if earlier_call:
                self.comm.unnumber_call()
        else:
            self._broken = err
        raise err

    def _check_alive(self) -> None:
        if self._broken is not None:
            raise EpCommError(f"this Buffer's internode kernels failed earlier ({self._broken}); "
                              "destroy it and create a new one") from self._broken
        if self.sym is None:
            raise EpCommError("this Buffer was destroyed")
        self.check_status(earlier_call=True)

    def _call_tag(self) -> int:
        """The current call's ``call_tag`` argument (``agreement.ll_tag`` of its signature
        words); its sequence number is 0 in a CUDA-graph capture (replays repeat it)."""
        words, _ = self.comm.call_words()
        return agreement.ll_tag(words, torch.cuda.is_current_stream_capturing())

    def regions(self, hidden: int) -> InternodeRegions:
        return InternodeRegions(hidden, self.num_ranks, self.ranks_per_node, self.sym.nbytes)

    def _region_values(self, reg: InternodeRegions, config, off_csrc: int | None = None) -> dict:
        """The EP_INTER_REGION_PARAMS arguments (args.INTER_REGIONS) of every kernel;
        ``off_csrc``: the combine's half of combine_src (the first half otherwise)."""
        r = reg.regions
        return dict(base=self.base, off_ctrl=r["ctrl"].offset, off_bar=r["barrier"].offset,
                    off_nflag=r["notify_flag"].offset, off_counts=r["counts"].offset,
                    off_darr=r["dispatch_arrive"].offset, off_carr=r["combine_arrive"].offset,
                    off_dwork=r["dispatch_work"].offset, off_drecv=r["dispatch_recv"].offset,
                    off_dstage=r["dispatch_stage"].offset,
                    off_csrc=r["combine_src"].offset if off_csrc is None else off_csrc,
                    slot_bytes=reg.slot_bytes, row_c=reg.row_c, cap=reg.cap,
                    chunks=INTER_DISPATCH_CHUNKS, chunk_slots=reg.chunk_slots(config.rdma_chunk))

    def _launch(self, kernel: str, grid: int, params, values: dict, shared_mem: int = 0):
        # Through an ArgBuffer (checked as args.pack checks), as the other runtimes' plans: it
        # passes the notify's CallSig by value, which the cuda.core launch path cannot.
        self._module.prepare(kernel, args.ArgBuffer(params, values), grid, KERNEL_THREADS,
                             shared_mem).launch(jit.current_stream_handle(self.device.index))

    def _grid(self, config) -> int:
        blocks = config.num_sms
        if blocks > self.num_device_sms:
            raise InputError(f"Config.num_sms={config.num_sms} is more than the "
                             f"{self.num_device_sms} SMs of this GPU")
        return blocks

    def _check_capacity(self, reg: InternodeRegions, num_tokens: int) -> None:
        if num_tokens > reg.cap:
            raise BufferTooSmallError("num_rdma_bytes", reg.bytes_for(num_tokens),
                                      self.sym.nbytes, f"an internode call with {num_tokens} "
                                      "tokens on this rank")

    def count_network_bytes(self, on: bool = True) -> torch.Tensor | None:
        """Count the bytes the kernels put to other nodes (for benchmarks; off by default, an
        atomic per put when on). Returns the int64 [2] counter (dispatch, combine), zeroed, or
        None when turned off. Graph-capture safe: the counter's address is fixed."""
        self._net_bytes = torch.zeros(2, dtype=torch.int64, device=self.device) if on else None
        return self._net_bytes

    def _counter(self, i: int):
        return None if self._net_bytes is None else self._net_bytes[i:i + 1]

    def network_bytes_per_token(self, hidden: int, elem_bytes: int, num_topk: int) -> tuple:
        """(dispatch, combine) bytes one token copy puts to one other node: the slot bytes sent
        (header with the rows on that node, payload, scales, top-k ids and weights) and the
        partial row (bf16 and weights)."""
        offs = self.regions(hidden).slot_offsets(elem_bytes, num_topk)
        return offs["put_bytes"], offs["combine_put_bytes"]

    # ------------------------------------------------------------------ layout
    def layout_host_path(self):
        """None: the layout across nodes also sums tokens per node in torch (no C++ twin)."""
        return None

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        """-> (num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [N] int32,
        num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)."""
        counts, in_rank = self._layout(topk_idx, num_experts,
                                       jit.current_stream_handle(self.device.index))
        r = self.num_ranks
        per_node = self._in_node(in_rank).sum(0, dtype=torch.int32)
        return counts[:r], per_node, counts[r:], in_rank

    def _in_node(self, is_token_in_rank: torch.Tensor) -> torch.Tensor:
        t = is_token_in_rank.shape[0]
        return is_token_in_rank.view(t, self.num_nodes, self.ranks_per_node).any(2)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        """[T, X] int32: the row's place among the rows with ``mask`` set in its column, -1 where
        not set (an exclusive count down each column)."""
        m = mask.to(torch.int32)
        return torch.where(mask, torch.cumsum(m, 0, dtype=torch.int32) - 1,
                           torch.full_like(m, -1))

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x, x_scales, *, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                 is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights, num_experts,
                 expert_alignment, num_worst_tokens, config):
        """See ``Backend.dispatch``. x: [T, H] bf16 or fp8, x_scales: [T, H / 128] float32."""
        self._check_alive()
        r, me, dev = self.num_ranks, self.rank, x.device
        p, n_nodes = self.ranks_per_node, self.num_nodes
        t, hidden = x.shape
        num_topk = topk_idx.shape[1] if topk_idx is not None else (
            _internode_state(handle).num_topk if handle is not None else 0)
        if num_topk > NORMAL_MAX_TOPK:
            raise InputError(f"top-k {num_topk} is more than the {NORMAL_MAX_TOPK} the kernels carry")
        if num_experts > INTER_MAX_EXPERTS or num_experts // r > NVL_MAX_LOCAL_EXPERTS:
            raise InputError(f"{num_experts} experts: the internode kernels support at most "
                             f"{INTER_MAX_EXPERTS}")
        reg = self.regions(hidden)
        self._check_capacity(reg, t)
        grid = self._grid(config)
        local = num_experts // r
        call_tag = self._call_tag()
        if handle is None:
            in_node = self._in_node(is_token_in_rank)
            local_pos = self._positions(is_token_in_rank)
            node_pos = self._positions(in_node)
            tokens_per_node = (num_tokens_per_rdma_rank if num_tokens_per_rdma_rank is not None
                               else in_node.sum(0, dtype=torch.int32)).to(torch.int32)
            prefix = torch.empty(r, r, dtype=torch.int32, device=dev)
            recv_per_expert = torch.empty(local, dtype=torch.int32, device=dev)
            node_counts = torch.empty(p, n_nodes, dtype=torch.int32, device=dev)
            num_recv_dev = torch.empty(1, dtype=torch.int32, device=dev)
            ntpr = num_tokens_per_rank.to(torch.int32)
            # fault handling: the call's signature travels with the counts (docs/faults.md)
            sig, self._notify_input = self.comm.call_words()
            self._launch("inter_notify", 1, args.INTER_NOTIFY, dict(
                self._region_values(reg, config), rank=me, R=r, P=p, N=n_nodes, E=num_experts,
                num_worst_tokens=num_worst_tokens, tokens_per_rank=_ptr(ntpr),
                tokens_per_node=_ptr(tokens_per_node),
                tokens_per_expert=_ptr(num_tokens_per_expert.to(torch.int32)),
                rank_prefix_matrix=_ptr(prefix), recv_per_expert=_ptr(recv_per_expert),
                node_counts=_ptr(node_counts), num_recv_dev=_ptr(num_recv_dev),
                host_status=self.status.device_ptr, timeout_ns=self._timeout_ns, sig=sig,
                call_tag=call_tag))
            if num_worst_tokens > 0:
                n_recv, rows, counts_host = -1, num_worst_tokens, None
            else:
                torch.cuda.current_stream(dev).synchronize()  # bounded: the kernel gives up
                self.check_status()
                words = self.status.read(NVL_INFO_EXPERT_COUNTS + local)
                n_recv = rows = words[NVL_INFO_NUM_RECV]
                counts_host = words[NVL_INFO_EXPERT_COUNTS:]
            if rows > reg.rows_cap:
                raise BufferTooSmallError(
                    "num_rdma_bytes", reg.bytes_for(-(-rows // reg.rows_per_token)),
                    self.sym.nbytes, f"staging the {rows} rows this rank receives for combine")
            send_pos = torch.empty(t, r, dtype=torch.int32, device=dev)
            handle = DispatchHandle(
                rank=me, num_ranks=r, num_experts=num_experts, is_token_in_rank=is_token_in_rank,
                num_tokens_per_rank=ntpr, rank_prefix_matrix=prefix, send_pos=send_pos,
                recv_src_idx=torch.empty(rows, dtype=torch.int32, device=dev),
                recv_src_rank=torch.empty(rows, dtype=torch.int32, device=dev),
                num_recv_tokens=n_recv, num_recv_tokens_per_expert=recv_per_expert,
                num_worst_tokens=num_worst_tokens,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                backend_state=InternodeDispatchState(
                    local_pos=local_pos, node_pos=node_pos, tokens_per_node=tokens_per_node,
                    node_counts=node_counts,
                    proxy_rows=torch.empty(n_nodes, reg.cap, p, dtype=torch.int32, device=dev),
                    num_recv=num_recv_dev, counts_host=counts_host, num_topk=num_topk,
                    cap=reg.cap))
            write_send_pos, write_proxy_rows = send_pos, handle.backend_state.proxy_rows
        else:
            state = _internode_state(handle)
            if state.cap != reg.cap:
                raise InputError("a cached internode dispatch must use the hidden size of the "
                                 "dispatch that made the handle")
            rows = handle.num_recv_rows
            write_send_pos = write_proxy_rows = None  # the handle has them: same routes
        state = handle.backend_state
        pad = handle.num_worst_tokens > 0
        recv_x, recv_scales, recv_idx, recv_w = dispatch_outputs(rows, x, x_scales, topk_idx,
                                                                 topk_weights)
        offs = reg.slot_offsets(x.element_size(), num_topk)
        self._launch("inter_dispatch", grid, args.INTER_DISPATCH, dict(
            self._region_values(reg, config), rank=me, R=r, P=p, N=n_nodes, T=t, L=local,
            x=_ptr(x), row_int4=hidden * x.element_size() // 16, x_scales=_ptr(x_scales),
            num_scales=hidden // FP8_BLOCK if x_scales is not None else 0,
            topk_idx=_ptr(topk_idx), topk_weights=_ptr(topk_weights), K=num_topk,
            has_scales=int(x_scales is not None), has_idx=int(topk_idx is not None),
            has_w=int(topk_weights is not None), local_pos=_ptr(state.local_pos),
            node_pos=_ptr(state.node_pos), rank_prefix_matrix=_ptr(handle.rank_prefix_matrix),
            node_counts=_ptr(state.node_counts), send_pos=_ptr(write_send_pos),
            off_payload=offs["payload"], off_scales=offs["scales"], off_idx=offs["topk_idx"],
            off_w=offs["topk_weights"], put_bytes=offs["put_bytes"], recv_x=_ptr(recv_x),
            recv_scales=_ptr(recv_scales), recv_topk_idx=_ptr(recv_idx),
            recv_topk_weights=_ptr(recv_w), recv_src_idx=_ptr(handle.recv_src_idx),
            recv_src_rank=_ptr(handle.recv_src_rank), proxy_rows=_ptr(write_proxy_rows),
            num_rows=rows, num_recv_dev=_ptr(state.num_recv), zero_padding=int(pad),
            net_bytes=_ptr(self._counter(0)), host_status=self.status.device_ptr,
            timeout_ns=self._timeout_ns, call_tag=call_tag), shared_mem=KERNEL_SMEM)
        count_list = [] if pad else aligned_counts(state.counts_host, expert_alignment)
        return recv_x, recv_scales, recv_idx, recv_w, count_list, handle

    # ------------------------------------------------------------------ combine
    def combine(self, x, handle, topk_weights, biases, config):
        """See ``Backend.combine``. x: [N, H] bf16 -> ([T, H] bf16, [T, K] float32 or None)."""
        self._check_alive()
        state = _internode_state(handle)
        r, me = self.num_ranks, self.rank
        rows, hidden = x.shape
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        if num_topk > NORMAL_MAX_TOPK:
            raise InputError(f"top-k {num_topk} is more than the {NORMAL_MAX_TOPK} the kernels carry")
        reg = self.regions(hidden)
        if state.cap != reg.cap:
            raise InputError("combine must use the hidden size of the dispatch that made the "
                             "handle")
        if rows > reg.rows_cap:
            raise BufferTooSmallError("num_rdma_bytes", reg.bytes_for(-(-rows // reg.rows_per_token)),
                                      self.sym.nbytes, f"staging {rows} combine rows")
        grid = self._grid(config)
        t = handle.num_tokens
        # Stage the input where the proxies of this node read it (row: bf16 x, then weights), in
        # the half of combine_src by the parity of this call's number: a same-node peer may
        # still read the previous call's half (regions.InternodeRegions, combine_src). The number
        # is agreed by every rank (refusals keep it in step), and two calls of one parity have a
        # numbered call between them, whose internode kernel's barrier proves the peers done
        # with the older combine (get_dispatch_layout is not numbered and launches none).
        off_csrc = reg.combine_src_offset(self.comm.seq)
        src = self.sym.tensor[off_csrc:][:rows * reg.row_c].view(rows, reg.row_c)
        if rows:
            src[:, :hidden * 2].copy_(x.contiguous().view(torch.uint8).view(rows, hidden * 2))
            if topk_weights is not None:
                src[:, hidden * 2:hidden * 2 + num_topk * 4].copy_(
                    topk_weights.contiguous().view(torch.uint8).view(rows, num_topk * 4))
        out, out_w, bias0, bias1 = combine_outputs(t, x, topk_weights, biases)
        offs = reg.slot_offsets(2, num_topk)
        self._launch("inter_combine", grid, args.INTER_COMBINE, dict(
            self._region_values(reg, config, off_csrc=off_csrc), rank=me, R=r, P=self.ranks_per_node,
            N=self.num_nodes, T=t, row_int4=hidden * 2 // 16, K=num_topk,
            has_w=int(topk_weights is not None), proxy_rows=_ptr(state.proxy_rows),
            node_counts=_ptr(state.node_counts), node_pos=_ptr(state.node_pos),
            tokens_per_node=_ptr(state.tokens_per_node), off_payload=offs["payload"],
            off_w=offs["combine_weights"], put_bytes=offs["combine_put_bytes"],
            bias0=_ptr(bias0), bias1=_ptr(bias1), out=_ptr(out), out_w=_ptr(out_w),
            num_recv_dev=_ptr(state.num_recv), net_bytes=_ptr(self._counter(1)),
            host_status=self.status.device_ptr, timeout_ns=self._timeout_ns,
            call_tag=self._call_tag()), shared_mem=KERNEL_SMEM)
        return out, out_w

    # ------------------------------------------------------------------ teardown
    def destroy(self) -> None:
        """Give the symmetric buffer back to the pool (local) and free the status word."""
        torch.cuda.synchronize(self.device)
        if self.sym is not None:
            self.sym.release()
            self.sym = None
        if self.status is not None:
            self.status.free()
            self.status = None


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _internode_state(handle: DispatchHandle) -> InternodeDispatchState:
    state = handle.backend_state
    if not isinstance(state, InternodeDispatchState):
        raise InputError("this handle was not made by the kernels backend's internode dispatch")
    return state
