"""The pure math of differential privacy and secure aggregation (no I/O).

accountant.py  ε of composed Gaussian releases, from dp_accounting's RDP accountant
clipping.py    a model update as one vector: flatten, clip to an L2 bound, Gaussian noise
quantize.py    floats <-> integers modulo 2^32, so masked sums cannot wrap
shamir.py      Shamir secret sharing of 32-byte secrets over GF(2^521 - 1)
masks.py       the PRG that expands a 32-byte seed into a uint32 mask (AES-256-CTR)
secagg.py      Bonawitz et al. 2017 secure aggregation, honest-but-curious hub: the protocol math
"""
