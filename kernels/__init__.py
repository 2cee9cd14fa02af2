"""Device code of ep_comm: CUDA sources compiled at run time and Triton kernels (``ep_comm.kernels``)."""
