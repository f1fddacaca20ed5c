"""The training loader's JPEG decode (icmlab.inputs.jpeg) against Pillow, and its hand-over to Pillow.

Every expected value is Pillow's own decode of the same file (``Image.open(p).convert("RGB")``) or the
pixels of :func:`icmlab.inputs.images.load_rgb` through :class:`LeanClip`, the path it replaces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icmlab.inputs import jpeg
from icmlab.inputs.images import ASPECT_RATIOS, LeanClip, build_image_processor, decode_check, load_rgb

pytestmark = pytest.mark.skipif(jpeg.simplejpeg is None, reason="simplejpeg not installed")


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise (JPEG-like content: both flat areas and detail)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)


SAVES = {
    "420": {"subsampling": 2, "quality": 75},
    "422": {"subsampling": 1, "quality": 90},
    "444": {"subsampling": 0, "quality": 95},
    "progressive": {"progressive": True, "quality": 80},
    "optimized-q30": {"optimize": True, "quality": 30},
}
SIZES = [(640, 480), (480, 640), (333, 500), (17, 9), (1, 1)]


def _write(tmp_path: Path, name: str, arr: np.ndarray, **opts) -> Path:
    p = tmp_path / name
    Image.fromarray(arr).save(p, "JPEG", **opts)
    return p


def _pillow(p: Path) -> np.ndarray:
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB"))


def test_probe_agrees_with_the_installed_pillow():
    assert jpeg.agrees_with_pillow() and jpeg.available()


@pytest.mark.parametrize("save", SAVES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "%dx%d" % s)
def test_decode_is_pillows_bytes(tmp_path, save, size):
    w, h = size
    p = _write(tmp_path, "a.jpg", _scene(h, w, seed=w * 31 + h), **SAVES[save])
    got = jpeg.decode_rgbx(p)
    assert got is not None and got.shape == (h, w, 4)
    np.testing.assert_array_equal(got[..., :3], _pillow(p))


def test_files_it_declines_are_left_to_pillow(tmp_path):
    arr = _scene(48, 64, seed=3)
    whole = _write(tmp_path, "whole.jpg", arr).read_bytes()
    cases = {
        "png.jpg": lambda p: Image.fromarray(arr).save(p, "PNG"),  # not a JPEG, whatever its name
        "gray.jpg": lambda p: Image.fromarray(arr[..., 0]).save(p, "JPEG"),  # one component
        "cmyk.jpg": lambda p: Image.fromarray(arr).convert("CMYK").save(p, "JPEG"),
        "truncated.jpg": lambda p: p.write_bytes(whole[: len(whole) // 2]),  # libjpeg warns: strict
        "empty.jpg": lambda p: p.write_bytes(b""),
        "corrupt.jpg": lambda p: p.write_bytes(whole[:300] + b"\x00" * 200 + whole[500:]),
    }
    for name, make in cases.items():
        p = tmp_path / name
        make(p)
        assert jpeg.decode_rgbx(p) is None, name
    assert jpeg.decode_rgbx(tmp_path / "missing.jpg") is None


def test_buffer_is_reused_and_overwritten(tmp_path):
    a = jpeg.decode_rgbx(_write(tmp_path, "a.jpg", _scene(40, 50, seed=1)))
    first = a.copy()
    b = jpeg.decode_rgbx(_write(tmp_path, "b.jpg", _scene(40, 50, seed=2)))
    assert np.shares_memory(a, b) and not np.array_equal(a, first)  # documented: copy before the next call


def test_pixels_never_start_on_a_32_byte_boundary(tmp_path, monkeypatch):
    """libjpeg-turbo writes 32-byte-aligned rows with non-temporal (uncached) stores; the buffer, kept or
    fresh, starts at BUFFER_OFFSET past a 64-byte boundary so that the rows stay in the cache."""
    p = _write(tmp_path, "a.jpg", _scene(48, 64, seed=3))
    kept = jpeg.decode_rgbx(p)
    monkeypatch.setattr(jpeg, "KEEP_BUFFER_BYTES", 1000)
    fresh = jpeg.decode_rgbx(p)
    for a in (kept, fresh):
        assert a.ctypes.data % 64 == jpeg.BUFFER_OFFSET and a.ctypes.data % 32
        np.testing.assert_array_equal(a[..., :3], _pillow(p))


@pytest.mark.parametrize("aspect", ASPECT_RATIOS)
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (500, 375), (336, 336), (20, 90)], ids=lambda s: "%dx%d" % s)
def test_leanclip_from_file_equals_the_pillow_path(tmp_path, aspect, size):
    """What the training loader computes from a file equals the PIL-decoded image through LeanClip (itself
    checked against the processor call in tests/test_bicubic.py), for decoded, declined and missing files."""
    w, h = size
    lean = LeanClip.for_processor(build_image_processor(336), aspect)
    jpg = _write(tmp_path, "a.jpg", _scene(h, w, seed=w + h))
    png = tmp_path / "a.png"
    Image.fromarray(_scene(h, w, seed=abs(w - h))).save(png)
    for p in (jpg, png):
        assert torch.equal(lean.from_file(p), lean(load_rgb(p))), p.name
    with pytest.raises(FileNotFoundError, match="image not found"):
        lean.from_file(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpg.read_bytes()[:200])
    with pytest.raises(ValueError, match="broken.jpg"):
        lean.from_file(broken)


def test_probe_failure_turns_the_fast_path_off(monkeypatch, caplog, tmp_path):
    """A decoder whose bytes differ from Pillow's is never used: the probe catches it."""
    real = jpeg.simplejpeg.decode_jpeg

    class Off:
        @staticmethod
        def decode_jpeg(data, **kw):
            out = real(data, **kw)
            out[0, 0, 0] ^= 1
            return out

        decode_jpeg_header = staticmethod(jpeg.simplejpeg.decode_jpeg_header)

    monkeypatch.setattr(jpeg, "simplejpeg", Off)
    monkeypatch.setattr(jpeg, "_agrees", None)
    with caplog.at_level("WARNING"):
        assert not jpeg.agrees_with_pillow()
    assert "differ from Pillow" in caplog.text
    assert jpeg.decode_rgbx(_write(tmp_path, "a.jpg", _scene(8, 8, seed=0))) is None


