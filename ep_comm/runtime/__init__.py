"""Process-level plumbing under the backends: the run-time kernel compiler and loader
(``jit``), CUDA IPC buffers (``ipc``), the NVSHMEM symmetric heap (``nvshmem``), the process
group wrapper with bounded waits (``comm``) and the torchrun/mpirun launcher (``launcher``)."""
