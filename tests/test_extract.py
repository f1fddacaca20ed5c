"""Safe, resumable extraction and the OCR-VQA .jpg conversion (icmlab.download.extract)."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from icmlab.download.extract import (
    ArchiveError,
    UnsafeArchiveError,
    archive_format,
    convert_images_to_jpg,
    extract_archive,
    list_members,
)


def make_zip(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = 0o120777 << 16
            zf.writestr(info, target)
    return path


def make_tar(
    path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None, hardlinks: dict[str, str] | None = None
) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks or {}), (tarfile.LNKTYPE, hardlinks or {})):
            for name, target in links.items():
                ti = tarfile.TarInfo(name)
                ti.type, ti.linkname = kind, target
                tf.addfile(ti)
    return path


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_zip_and_tar_extract_into_exact_tree(tmp_path):
    files = {
        "train2017/000000000009.jpg": b"a" * 100,
        "train2017/000000000025.jpg": b"b" * 50,
        "__MACOSX/train2017/._x": b"junk",
    }
    z = make_zip(tmp_path / "train2017.zip", files)
    t = make_tar(tmp_path / "q.tar", {"spaq_koniq/1.jpg": b"x", "livefb_liveitw_aigc/sub/2.png": b"yy"})
    assert archive_format(z) == "zip" and archive_format(t) == "tar"

    res = extract_archive(z, tmp_path / "data" / "coco", progress=False)
    assert tree(tmp_path / "data" / "coco") == {"train2017/000000000009.jpg", "train2017/000000000025.jpg"}
    assert res.written == 2 and res.files == ["train2017/000000000009.jpg", "train2017/000000000025.jpg"]
    assert (tmp_path / "data/coco/train2017/000000000025.jpg").read_bytes() == b"b" * 50

    extract_archive(t, tmp_path / "data", progress=False)
    assert {"spaq_koniq/1.jpg", "livefb_liveitw_aigc/sub/2.png"} <= tree(tmp_path / "data")

    # strip_components drops the archive's top folder
    extract_archive(z, tmp_path / "flat", strip_components=1, progress=False)
    assert tree(tmp_path / "flat") == {"000000000009.jpg", "000000000025.jpg"}


def test_rerun_skips_complete_files_and_overwrite_rewrites(tmp_path):
    z = make_zip(tmp_path / "a.zip", {"d/1.bin": b"1" * 10, "d/2.bin": b"2" * 20})
    target = tmp_path / "out"
    extract_archive(z, target, progress=False)
    # an interrupted earlier run: one file missing, one left as a temp file
    (target / "d/2.bin").unlink()
    (target / "d/.2.bin.icmlab-part").write_bytes(b"2")
    res = extract_archive(z, target, progress=False)
    assert (res.written, res.skipped) == (1, 1)
    assert (target / "d/2.bin").read_bytes() == b"2" * 20
    res = extract_archive(z, target, overwrite=True, progress=False)
    assert (res.written, res.skipped) == (2, 0)


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_traversal_archive_writes_nothing_anywhere(tmp_path, fmt):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "a" / "b" / "target"
    evil = {
        "ok.txt": b"fine",
        "../../../outside/evil.txt": b"x",
        "/tmp/icmlab-abs-evil.txt": b"x",
        "dir/../../escape.txt": b"x",
    }
    links = {"link": "../../../outside", "abs_link": "/etc"}
    if fmt == "zip":
        arc = make_zip(tmp_path / "evil.zip", evil, symlinks=links)
    else:
        arc = make_tar(
            tmp_path / "evil.tar",
            evil | {"link/evil2.txt": b"x"},
            symlinks=links,
            hardlinks={"hl": "../../../outside/evil.txt"},
        )
    with pytest.raises(UnsafeArchiveError) as ei:
        extract_archive(arc, target, progress=False)
    msg = str(ei.value)
    assert "refused, nothing was extracted" in msg and "'..'" in msg and "absolute path" in msg
    assert "points outside the target" in msg
    assert not target.exists() or tree(target) == set()
    assert list(outside.iterdir()) == []
    assert not Path("/tmp/icmlab-abs-evil.txt").exists()
    assert not (tmp_path / "a" / "escape.txt").exists()


def test_internal_links_are_allowed(tmp_path):
    arc = make_tar(
        tmp_path / "l.tar",
        {"images/a.jpg": b"img"},
        symlinks={"alias.jpg": "images/a.jpg"},
        hardlinks={"copy.jpg": "images/a.jpg"},
    )
    extract_archive(arc, tmp_path / "t", progress=False)
    assert os.readlink(tmp_path / "t/alias.jpg") == "images/a.jpg"
    assert (tmp_path / "t/alias.jpg").read_bytes() == b"img"
    assert (tmp_path / "t/copy.jpg").read_bytes() == b"img"


def test_corrupt_and_non_archives_are_refused(tmp_path):
    good = make_zip(tmp_path / "g.zip", {"d/big.bin": os.urandom(4000)})
    truncated = tmp_path / "t.zip"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        extract_archive(truncated, tmp_path / "o1", progress=False)
    # flip a byte inside the stored data: the CRC check catches it
    data = bytearray(good.read_bytes())
    data[100] ^= 0xFF
    crc_bad = tmp_path / "c.zip"
    crc_bad.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        extract_archive(crc_bad, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2/d/big.bin").exists()
    html = tmp_path / "page.zip"
    html.write_bytes(b"<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(ArchiveError, match="not a zip or tar"):
        list_members(html)


def _img_bytes(fmt: str, mode: str = "RGB", size=(20, 12), **save) -> bytes:
    im = Image.new(mode, size, (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30))
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def test_ocr_vqa_images_become_real_jpegs_and_dead_ones_are_listed(tmp_path):
    src = tmp_path / "staging" / "images"
    src.mkdir(parents=True)
    jpeg = _img_bytes("JPEG")
    (src / "0001.jpg").write_bytes(jpeg)  # a real JPEG
    (src / "0002.jpg").write_bytes(_img_bytes("GIF", "P"))  # GIF data under .jpg
    (src / "0003.gif").write_bytes(_img_bytes("GIF", "P"))  # GIF under its own name
    (src / "0004.png").write_bytes(_img_bytes("PNG", "RGBA"))  # PNG with alpha
    (src / "0005.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated JPEG: dead
    (src / "0006.jpg").write_bytes(b"")  # empty file: dead
    (src / "0007.jpg").write_bytes(b"<html>404</html>")  # not an image: dead
    (src / "sub").mkdir()
    (src / "sub" / "0001.png").write_bytes(_img_bytes("PNG"))  # duplicate stem
    dst = tmp_path / "ocr_vqa" / "images"
    rep = convert_images_to_jpg(src, dst, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ["0001.jpg", "0002.jpg", "0003.jpg", "0004.jpg"]
    for p in dst.iterdir():
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
    assert (dst / "0001.jpg").read_bytes() == jpeg  # JPEG data kept byte for byte
    assert (rep.jpeg, rep.converted) == (1, 3)
    assert sorted(f for f, _ in rep.dead) == ["0005.jpg", "0006.jpg", "0007.jpg"]
    assert rep.duplicates == ["sub/0001.png"]
    assert rep.formats == {"JPEG": 1, "GIF": 2, "PNG": 1}
    # resumable: a rerun keeps the finished outputs
    rep2 = convert_images_to_jpg(src, dst, progress=False)
    assert rep2.kept == 4 and rep2.converted == 0 and len(rep2.dead) == 3
