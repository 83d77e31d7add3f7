"""Started by every Python process of the test session (its PYTHONPATH holds this folder): turns on
the device guard (:mod:`device_guard`) when ``STABLEMOE_DEVICE_GUARD`` is set."""

import os

if os.environ.get("STABLEMOE_DEVICE_GUARD", "0") not in ("", "0"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import device_guard
    except ImportError:  # an interpreter without torch (e.g. a fresh venv of the packaging tests)
        pass
    else:
        device_guard.install()
    finally:
        sys.path.pop(0)
