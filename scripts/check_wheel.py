"""Builds the wheel, installs it in a fresh virtual environment and trains
one step with it on each backend.

The fresh environment sees the packages of the running one (Keras and the
backends) but not this checkout, nor its editable install: a module left
out of the wheel fails here.

Usage: python scripts/check_wheel.py
"""

import os
import subprocess
import sys
import sysconfig
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax", "torch")

ONE_STEP = """
import sys
import keras
import numpy as np
import keras_muon

assert keras_muon.__file__.startswith(sys.prefix), keras_muon.__file__
model = keras.Sequential(
    [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)]
)
model.compile(optimizer=keras_muon.Muon(), loss="mse")
history = model.fit(np.ones((4, 8)), np.zeros((4, 2)), verbose=0)
routes = [row["route"] for row in model.optimizer.routing_table()]
assert routes == ["muon", "adamw", "adamw", "adamw"], routes
print(f"{keras.backend.backend()}: one step, loss {history.history['loss'][0]:.4f}")
"""


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp, ROOT],
            check=True,
        )
        (wheel,) = tmp.glob("keras_muon-*.whl")
        print(f"built {wheel.name}", flush=True)
        environment = tmp / "env"
        venv.create(environment, with_pip=True)
        python = environment / "bin" / "python"
        site_packages = subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            text=True,
        ).strip()
        # A path in a .pth file is added without the .pth files it holds,
        # so the editable install of this checkout stays out.
        Path(site_packages, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", wheel],
            check=True,
        )
        for backend in BACKENDS:
            subprocess.run(
                [python, "-c", ONE_STEP],
                check=True,
                cwd=tmp,
                env=dict(os.environ, KERAS_BACKEND=backend),
            )


if __name__ == "__main__":
    main()
