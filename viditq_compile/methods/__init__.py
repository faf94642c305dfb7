"""Quantization methods, one module each (``balance``, ``int_weight``).

A method owns its ``LayerPlan`` fields, the names of the tensors it adds to a program, its eager
reference and the ops its pass emits; ``registry`` lists them in the order they apply.
"""
