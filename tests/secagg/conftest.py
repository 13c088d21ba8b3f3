"""secagg tests run on CPU; hypothesis examples are few because each new shape compiles."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import settings  # noqa: E402

settings.register_profile("secagg", max_examples=12, deadline=None, derandomize=True)
settings.load_profile("secagg")
