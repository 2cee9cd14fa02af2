"""Command-line tools: ``doctor`` (``python -m ep_comm.doctor``)."""
