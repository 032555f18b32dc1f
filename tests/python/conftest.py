"""pytest configuration: hypothesis profiles.

`dev` (default) draws new examples on every run, so fuzzing keeps finding
new cases locally; `ci` (HYPOTHESIS_PROFILE=ci, set by .ci/run) draws the
same examples every run, so CI's verdict depends on the code only.
"""
import os

from hypothesis import settings

settings.register_profile("dev", print_blob=True)
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
