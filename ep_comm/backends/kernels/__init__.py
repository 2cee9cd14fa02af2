"""The GPU kernels backend: host side of ``kernels/cuda``.

``backend`` routes calls to the per-mode runtimes: ``intranode`` (normal mode over NVLink),
``internode`` (normal mode across nodes: NVSHMEM + NVLink) and ``low_latency`` (decode mode
over NVSHMEM). ``args`` holds the kernels' named argument tables (checked against the .cu
signatures by a CPU test) and ``status`` decodes the status words every kernel family writes.
Importing this package needs no GPU; the runtimes import cuda.core and nvshmem4py lazily."""