def test_probe_encodes_in_memory_only(tmp_path, monkeypatch):
    """The probe writes no file (it runs in every data-loader worker)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jpeg, "_agrees", None)
    assert jpeg.agrees_with_pillow()
    assert not list(tmp_path.iterdir())


def test_decode_check_passes_what_training_reads_and_names_the_rest(tmp_path):
    good = _write(tmp_path, "good.jpg", _scene(30, 40, seed=5))
    decode_check(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match="cut.jpg"):  # Pillow's verdict: the fast decoder declined it
        decode_check(cut)


def test_big_images_get_their_own_arrays(tmp_path, monkeypatch):
    """Above the kept sizes (a phone photo), nothing stays in the per-thread buffers; same pixels."""
    from icmlab.inputs import bicubic

    monkeypatch.setattr(jpeg, "KEEP_BUFFER_BYTES", 1000)
    monkeypatch.setattr(bicubic, "KEEP_SCRATCH_BYTES", 1000)
    p, q = _write(tmp_path, "a.jpg", _scene(60, 80, seed=8)), _write(tmp_path, "b.jpg", _scene(60, 80, seed=9))
    a, b = jpeg.decode_rgbx(p), jpeg.decode_rgbx(q)
    assert not np.shares_memory(a, b)
    np.testing.assert_array_equal(a[..., :3], _pillow(p))
    lean = LeanClip.for_processor(build_image_processor(64), "pad")
    assert torch.equal(lean.from_file(p), lean(load_rgb(p)))


def test_a_jpeg_claiming_too_many_pixels_is_refused_unread(tmp_path):
    """A header rewritten to 60000x60000 (a decompression bomb): the fast path declines it by its
    header, and the training loader raises the guard's refusal as for any other format."""
    from icmlab.inputs.image_guard import ImageRefused

    data = bytearray(_write(tmp_path, "small.jpg", _scene(16, 16, seed=4)).read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2  # height, width
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(bytes(data))
    assert jpeg.decode_rgbx(bomb) is None
    lean = LeanClip.for_processor(build_image_processor(64), "pad")
    with pytest.raises(ImageRefused, match="bomb.jpg"):
        lean.from_file(bomb)
