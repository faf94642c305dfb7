"""The ``torch.ops.viditq`` operator library.

``schema``: op names and argument positions (the one list other modules read); ``library``: the
definitions, CPU implementations and fakes; ``cuda``: the CUDA registrations.
"""
