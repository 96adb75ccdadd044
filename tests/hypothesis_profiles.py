"""Hypothesis profiles for the property tests, chosen with ``HYPOTHESIS_PROFILE``
(``conftest.py`` loads it before any test module is imported):

* ``ci`` (the default; CI and the README's test command): each test at its full example
  count, derandomized as Hypothesis's own CI profile is (the same examples on every run,
  so a failure reproduces; no example database; the failing example's blob printed);
* ``dev``: a tenth of each count (at least 10), random as Hypothesis's default, for a
  quick local run: ``HYPOTHESIS_PROFILE=dev pytest -m "not slow"``.

A property test takes its count from :func:`examples`, as in
``@settings(max_examples=examples(400), deadline=None)``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

#: Profile name -> the share of each test's example count it runs.
SHARES = {"ci": 1.0, "dev": 0.1}


def _name() -> str:
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    if name not in SHARES:
        raise ValueError(f"HYPOTHESIS_PROFILE={name!r} is not one of textenc's profiles {sorted(SHARES)}")
    return name


def load() -> str:
    """Register the profiles and load the one ``HYPOTHESIS_PROFILE`` names; its name."""
    settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None, max_examples=10)
    settings.load_profile(_name())
    return _name()


def examples(count: int) -> int:
    """A property test's example count under the loaded profile (``count`` under ``ci``)."""
    share = SHARES[_name()]
    return count if share == 1.0 else max(10, round(count * share))
