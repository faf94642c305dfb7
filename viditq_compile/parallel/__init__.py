"""Sequence / context, CFG and tensor parallelism on existing engines (torch.distributed, diffusers
context parallel); import the submodules (``parallel.sequence``, ``parallel.cfg``).
"""
