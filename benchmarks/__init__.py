"""Benchmarks of accumfn against a hand-written loop, Accelerate and Lightning.

Run ``python -m benchmarks`` (``--quick`` for a smoke run, ``--help`` for options).
"""
