"""Training reads the weights the download stage placed: offline after download, no second download.

A loopback Hugging Face Hub (``fakeservers.FakeHub``) hosts a tiny llava-hf checkpoint next to
weights no loader wants (``pytorch_model.bin`` beside the safetensors, flax weights). The CLI runs
in subprocesses (``HF_HOME``/``HF_HUB_OFFLINE`` are read when ``huggingface_hub`` is imported):

1. ``icmlab download`` fetches the checkpoint through ``download.endpoint`` (no ``HF_ENDPOINT``);
2. ``icmlab train`` with ``HF_HUB_OFFLINE=1`` trains 2 steps from the cache;
3. ``icmlab train`` online makes no request to the hub at all (the cache is complete);
4. without a download, the loader fetches only the files it reads, through the configured endpoint,
   once although two loads race for it (the per-node file lock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_train_setup as T
import yaml
from fakeservers import FakeHub, FileServer

from icmlab.config import load_run_config

ROOT = Path(__file__).resolve().parent.parent
REPO = "icmlab-test/tiny-llava"
pytestmark = pytest.mark.slow


def _env(hf_home: Path, offline: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return env | {
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }


def _icmlab(*args: str, hf_home: Path, offline: bool = False) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "icmlab", *args],
        cwd=ROOT,
        env=_env(hf_home, offline),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    return out


def _host(hub: FakeHub, tmp_path: Path) -> dict[str, bytes]:
    src = T.build_llava_hf(tmp_path / "src")
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    files["pytorch_model.bin"] = os.urandom(4096)  # a duplicate nobody should fetch
    files["flax_model.msgpack"] = os.urandom(2048)
    hub.add_repo(REPO, files, repo_type="model")
    return files


def _recipe(tmp_path: Path, endpoint: str) -> Path:
    records = T.build_records(tmp_path / "data")
    (tmp_path / "data" / "train.json").write_text(json.dumps(records))
    raw = {
        "run_name": "offline",
        "seed": 7,
        "runs_root": str(tmp_path / "runs"),
        "model": {"family": "llava15", "size": "tiny", "base": REPO, "base_format": "hf", "dtype": "float32"},
        "data": {
            "root": str(tmp_path / "data"),
            "datasets": ["custom"],
            "custom_json": ["train.json"],
            "model_max_length": 256,
        },
        "train": {
            "strategy": "after",
            "max_steps": 2,
            "per_device_batch_size": 4,
            "global_batch_size": 8,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "save_steps": 1000,
            "gradient_checkpointing": False,
            "bf16": False,
            "tf32": False,
            "dataloader_num_workers": 0,
            "report_to": ["none"],
        },
        "eval": {"benchmarks": [], "baseline": False},
        "hardware": {
            "device": "cpu",
            "num_gpus": 1,
            "deepspeed": "none",
            "attn_implementation": "sdpa",
            "launcher": "inprocess",
        },
        "download": {"endpoint": endpoint, "min_free_gb": 0.0},
    }
    path = tmp_path / "parameters" / "offline.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    for name in ("offline", "online"):  # where merge would put it, for both runs of the test
        T.write_training_json(load_run_config(path, {"run_name": name}), records)
    return path


def _fetched(cdn: FileServer, hub: FakeHub, files: dict[str, bytes]) -> dict[str, int]:
    """GETs per hosted file, whether served by the hub or redirected to the CDN."""
    import hashlib

    out = {}
    for name, body in files.items():
        direct = [r for r in hub.requests if r["method"] == "GET" and r["path"].split("?")[0].endswith(f"/{name}")]
        lfs = cdn.gets(f"/lfs/{hashlib.sha256(body).hexdigest()}") if len(body) >= hub.lfs_min else []
        out[name] = len(direct) + len(lfs)
    return out


def test_train_after_download_works_offline_and_never_downloads_again(tmp_path):
    with FileServer() as cdn, FakeHub(cdn) as hub:
        files = _host(hub, tmp_path)
        params = _recipe(tmp_path, hub.base)
        _icmlab("download", str(params), hf_home=tmp_path / "hf")
        got = _fetched(cdn, hub, files)
        assert got["model.safetensors"] == 1 and got["pytorch_model.bin"] == 0 and got["flax_model.msgpack"] == 0
        n_hub, n_cdn = len(hub.requests), len(cdn.requests)

        _icmlab("train", str(params), hf_home=tmp_path / "hf", offline=True)
        cfg = load_run_config(params)
        assert (cfg.run_dir / "model" / "config.json").is_file() or any(cfg.run_dir.glob("**/model.safetensors"))
        _icmlab("train", str(params), "--set", "run_name=online", hf_home=tmp_path / "hf", offline=False)
        assert (len(hub.requests), len(cdn.requests)) == (n_hub, n_cdn), hub.requests[n_hub:]


LOADER_SCRIPT = r"""
import sys, threading
from icmlab.models.llava15.files import hub_options, resolve_source
out, errors = [], []
def load():
    try:
        with hub_options(endpoint=sys.argv[1]):
            out.append(str(resolve_source(sys.argv[2])))
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=load) for _ in range(2)]
[t.start() for t in threads]; [t.join() for t in threads]
assert not errors, errors
assert len(set(out)) == 1, out
print(out[0])
"""


def test_loader_fetches_only_its_files_through_the_endpoint_once(tmp_path):
    with FileServer() as cdn, FakeHub(cdn) as hub:
        files = _host(hub, tmp_path)
        env = _env(tmp_path / "hf", offline=False)
        out = subprocess.run(
            [sys.executable, "-c", LOADER_SCRIPT, hub.base, REPO],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        snap = Path(out.stdout.strip().splitlines()[-1])
        assert sorted(p.name for p in snap.iterdir()) == sorted(
            n for n in files if not n.endswith((".bin", ".msgpack"))
        )
        got = _fetched(cdn, hub, files)
        assert got["pytorch_model.bin"] == 0 and got["flax_model.msgpack"] == 0
        assert all(n <= 1 for n in got.values()), got  # two racing loads, one fetch each
        # offline with nothing cached: a clear message naming the fix
        bare = subprocess.run(
            [sys.executable, "-c", LOADER_SCRIPT, hub.base, "icmlab-test/absent"],
            cwd=ROOT,
            env=_env(tmp_path / "hf2", offline=True),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert bare.returncode != 0 and "HF_HUB_OFFLINE" in bare.stderr and "icmlab download" in bare.stderr
