"""Backends behind ``ep_comm.Buffer``: the interface (``base``), the torch.distributed
reference (``reference``: the oracle of every GPU test, the CPU path) and the GPU kernels
(``kernels``). ``Buffer`` picks one explicitly; nothing falls back silently."""
