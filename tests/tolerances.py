"""Tolerances for numerical equivalence tests, with the reason for each.

float32 has a unit roundoff of 2**-24 ≈ 6e-8. Two computations that are the same maths but not the
same kernel calls — a batch of 5 against a batch of 2, padded against unpadded, a KV-cached step
against a full recomputation, merged LoRA weights against the adapter — differ in the order of their
floating-point sums: CPU kernels (oneDNN / MKL / PyTorch's own vectorised loops) pick their blocking
by the problem shape *and* by the CPU's instruction set (AVX2 vs AVX-512, as on Intel vs AMD
machines of one cloud kind). A dot product of length K then differs by up to ~K·u·Σ|x_i y_i| and
typically ~√K·u, and every layer of a network adds its own: on a 2-core Intel Xeon the MiniLM states
of a text encoded in a batch of 2 and of 5 differ by 3.6e-6 (values of order 1, K = 384, 6 layers),
while an AMD EPYC happens to agree to 1e-6. So:

* ``FP32_SHAPES`` — one forward pass computed with other shapes: atol 1e-5 (≈ 3× the largest
  difference seen on either vendor), rtol 1e-4 for values far from 0. A real bug (a mask that leaks
  padding, a cache that misses a step) moves values by 1e-2 or more, so the tests stay sharp.
* ``FP32_DECODE`` — autoregressive decoding, where each step's rounding feeds the next step
  (dozens of steps): 1e-4 both ways.

Tests about logic rather than rounding compute in float64 or compare exactly instead.
"""

FP32_SHAPES = {"rtol": 1e-4, "atol": 1e-5}
FP32_DECODE = {"rtol": 1e-4, "atol": 1e-4}
