"""Runs the test suite once per Keras backend and fails if any run fails.

Usage: python scripts/run_tests.py [pytest arguments]
"""

import os
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")


def main(pytest_args):
    results = []
    for backend in BACKENDS:
        print(f"\n=== KERAS_BACKEND={backend} ===", flush=True)
        start = time.monotonic()
        code = subprocess.call(
            [sys.executable, "-m", "pytest", *pytest_args],
            env=dict(os.environ, KERAS_BACKEND=backend),
        )
        results.append((backend, code, time.monotonic() - start))
    print("\nbackend     pytest exit code  seconds")
    for backend, code, seconds in results:
        print(f"{backend:<11} {code:<17} {seconds:.0f}")
    # Any non-zero code fails, including 5 (no tests collected).
    return max(code != 0 for _, code, _ in results)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
