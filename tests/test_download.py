"""The download stage against loopback servers (tests/fakeservers.py): no mocks of icmlab code.

Covers: a SIGKILLed download resumes without re-fetching its bytes; checksum mismatches leave
nothing; HTML instead of data and gated data give actionable messages; the stage lays out the trees,
verifies, and does no network work the second time; the Hugging Face path through huggingface_hub
(run in a subprocess so HF_ENDPOINT is set before it is imported); dry runs of real recipes; the demo.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from fakeservers import FakeHub, FileServer

from icmlab.config import config_from_dict, load_run_config
from icmlab.download import stage as download
from icmlab.download.fetch import AuthError, ChecksumError, FetchError, HTMLInsteadOfData, NotFoundError, fetch_url

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def labels(images: list[str]) -> bytes:
    return json.dumps(
        [
            {
                "id": str(i),
                "image": im,
                "conversations": [
                    {"from": "human", "value": "<image>\nHow is the quality?"},
                    {"from": "gpt", "value": "Good."},
                ],
            }
            for i, im in enumerate(images)
        ]
    ).encode()


def recipe(tmp_path: Path, sources: dict | None = None) -> dict:
    """A small after-strategy LLaVA recipe with a local starting checkpoint (nothing to fetch for it)."""
    model = tmp_path / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text("{}")
    raw = {
        "run_name": "t",
        "model": {"family": "llava15", "size": "tiny", "base": str(model)},
        "data": {"root": str(tmp_path / "data"), "datasets": ["q_instruct"], "sources": sources or {}},
        "train": {"strategy": "after", "bf16": False},
        "eval": {"benchmarks": ["qbench_a1"], "baseline": True},
        "hardware": {"device": "cpu", "num_gpus": 1, "deepspeed": "none"},
        "download": {"concurrency": 2, "retries": 2, "min_free_gb": 0.0},
    }
    return raw


# --------------------------------------------------------------------------- fetch_url
KILL_SCRIPT = (
    "import sys; from pathlib import Path; from icmlab.download.fetch import fetch_url; "
    "fetch_url(sys.argv[1], Path(sys.argv[2]), size=int(sys.argv[3]), sha256=sys.argv[4], progress=False)"
)


def test_sigkilled_download_resumes_without_fetching_its_bytes_again(server, tmp_path):
    data = os.urandom(4 * MiB + 12345)
    url = server.add("/big.bin", data, stall_after=MiB + MiB // 2)  # the first GET hangs after 1.5 MiB
    dest = tmp_path / "dl" / "big.bin"
    part = dest.with_name("big.bin.part")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, url, str(dest), str(len(data)), sha(data)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= MiB):
        assert proc.poll() is None and time.monotonic() < deadline, "the download never got going"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = part.stat().st_size
    assert not dest.exists() and 0 < kept < len(data)

    res = fetch_url(url, dest, size=len(data), sha256=sha(data), progress=False)
    assert dest.read_bytes() == data and not part.exists()
    assert res.resumed_from == kept and res.transferred == len(data) - kept
    second = server.gets("/big.bin")[-1]
    assert second["range"] == f"bytes={kept}-"
    assert second["sent"] == len(data) - kept  # not one byte it already had was sent again
    # once verified, never fetched again
    n = len(server.requests)
    assert fetch_url(url, dest, size=len(data), sha256=sha(data), progress=False).transferred == 0
    assert len(server.requests) == n


def test_cut_connections_and_server_errors_are_retried_and_resumed(server, tmp_path):
    data = os.urandom(3 * MiB)
    url = server.add("/cut.bin", data, cut_after=MiB, cut_times=2)
    res = fetch_url(url, tmp_path / "cut.bin", sha256=sha(data), backoff=0.01, progress=False)
    assert (tmp_path / "cut.bin").read_bytes() == data
    gets = server.gets("/cut.bin")
    assert [g["range"] for g in gets] == [None, f"bytes={MiB}-", f"bytes={2 * MiB}-"]
    assert sum(g["sent"] for g in gets) == len(data) == res.transferred

    url = server.add("/flaky.json", b"[1, 2]", fail_times=2, fail_status=503)
    fetch_url(url, tmp_path / "flaky.json", backoff=0.01, progress=False)
    assert (tmp_path / "flaky.json").read_bytes() == b"[1, 2]"
    url = server.add("/down.json", b"[]", fail_times=99)
    with pytest.raises(FetchError, match="gave up after 2 retries"):
        fetch_url(url, tmp_path / "down.json", retries=2, backoff=0.01, progress=False)


def test_checksum_or_size_mismatch_leaves_nothing_in_place(server, tmp_path):
    data = os.urandom(300_000)
    url = server.add("/x.zip", data)
    dest = tmp_path / "x.zip"
    with pytest.raises(ChecksumError, match="sha256") as ei:
        fetch_url(url, dest, sha256="0" * 64, progress=False)
    assert "nothing was written" in str(ei.value)
    with pytest.raises(ChecksumError, match="offers 300000 bytes, expected 999"):
        fetch_url(url, dest, size=999, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_html_instead_of_data_is_refused_with_the_right_url(server, tmp_path):
    page = b"<!DOCTYPE html><html><head><title>llava_v1_5_mix665k.json</title></head><body>...</body></html>"
    url = server.add(
        "/datasets/liuhaotian/LLaVA-Instruct-150K/blob/main/llava_v1_5_mix665k.json",
        page,
        content_type="text/html; charset=utf-8",
    )
    with pytest.raises(HTMLInsteadOfData) as ei:
        fetch_url(url, tmp_path / "mix.json", progress=False)
    assert server.url("/datasets/liuhaotian/LLaVA-Instruct-150K/resolve/main/llava_v1_5_mix665k.json") in str(ei.value)
    # a captive portal that does not even say text/html is sniffed
    url = server.add("/data.json", b"\n  <html><body>Please log in to the Wi-Fi</body></html>")
    with pytest.raises(HTMLInsteadOfData, match="instead of"):
        fetch_url(url, tmp_path / "data.json", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_auth_and_missing_files_give_clear_errors(server, tmp_path):
    with pytest.raises(AuthError, match="401.*credentials"):
        fetch_url(server.add("/gated.zip", status=401), tmp_path / "g.zip", progress=False)
    with pytest.raises(AuthError, match="403"):
        fetch_url(server.add("/forbidden.zip", status=403), tmp_path / "f.zip", progress=False)
    with pytest.raises(NotFoundError, match="404"):
        fetch_url(server.url("/nope.zip"), tmp_path / "n.zip", progress=False)


# --------------------------------------------------------------------------- the stage over plain HTTP
def serve_recipe_data(server: FileServer) -> dict[str, str]:
    imgs = {"spaq_koniq/00001.jpg": os.urandom(2000), "livefb_liveitw_aigc/a/0002.png": os.urandom(3000)}
    qb = {"images_llvisionqa/q1.jpg": os.urandom(1000)}
    return {
        "q_instruct_labels": server.add("/qi/cleaned_labels.json", labels(sorted(imgs))),
        "q_instruct_images": server.add("/qi/q-instruct-images.tar", tar_of(imgs)),
        "qbench_dev_json": server.add("/qb/llvisionqa_dev.json", b'[{"img_path": "q1.jpg"}]'),
        "qbench_images": server.add("/qb/images_llvisionqa.tar", tar_of(qb)),
    }


def test_stage_lays_out_the_tree_and_a_second_run_does_no_network_work(server, tmp_path):
    sources = serve_recipe_data(server)
    cfg = config_from_dict(recipe(tmp_path, sources))
    items = download.plan(cfg)
    assert [i.name for i in items] == [
        "q_instruct_labels",
        "q_instruct_images",
        "qbench_dev_json",
        "qbench_images",
        "model.base",
    ]
    assert server.requests == []  # the dry run touches nothing
    res = download.run(cfg, progress=False)
    root = tmp_path / "data"
    assert res.ok, res.summary()
    assert {o.action for o in res.outcomes} == {"fetched"}
    for rel in (
        "cleaned_labels.json",
        "spaq_koniq/00001.jpg",
        "livefb_liveitw_aigc/a/0002.png",
        "eval/qbench/llvisionqa_dev.json",
        "eval/qbench/images_llvisionqa/q1.jpg",
    ):
        assert (root / rel).is_file(), rel
    rows = {r.path: r for r in res.layout}
    assert rows["spaq_koniq"].found == rows["spaq_koniq"].expected == 1
    assert not any((root / ".icmlab" / "downloads").rglob("*.tar"))  # verified + extracted: archive dropped
    assert "q_instruct_images" in download.format_plan(items) and "<table>" in download.plan_html(items)
    assert "spaq_koniq" in download.format_layout(res.layout) and "<td" in download.layout_html(res.layout)

    n = len(server.requests)
    again = download.run(cfg, progress=False)
    assert len(server.requests) == n
    assert {o.action for o in again.outcomes} == {"already done"} and again.ok
    assert all(i.status == "done" for i in download.plan(cfg) if i.kind != "model")


def test_stage_failures_are_collected_with_actionable_messages(server, tmp_path):
    outside = tmp_path / "outside.txt"
    sources = {
        "q_instruct_labels": server.add(
            "/datasets/teowu/Q-Instruct/blob/main/cleaned_labels.json",
            b"<!doctype html><html>page</html>",
            content_type="text/html",
        ),
        "q_instruct_images": server.add("/evil.tar", tar_of({"spaq_koniq/1.jpg": b"x", "../../outside.txt": b"x"})),
        "qbench_dev_json": server.add("/gated.json", status=401),
        "qbench_images": server.add("/corrupt.tar", tar_of({"images_llvisionqa/1.jpg": os.urandom(9000)})[:6000]),
    }
    cfg = config_from_dict(recipe(tmp_path, sources))
    with pytest.raises(download.DownloadError) as ei:
        download.run(cfg, progress=False)
    msg = str(ei.value)
    assert "4 of 4 sources failed" in msg
    assert "/datasets/teowu/Q-Instruct/resolve/main/cleaned_labels.json" in msg
    assert "'..' climbs out of the target" in msg and "nothing was extracted" in msg
    assert "401" in msg and "data.sources.qbench_dev_json" in msg
    assert "corrupt or truncated" in msg and "the next run fetches it again" in msg
    assert not list((tmp_path / "data" / ".icmlab" / "downloads").rglob("*.tar"))
    assert not outside.exists()
    root = tmp_path / "data"
    assert not (root / "spaq_koniq").exists() and not (root / "cleaned_labels.json").exists()
    assert not list((root / ".icmlab").glob("done/*.json"))
    assert {r.status for r in ei.value.result.layout if r.source != "model.base"} == {"missing"}


def test_local_overrides_go_through_the_same_checks(tmp_path):
    good = tmp_path / "cleaned_labels.json"
    good.write_bytes(labels(["spaq_koniq/1.jpg"]))
    tar = tmp_path / "imgs.tar"
    tar.write_bytes(tar_of({"spaq_koniq/1.jpg": b"j", "livefb_liveitw_aigc/2.jpg": b"k"}))
    saved_page = tmp_path / "images_llvisionqa.tar"
    saved_page.write_bytes(b"<!DOCTYPE html><html>the dataset page</html>")
    qb = tmp_path / "dev.json"
    qb.write_bytes(b"[]")
    sources = {
        "q_instruct_labels": f"{good.as_uri()}#sha256={sha(good.read_bytes())}",
        "q_instruct_images": f"{tar}#sha256={'1' * 64}",  # wrong checksum
        "qbench_dev_json": str(qb),
        "qbench_images": str(saved_page),
    }
    cfg = config_from_dict(recipe(tmp_path, sources))
    with pytest.raises(download.DownloadError) as ei:
        download.run(cfg, progress=False)
    msg = str(ei.value)
    assert "2 of 4 sources failed" in msg
    assert "q_instruct_images" in msg and "sha256" in msg
    assert "huggingface.co/datasets/nanyangtu/LLVisionQA-QBench/resolve/main/images_llvisionqa.tar" in msg
    root = tmp_path / "data"
    assert (root / "cleaned_labels.json").read_bytes() == good.read_bytes()
    assert not (root / "spaq_koniq").exists()
    assert tar.exists() and saved_page.exists()  # the user's files are never touched


def test_disk_preflight_and_the_lock_refuse_before_fetching(server, tmp_path):
    from filelock import FileLock

    raw = recipe(tmp_path, serve_recipe_data(server))
    cfg = config_from_dict(raw | {"download": {"min_free_gb": 1e9}})
    with pytest.raises(download.InsufficientDiskSpace, match="not enough disk space"):
        download.run(cfg, progress=False)
    cfg = config_from_dict(raw)
    (tmp_path / "data" / ".icmlab").mkdir(parents=True)
    with FileLock(str(tmp_path / "data" / ".icmlab" / "lock")):
        with pytest.raises(RuntimeError, match="another download step is running"):
            download.run(cfg, progress=False)
    assert server.requests == []


# --------------------------------------------------------------------------- Hugging Face path (subprocess)
HF_SCRIPT = r"""
import json, sys
from icmlab.download import stage as download
from icmlab.config import config_from_dict
cfg = config_from_dict(json.loads(sys.argv[1]))
try:
    res, err = download.run(cfg, progress=False), None
