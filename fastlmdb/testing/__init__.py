"""Test data the package can make by itself: a sample ImageFolder tree of synthetic photos
(sample_tree.py), for the tests, the benchmarks and ``fastlmdb demo``."""
