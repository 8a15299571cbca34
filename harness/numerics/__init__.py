"""Numerics: probe batches, the fp32 reference built by hand, the tolerance table and the comparison."""
