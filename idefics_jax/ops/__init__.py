"""Everything that depends on the platform or on how weights are stored: quantized weights and their matmuls (with
the int4 CPU kernel), the attention backends, the decode loop's view of the weights, and the CPU heap settings.
Nothing outside this folder branches on the platform or on a weight representation."""
