"""Shared pytest configuration.

Hypothesis profiles (the allocator property tests run >= 1 000 cases in the default profile):

* ``layerlens`` (loaded unless ``--hypothesis-profile`` is given): 1 000 examples, no deadline;
* ``layerlens-quick``: 100 examples, for a fast local loop
  (``pytest --hypothesis-profile=layerlens-quick``);
* ``layerlens-thorough``: 10 000 examples.
"""

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("layerlens", max_examples=1000, **_COMMON)
settings.register_profile("layerlens-quick", max_examples=100, **_COMMON)
settings.register_profile("layerlens-thorough", max_examples=10000, **_COMMON)


def pytest_configure(config):
    if not config.getoption("hypothesis_profile", default=None):
        settings.load_profile("layerlens")
