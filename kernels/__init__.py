"""Device code of ep_comm (``ep_comm.kernels``): CUDA C++ in ``cuda/`` (compiled at first use by
``ep_comm.runtime.jit``) and Triton kernels in the subpackage ``triton``."""
