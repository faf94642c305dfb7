"""The numerics reference.

``quant`` (the quantizers every kernel, pass and eager copy is tested against), ``hadamard`` (the
rotation constructions), ``packing`` (int4 layout), ``contracts`` (operand checks every op implementation shares).
"""
