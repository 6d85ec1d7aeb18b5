"""Hypothesis profiles of the differential fuzz (herd against transformers).

"ci" (the default): derandomized, a bounded number of examples per test so that the whole directory takes about a
minute on a 2-core CPU. "long" (HYPOTHESIS_PROFILE=long): many more, randomized examples for on-demand runs.
Neither writes an example database (database=None), so the suite runs on a read-only checkout.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, max_examples=80, **_COMMON)
settings.register_profile("long", derandomize=False, max_examples=1000, **_COMMON)
# "dev": the ci examples without shrinking, for quick iterations.
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]
settings.register_profile("dev", derandomize=True, max_examples=5, phases=NO_SHRINK, **_COMMON)
settings.register_profile("long-noshrink", derandomize=False, max_examples=1000, phases=NO_SHRINK, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def scaled(fraction: float, **more) -> settings:
    """The loaded profile with a fraction of its examples, for the slower tests (Mllama builds a vision tower)."""
    return settings(max_examples=max(1, round(settings.default.max_examples * fraction)), **more)
