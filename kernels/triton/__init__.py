"""Triton and Gluon kernels (``ep_comm.kernels.triton``): grouped GEMMs, FP8 quantisation and
the MoE permute/grouping kernels. Their launchers live in ``ep_comm.moe``."""
