"""Benchmark suite of jaxnmf against the NumPy reference, scikit-learn and the GEMM floor.

Run ``python -m benchmarks.run [--quick] [--large] [--out DIR]``; ``benchmarks/README.md`` says
what is measured and how to read the table. Fair NumPy on this machine:
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.run``.
"""