except download.DownloadError as e:
    res, err = e.result, str(e)
print(json.dumps({"error": err, "outcomes": [[o.name, o.action] for o in res.outcomes],
                  "layout": [[r.source, r.path, r.status] for r in res.layout]}))
"""


def run_hf(raw: dict, hub: FakeHub, hf_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {
        "HF_ENDPOINT": hub.base,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, json.dumps(raw)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hugging_face_sources_through_huggingface_hub(tmp_path):
    imgs = {"spaq_koniq/00001.jpg": os.urandom(1500), "livefb_liveitw_aigc/2.jpg": os.urandom(1500)}
    with FileServer() as cdn, FakeHub(cdn) as hub:
        # Q-Instruct only under its newer name: the catalog's alt_repos fallback must find it
        hub.add_repo(
            "q-future/Q-Instruct-DB",
            {"cleaned_labels.json": labels(sorted(imgs)), "q-instruct-images.tar": tar_of(imgs)},
        )
        qb_images = tar_of({"images_llvisionqa/a.jpg": b"a"})
        hub.add_repo("nanyangtu/LLVisionQA-QBench", {"llvisionqa_dev.json": b"[]", "images_llvisionqa.tar": qb_images})
        bin_weights = os.urandom(4096)
        hub.add_repo(
            "llava-hf/llava-1.5-7b-hf",
            {
                "config.json": b'{"model_type": "llava"}',
                "model.safetensors": os.urandom(4096),
                "pytorch_model.bin": bin_weights,
                "tf_model.h5": b"h5" * 900,
            },
            repo_type="model",
        )
        hub.add_repo("wumengyangok/ICM-Instruct", {"icm-instruct-train.zip": zip_of({"a": b"b"})}, gated=True)
        raw = recipe(tmp_path)
        raw["model"] = {"family": "llava15", "size": "7b", "base": "llava-hf/llava-1.5-7b-hf"}
        out = run_hf(raw, hub, tmp_path / "hf")
        assert out["error"] is None, out
        assert all(status == "ok" for _, _, status in out["layout"]), out["layout"]
        root = tmp_path / "data"
        assert json.loads((root / "cleaned_labels.json").read_text())[0]["image"] == "livefb_liveitw_aigc/2.jpg"
        assert (root / "spaq_koniq/00001.jpg").read_bytes() == imgs["spaq_koniq/00001.jpg"]
        assert (root / "eval/qbench/images_llvisionqa/a.jpg").is_file()
        snap = next((tmp_path / "hf/hub/models--llava-hf--llava-1.5-7b-hf/snapshots").iterdir())
        assert sorted(p.name for p in snap.iterdir()) == ["config.json", "model.safetensors"]  # no .bin/.h5 copies
        assert not cdn.gets(f"/lfs/{sha(bin_weights)}")
        n_hub, n_cdn = len(hub.requests), len(cdn.requests)
        again = run_hf(raw, hub, tmp_path / "hf")
        assert {a for _, a in again["outcomes"]} == {"already done"}
        assert (len(hub.requests), len(cdn.requests)) == (n_hub, n_cdn)  # no network work at all

        gated = recipe(tmp_path / "g")
        gated["data"]["datasets"] = ["icm_instruct"]
        out = run_hf(gated, hub, tmp_path / "hf")
        err = out["error"]
        assert "icm_instruct_train" in err and "gated" in err and "403" in err
        assert "hf auth login" in err and "HF_TOKEN" in err and "mywu@cse.cuhk.edu.hk" in err
        assert "data.sources.icm_instruct_train: /path/to/icm-instruct-train.zip" in err


# --------------------------------------------------------------------------- dry runs of real recipes
def names(cfg) -> set[str]:
    return {i.name for i in download.plan(cfg)}


HIGH = {
    "llava_mix665k",
    "coco_train2017",
    "gqa_images",
    "ocr_vqa_images",
    "textvqa_train_val_images",
    "vg_images",
    "vg_images2",
}


def real(family: str, strategy: str, dataset: str, **model) -> dict:
    return {
        "run_name": "r",
        "model": {"family": family, **model},
        "data": {"root": "/tmp/icmlab-dry-run-data", "datasets": [dataset]},
        "train": {"strategy": strategy},
    }


def test_dry_run_llava_after_icm():
    cfg = config_from_dict(
        real(
            "llava15",
            "after",
            "icm_instruct",
            base="liuhaotian/llava-v1.5-7b",
            base_format="original",
            vision_tower="openai/clip-vit-large-patch14-336",
        )
    )
    assert names(cfg) == {"icm_instruct_train", "qbench_dev_json", "qbench_images", "llava_v15_7b", "clip_l14_336"}


def test_dry_run_llava_mix_q_instruct():
    cfg = config_from_dict(
        real(
            "llava15",
            "mix",
            "q_instruct",
            base="llava-hf/llava-1.5-7b-hf",
            llm="lmsys/vicuna-7b-v1.5",
            vision_tower="openai/clip-vit-large-patch14-336",
            mm_projector="liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5",
        )
    )
    items = {i.name: i for i in download.plan(cfg)}
    assert (
        set(items)
        == {
            "q_instruct_labels",
            "q_instruct_images",
            "qbench_dev_json",
            "qbench_images",
            "llava_hf_7b",
            "vicuna_7b",
            "clip_l14_336",
            "projector_7b",
        }
        | HIGH
    )
    assert items["coco_train2017"].target == "coco" and items["coco_train2017"].size > 18e9
    assert items["ocr_vqa_images"].target == "ocr_vqa/images"
    assert items["vicuna_7b"].target == "HF cache"
    assert "≈19.3 GB" in download.format_plan(list(items.values()))
    cfg.eval.baseline = False
    assert "llava_hf_7b" not in names(cfg)


def test_dry_run_mplug_owl2_after_q_instruct():
    cfg = config_from_dict(
        real("mplug_owl2", "after", "q_instruct", base="MAGAer13/mplug-owl2-llama2-7b", base_format="original")
    )
    assert names(cfg) == {"q_instruct_labels", "q_instruct_images", "qbench_dev_json", "qbench_images", "mplug_owl2_7b"}


REAL_RECIPES = sorted(p.name for p in (ROOT / "parameters").glob("*.yaml") if p.name != "demo.yaml")


@pytest.mark.parametrize("params", REAL_RECIPES)
def test_dry_run_of_every_parameters_file(params):
    cfg = load_run_config(ROOT / "parameters" / params, {"data.root": "/tmp/icmlab-dry-run-data"})
    items = {i.name: i for i in download.plan(cfg)}
    assert set(items) & HIGH == (HIGH if cfg.train.strategy == "mix" else set())
    for ds, src in (("icm_instruct", "icm_instruct_train"), ("q_instruct", "q_instruct_images")):
        assert (src in items) == (ds in cfg.data.datasets)
    assert any(i.kind in ("model", "model_file") for i in items.values())
    assert all(i.target and i.origin for i in items.values())


def test_demo_refuses_sources_it_cannot_stand_in_for(tmp_path):
    cfg = load_run_config(ROOT / "parameters" / "demo.yaml", {"data.root": str(tmp_path), "eval.split": "test"})
    with pytest.raises(ValueError, match="no synthetic stand-in for qbench_test_json"):
        download.plan(cfg)


def test_model_sources_cannot_be_relocated_through_data_sources(tmp_path):
    cfg = config_from_dict(recipe(tmp_path, {"clip_l14_336": "/models/clip"}))
    with pytest.raises(ValueError, match="model checkpoint"):
        download.plan(cfg)
    cfg = config_from_dict(recipe(tmp_path, {"coco": "/x.zip"}))
    with pytest.raises(ValueError, match="unknown source"):
        download.plan(cfg)


# --------------------------------------------------------------------------- the demo
@pytest.fixture(scope="module")
def demo_sources(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-sources")


def image_refs_resolve(root: Path, name: str) -> int:
    recs = json.loads((root / name).read_text())
    refs = [r["image"] for r in recs if "image" in r]
    assert refs and all((root / r).is_file() for r in refs), name
    return len(refs)


def test_demo_lays_out_the_exact_trees(tmp_path, demo_sources):
    root = tmp_path / "data"
    cfg = load_run_config(
        ROOT / "parameters" / "demo.yaml",
        {
            "data.root": str(root),
            "demo.source_dir": str(demo_sources),
            "demo.scale": 0.1,
            "model.base": str(root / "models" / "llava-tiny-hf"),
        },
    )
    res = download.run(cfg, progress=False)
    assert res.ok, res.summary()
    for rel in (
        "cleaned_labels.json",
        "spaq_koniq",
        "livefb_liveitw_aigc",
        "icm_llava_train.json",
        "sexy_check_all",
        "eval/qbench/llvisionqa_dev.json",
        "eval/qbench/images_llvisionqa",
        "eval/icm/val",
        "eval/icm/val_MEQ",
        "models/llava-tiny-hf/config.json",
    ):
        assert (root / rel).exists(), rel
    assert not (root / "coco").exists() and not (root / "llava_v1_5_mix665k.json").exists()  # 'after' needs none
    image_refs_resolve(root, "cleaned_labels.json")
    image_refs_resolve(root, "icm_llava_train.json")
    dev = json.loads((root / "eval/qbench/llvisionqa_dev.json").read_text())
    assert all((root / "eval/qbench/images_llvisionqa" / r["img_path"]).is_file() for r in dev)
    again = download.run(cfg, progress=False)
    assert {o.action for o in again.outcomes} == {"already done"}


def test_demo_mix_converts_ocr_vqa_and_lays_out_the_high_level_trees(tmp_path, demo_sources):
    root = tmp_path / "data"
    models = root / "models"
    cfg = load_run_config(
        ROOT / "parameters" / "demo.yaml",
        {
            "data.root": str(root),
            "demo.source_dir": str(demo_sources),
            "demo.scale": 0.1,
            "train.strategy": "mix",
            "eval.benchmarks": [],
            "eval.baseline": False,
            "model.llm": str(models / "vicuna-tiny"),
            "model.vision_tower": str(models / "clip-tiny"),
            "model.mm_projector": str(models / "llava-tiny-pretrain" / "mm_projector.bin"),
        },
    )
    res = download.run(cfg, progress=False)
    assert res.ok, res.summary()
    for rel in (
        "coco/train2017",
        "gqa/images",
        "ocr_vqa/images",
        "textvqa/train_images",
        "vg/VG_100K",
        "vg/VG_100K_2",
        "models/vicuna-tiny/config.json",
        "models/clip-tiny/config.json",
        "models/llava-tiny-pretrain/mm_projector.bin",
    ):
        assert (root / rel).exists(), rel
    assert image_refs_resolve(root, "llava_v1_5_mix665k.json") > 0
    from PIL import Image

    for p in (root / "ocr_vqa/images").iterdir():
        with Image.open(p) as im:
            assert p.suffix == ".jpg" and im.format == "JPEG"
    assert res.ocr_vqa["converted"] > 0 and res.ocr_vqa["missing_referenced"] == []
