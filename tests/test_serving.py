"""Moved: the factor cache tests are in test_factor_cache.py, the mixed-batch tests in test_mixed_batch.py, their
helpers in many_adapters.py. This module only keeps ``randomize`` importable for test_hotswap.py."""

from .many_adapters import randomize  # noqa: F401
