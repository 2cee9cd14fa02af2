"""Glue between ep_comm and model libraries.

``ep_comm.integrations.transformers``: Hugging Face transformers (5.x) MoE models running
expert-parallel on ep_comm (needs the ``[hf]`` extra). Importing this package imports nothing
heavy: each integration is imported on its own.
"""
