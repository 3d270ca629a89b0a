"""Benchmark helpers: the interleaved A/B timer, trace profiling, sample JPEGs.
"""
