"""Test configuration: a deterministic Hypothesis profile."""

import hypothesis

hypothesis.settings.register_profile(
    "deterministic", derandomize=True, deadline=None, max_examples=8,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("deterministic")
