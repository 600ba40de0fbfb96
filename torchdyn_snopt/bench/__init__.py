"""Benchmarks behind ``torchdyn-snopt bench``: equal-wall-clock comparisons of optimizers."""

from torchdyn_snopt.bench.image import bench_image

__all__ = ["bench_image"]
