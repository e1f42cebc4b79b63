import pytest

from keras_muon import update_scale
from tests import reference


@pytest.mark.parametrize("scale", ["naive", "jordan", "mup", "moonlight"])
@pytest.mark.parametrize("d_in, d_out", [(64, 256), (256, 64), (128, 128), (1, 300)])
def test_matches_the_formulas(scale, d_in, d_out):
    assert update_scale(scale, d_in, d_out) == pytest.approx(
        reference.scale(scale, d_in, d_out)
    )


def test_orientation_follows_keras_kernels():
    # A Dense kernel (d_in=64, d_out=256) widens: Jordan's factor is 2. The
    # torch convention (out, in) would read the same shape as narrowing.
    assert update_scale("jordan", 64, 256) == pytest.approx(2.0)
    assert update_scale("jordan", 256, 64) == 1.0
    assert update_scale("mup", 256, 64) == pytest.approx(0.5)


def test_moonlight_rms_rate():
    assert update_scale("moonlight", 100, 400, rms_rate=0.3) == pytest.approx(6.0)
    assert update_scale("moonlight", 100, 400, rms_rate=None) == 1.0


def test_unknown_scale_is_an_error():
    with pytest.raises(ValueError, match="scale"):
        update_scale("adam", 4, 4)
