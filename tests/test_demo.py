"""Tests of the embedded demo: layouts, record formats, packing, determinism, tokenizer, checkpoints.

Everything is generated in-process at a small scale (a few seconds); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from icmlab.demo import build_demo_sources, build_demo_tree
from icmlab.demo import texts as T
from icmlab.demo.datasets import MODERATION_CATEGORIES, category_position
from icmlab.demo.images import DISTORTIONS, ImageSpec, sniff_format
from icmlab.demo.pack import ARTIFACTS, ARTIFACTS_BY_NAME, MANIFEST_NAME

SCALE = 0.05
LOW_LEVEL_SIDE = 64


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    return build_demo_sources(tmp_path_factory.mktemp("sources"), seed=0, scale=SCALE)


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> dict[str, Path]:
    return build_demo_tree(tmp_path_factory.mktemp("tree") / "data", seed=0, scale=SCALE)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    import torch

    from icmlab.demo import build_tiny_checkpoints

    torch.set_num_threads(1)
    return build_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"), seed=0)


def archive_files(path: Path) -> dict[str, bytes]:
    """All regular files of a zip or tar (member path → bytes)."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def top_level(path: Path) -> set[str]:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    else:
        with tarfile.open(path) as tf:
            names = [m.name + ("/" if m.isdir() else "") for m in tf.getmembers()]
    return {n.split("/")[0] + ("/" if "/" in n else "") for n in names}


def load_json_member(path: Path, member: str):
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read(member))


def assert_llava_record(rec: dict, token: str = "<image>") -> None:
    """LLaVA format validity: keys, alternating roles from human, one image token iff ``image``."""
    assert set(rec) <= {"id", "image", "conversations"}, rec
    assert isinstance(rec["id"], str) and rec["id"]
    conv = rec["conversations"]
    assert len(conv) >= 2 and len(conv) % 2 == 0, rec["id"]
    for i, turn in enumerate(conv):
        assert set(turn) == {"from", "value"}, rec["id"]
        assert turn["from"] == ("human" if i % 2 == 0 else "gpt"), rec["id"]
        assert isinstance(turn["value"], str) and turn["value"].strip(), rec["id"]
    n_tokens = sum(t["value"].count(token) for t in conv)
    if "image" in rec:
        assert n_tokens == 1 and token in conv[0]["value"], rec["id"]
    else:
        assert n_tokens == 0, rec["id"]


# ---- packed sources -------------------------------------------------------------------------
def test_manifest_lists_every_artifact_with_sha256_and_size(sources):
    manifest = json.loads(sources["manifest"].read_text())
    assert set(manifest["artifacts"]) == {a.name for a in ARTIFACTS}
    for name, entry in manifest["artifacts"].items():
        data = sources[name].read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest(), name


@pytest.mark.parametrize("name", [a.name for a in ARTIFACTS if a.top_level])
def test_archives_hold_the_real_top_level_entries(sources, name):
    assert top_level(sources[name]) == set(ARTIFACTS_BY_NAME[name].top_level)


def test_same_seed_same_bytes_other_seed_other_bytes(sources, tmp_path):
    again = build_demo_sources(tmp_path / "again", seed=0, scale=SCALE)
    other = build_demo_sources(tmp_path / "other", seed=1, scale=SCALE)
    m0 = json.loads(sources["manifest"].read_text())["artifacts"]
    m1 = json.loads(again["manifest"].read_text())["artifacts"]
    m2 = json.loads(other["manifest"].read_text())["artifacts"]
    assert {k: v["sha256"] for k, v in m0.items()} == {k: v["sha256"] for k, v in m1.items()}
    assert m0["q_instruct_images"]["sha256"] != m2["q_instruct_images"]["sha256"]
    assert m0["icm_instruct_train"]["sha256"] != m2["icm_instruct_train"]["sha256"]


def test_rebuild_is_reused_and_repairs_a_damaged_file(tmp_path):
    paths = build_demo_sources(tmp_path, seed=3, scale=0.02)
    mtime = paths["q_instruct_labels"].stat().st_mtime_ns
    assert build_demo_sources(tmp_path, seed=3, scale=0.02) == paths
    assert paths["q_instruct_labels"].stat().st_mtime_ns == mtime  # reused, not rewritten
    good = paths["qbench_dev_json"].read_bytes()
    paths["qbench_dev_json"].write_bytes(b"[]")
    build_demo_sources(tmp_path, seed=3, scale=0.02)
    assert paths["qbench_dev_json"].read_bytes() == good


def test_bad_scale_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        build_demo_sources(tmp_path, scale=0)


# ---- ICM-Instruct ---------------------------------------------------------------------------
def test_icm_instruct_layout_and_record_kinds(sources):
    files = archive_files(sources["icm_instruct_train"])
    records = json.loads(files["icm_llava_train.json"])
    pattern = re.compile(r"^identity_(.+?)_(mc_pair\d+|pair\d+|description[1-5])$")
    kinds = set()
    for rec in records:
        assert_llava_record(rec)
        assert len(rec["conversations"]) == 2  # one round per record
        m = pattern.match(rec["id"])
        assert m, rec["id"]
        kinds.add(re.sub(r"\d+$", "", m.group(2)))
        path = PurePosixPath(rec["image"])
        assert path.parent == PurePosixPath("sexy_check_all") and m.group(1) == path.stem
        assert rec["image"] in files
        human = rec["conversations"][0]["value"]
        assert human.endswith("\n<image>") and human.count("<image>") == 1
        if m.group(2).startswith("mc_pair"):
            assert "\nA. " in human and re.fullmatch(r"[A-E]\.", rec["conversations"][1]["value"])
    assert kinds == {"pair", "mc_pair", "description"}
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))


def test_icm_extensions_keep_their_case_and_content_matches(sources):
    files = archive_files(sources["icm_instruct_train"])
    images = {n: d for n, d in files.items() if n.startswith("sexy_check_all/")}
    exts = {PurePosixPath(n).suffix for n in images}
    assert {".JPEG", ".jpg", ".png", ".JPG", ".PNG", ".jpeg", ".GIF"} <= exts
    expected = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF"}
    for name, data in images.items():
        assert sniff_format(data) == expected[PurePosixPath(name).suffix.lower()], name


def test_icm_decisive_question_is_fixed_and_balanced(sources):
    records = load_json_member(sources["icm_instruct_train"], "icm_llava_train.json")
    decisive = [r for r in records if re.search(r"_(?<!mc_)pair0$", r["id"])]
    assert {r["conversations"][0]["value"] for r in decisive} == {T.MODERATION_QUESTION + "\n<image>"}
    answers = [r["conversations"][1]["value"] for r in decisive]
    assert set(answers) == {"Yes.", "No."} and abs(answers.count("Yes.") - answers.count("No.")) <= 1
    for r in decisive:  # the answer follows the category in the file name
        category = next(c for c in MODERATION_CATEGORIES if PurePosixPath(r["image"]).stem.startswith(c))
        assert (r["conversations"][1]["value"] == "Yes.") == (category_position(category) is not None)


# ---- Q-Instruct -----------------------------------------------------------------------------
def test_q_instruct_layout_and_fixed_multiple_choice(sources):
    records = json.loads(sources["q_instruct_labels"].read_text())
    images = archive_files(sources["q_instruct_images"])
    mc_text = T.mc_prompt(T.DISTORTION_QUESTION, T.DISTORTION_OPTIONS)
    letters = []
    for rec in records:
        assert_llava_record(rec)
        assert rec["image"].split("/")[0] in {"spaq_koniq", "livefb_liveitw_aigc"} and rec["image"] in images
        human = rec["conversations"][0]["value"]
        if human.replace("<image>", "").strip() == mc_text:
            letters.append(rec["conversations"][1]["value"])
    assert sorted(set(letters)) == ["A", "B", "C", "D", "E"]
    assert any(len(r["conversations"]) > 2 for r in records)
    assert any(r["conversations"][0]["value"].startswith("<image>\n") for r in records)


def _luma(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def test_low_level_pixels_carry_the_labels(sources):
    """Exposure classes differ in brightness, blur removes gradients, the symbol adds red."""
    records = json.loads(sources["q_instruct_labels"].read_text())
    images = archive_files(sources["q_instruct_images"])
    mc_text = T.mc_prompt(T.DISTORTION_QUESTION, T.DISTORTION_OPTIONS)
    by_class: dict[str, list[np.ndarray]] = {d: [] for d in DISTORTIONS}
    for rec in records:
        if rec["conversations"][0]["value"].replace("<image>", "").strip() == mc_text:
            d = DISTORTIONS["ABCDE".index(rec["conversations"][1]["value"])]
            by_class[d].append(_luma(images[rec["image"]]))
    for arrays in by_class.values():
        assert arrays and all(a.shape == (LOW_LEVEL_SIDE, LOW_LEVEL_SIDE, 3) for a in arrays)
    mean = {d: np.mean([a.mean() for a in v]) for d, v in by_class.items()}
    assert mean["overexposure"] > mean["none"] > mean["underexposure"]
    sharp = {d: np.mean([np.abs(np.diff(a, axis=1)).mean() for a in v]) for d, v in by_class.items()}
    assert sharp["blur"] < 0.6 * sharp["none"] and sharp["noise"] > sharp["none"]

    files = archive_files(sources["icm_instruct_train"])

    def red_pixels(data: bytes) -> int:
        a = _luma(data)
        return int(((a[..., 0] > 190) & (a[..., 1] < 70) & (a[..., 2] < 70)).sum())

    symbol = [red_pixels(d) for n, d in files.items() if "_symbol_" in n]
    normal = [red_pixels(d) for n, d in files.items() if "whole_normal_" in n]
    assert np.median(symbol) >= 10 and np.median(normal) <= 2


# ---- llava_v1_5_mix665k ---------------------------------------------------------------------
HIGH_LEVEL_ARCHIVES = {  # json folder prefix → (artifact, member prefix)
    "coco/train2017/": ("coco_train2017", "train2017/"),
    "gqa/images/": ("gqa_images", "images/"),
    "ocr_vqa/images/": ("ocr_vqa_images", "images/"),
    "textvqa/train_images/": ("textvqa_train_val_images", "train_images/"),
    "vg/VG_100K/": ("vg_images", "VG_100K/"),
    "vg/VG_100K_2/": ("vg_images2", "VG_100K_2/"),
}


def test_mix665k_layout_and_images(sources):
    records = json.loads(sources["llava_mix665k"].read_text())
    archives = {name: archive_files(sources[name]) for name, _ in HIGH_LEVEL_ARCHIVES.values()}
    seen = set()
    for rec in records:
        assert_llava_record(rec)
        if "image" not in rec:
            continue
        prefix = next(p for p in HIGH_LEVEL_ARCHIVES if rec["image"].startswith(p))
        name, member = HIGH_LEVEL_ARCHIVES[prefix]
        assert member + rec["image"][len(prefix) :] in archives[name], rec["image"]
        assert rec["image"].endswith(".jpg")
        seen.add(prefix)
    assert seen == set(HIGH_LEVEL_ARCHIVES)
    assert any("image" not in r for r in records) and any(len(r["conversations"]) > 2 for r in records)
    coco_ids = [r["id"] for r in records if r.get("image", "").startswith("coco/")]
    assert len(coco_ids) > len(set(coco_ids))  # LLaVA-Instruct and VQAv2 share COCO ids, as upstream


def test_ocr_vqa_zip_hides_other_formats_behind_jpg_names(sources):
    files = archive_files(sources["ocr_vqa_images"])
    assert all(n.endswith(".jpg") for n in files)
    formats = {sniff_format(d) for d in files.values()}
    assert {"JPEG", "GIF", "PNG"} <= formats
    for data in files.values():
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()


# ---- held-out evaluation sets ---------------------------------------------------------------
def test_qbench_fields_and_fixed_texts(sources):
    items = json.loads(sources["qbench_dev_json"].read_text())
    images = archive_files(sources["qbench_images"])
    texts_by_type: dict[int, set] = {}
    answers_by_type: dict[int, set] = {}
    for it in items:
        assert set(it) == {"img_path", "question", "candidates", "correct_ans", "type", "concern"}
        assert it["correct_ans"] in it["candidates"] and it["type"] in (0, 1, 2) and it["concern"] in (0, 1)
        assert f"images_llvisionqa/{it['img_path']}" in images
        texts_by_type.setdefault(it["type"], set()).add((it["question"], tuple(it["candidates"])))
        answers_by_type.setdefault(it["type"], set()).add(it["correct_ans"])
    assert texts_by_type[1] == {(T.DISTORTION_QUESTION, T.DISTORTION_OPTIONS)}
    assert texts_by_type[2] == {(T.BRIGHTNESS_QUESTION, T.BRIGHTNESS_OPTIONS)}
    assert {q for q, _ in texts_by_type[0]} <= set(T.YES_NO_QUESTIONS.values())
    assert answers_by_type[0] == {"Yes", "No"} and len(answers_by_type[1]) >= 3


def test_held_out_images_differ_from_training(sources):
    train = set(hashlib.sha256(d).hexdigest() for d in archive_files(sources["q_instruct_images"]).values())
    test = set(hashlib.sha256(d).hexdigest() for d in archive_files(sources["qbench_images"]).values())
    assert not train & test


def test_icm_val_imagefolder_and_questions(sources):
    files = archive_files(sources["icm_val"])
    questions = json.loads(files["icm_val_questions.json"])
    yes_no = [q for q in questions if q["kind"] == "yes_no"]
    assert {q["question"] for q in yes_no} == {T.MODERATION_QUESTION}
    assert {q["answer"] for q in yes_no} == {"Yes", "No"}
    for q in questions:
        parts = PurePosixPath(q["image"]).parts
        assert parts[0] in ("val", "val_MEQ") and parts[1] == q["category"] and q["image"] in files
        if q["kind"] == "yes_no":
            assert (q["answer"] == "Yes") == (category_position(q["category"]) is not None)
    assert any(q["kind"] == "explanation" for q in questions)


# ---- unpacked tree ----------------------------------------------------------------------------
def test_tree_holds_the_same_records_and_pixels_as_the_sources(tree, sources):
    assert tree["cleaned_labels.json"].read_bytes() == sources["q_instruct_labels"].read_bytes()
    assert tree["llava_v1_5_mix665k.json"].read_bytes() == sources["llava_mix665k"].read_bytes()
    icm = archive_files(sources["icm_instruct_train"])
    assert tree["icm_llava_train.json"].read_bytes() == icm["icm_llava_train.json"]
    root = tree["cleaned_labels.json"].parent
    for name, data in list(icm.items())[:50]:
        assert (root / name).read_bytes() == data
    for name in archive_files(sources["ocr_vqa_images"]):  # converted to real JPEGs in the tree
        assert sniff_format((tree["ocr_vqa/images"] / PurePosixPath(name).name).read_bytes()) == "JPEG"
    qb = json.loads(tree["eval/qbench/llvisionqa_dev.json"].read_text())
    assert all((tree["eval/qbench/images_llvisionqa"] / it["img_path"]).is_file() for it in qb)
    for q in json.loads(tree["eval/icm/icm_val_questions.json"].read_text()):
        assert (tree["eval/icm/icm_val_questions.json"].parent / q["image"]).is_file()


def test_tree_never_overwrites_foreign_data(tmp_path):
    (tmp_path / "coco").mkdir()
    with pytest.raises(FileExistsError, match="coco"):
        build_demo_tree(tmp_path, scale=0.02)


def test_image_spec_rejects_unknown_values():
    with pytest.raises(ValueError, match="distortion"):
        ImageSpec(seed=0, distortion="jpeg")
    with pytest.raises(ValueError, match="symbol"):
        ImageSpec(seed=0, symbol="left")


# ---- tokenizer --------------------------------------------------------------------------------
def test_tokenizer_variants_and_single_token_answers():
    from icmlab.demo.tokenizer import SINGLE_TOKEN_ANSWERS, demo_tokenizer

    llava = demo_tokenizer()
    assert 700 <= len(llava) <= 800  # 768 trained (256 of them the byte alphabet) + <pad>, <image>
    for answer in SINGLE_TOKEN_ANSWERS:
        assert len(llava(answer, add_special_tokens=False).input_ids) == 1, answer
    assert llava("hi").input_ids[0] == llava.bos_token_id == 1 and llava.eos_token_id == 2
    assert llava.image_token == "<image>" and llava.convert_tokens_to_ids("<image>") == len(llava) - 2
    ids = llava("USER: <image>\nIs this image blurry? ASSISTANT:", add_special_tokens=False).input_ids
    assert ids.count(llava.convert_tokens_to_ids("<image>")) == 1
    vicuna = demo_tokenizer(image_token=None, pad_token=None)
    assert "<image>" not in vicuna.get_vocab() and len(vicuna) == len(llava) - 2
    assert vicuna.get_vocab() == {k: v for k, v in llava.get_vocab().items() if k not in ("<image>", "<pad>")}
    owl = demo_tokenizer(image_token="<|image|>", pad_token=None)
    owl_id = owl.convert_tokens_to_ids("<|image|>")
    assert owl.image_token == "<|image|>" and owl("<|image|>", add_special_tokens=False).input_ids == [owl_id]
    assert owl("a <|image|>b", add_special_tokens=False).input_ids.count(owl_id) == 1


# ---- checkpoints ------------------------------------------------------------------------------
def test_llava_hf_checkpoint_loads_with_plain_transformers(ckpts):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(ckpts["llava_hf"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    processor = AutoProcessor.from_pretrained(ckpts["llava_hf"])
    assert type(processor).__name__ == "LlavaProcessor"
    image = Image.new("RGB", (80, 60), (200, 30, 30))
    enc = processor(images=image, text="USER: <image>\nIs this image blurry? ASSISTANT: No.", return_tensors="pt")
    image_id = model.config.image_token_index
    assert int((enc["input_ids"] == image_id).sum()) == 64
    assert tuple(enc["pixel_values"].shape) == (1, 3, 64, 64)
    with torch.no_grad():
        out = model(**enc, labels=enc["input_ids"])
    assert torch.isfinite(out.loss) and out.logits.shape[-1] % 64 == 0
    assert model.config.text_config.initializer_range == model.config.vision_config.initializer_range == 0.1


def test_msft_parts_have_the_real_layouts(ckpts):
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM

    vicuna, info = LlamaForCausalLM.from_pretrained(ckpts["vicuna"], output_loading_info=True)
    assert not info["missing_keys"] and (ckpts["vicuna"] / "model.safetensors.index.json").is_file()
    tok = AutoTokenizer.from_pretrained(ckpts["vicuna"])
    assert "<image>" not in tok.get_vocab() and vicuna.config.vocab_size == len(tok)
    vision, info = CLIPVisionModel.from_pretrained(ckpts["clip"], output_loading_info=True)
    assert not info["missing_keys"]
    assert CLIPImageProcessor.from_pretrained(ckpts["clip"]).crop_size["height"] == 64
    state = torch.load(ckpts["mm_projector"], map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "model.mm_projector.0.weight": (64, 32),
        "model.mm_projector.0.bias": (64,),
        "model.mm_projector.2.weight": (64, 64),
        "model.mm_projector.2.bias": (64,),
    }
    from safetensors.torch import load_file

    llava = load_file(ckpts["llava_hf"] / "model.safetensors")
    # Hub key layout (llava-hf/llava-1.5-7b-hf), and CLIP stays frozen in LLaVA: same vision weights.
    assert {k.split(".")[0] for k in llava} == {"vision_tower", "multi_modal_projector", "language_model"}
    assert all(k.startswith("vision_tower.vision_model.") for k in llava if k.startswith("vision_tower."))
    assert torch.equal(
        llava["vision_tower.vision_model.embeddings.patch_embedding.weight"], vision.embeddings.patch_embedding.weight
    )


def test_checkpoints_are_deterministic_and_take_folder_builders(ckpts, tmp_path, monkeypatch):
    from icmlab.demo import checkpoints as C

    def extra(dest: Path, seed: int) -> Path:
        dest.mkdir(parents=True)
        (dest / "weights.txt").write_text(f"seed={seed}")
        return dest

    monkeypatch.setitem(C.FOLDER_BUILDERS, "tiny_extra", extra)
    again = C.build_tiny_checkpoints(tmp_path, seed=0)
    assert (again["tiny_extra"] / "weights.txt").read_text() == "seed=0"
    for name in ("llava_hf", "vicuna", "clip"):
        for f in sorted(p for p in ckpts[name].iterdir() if p.suffix == ".safetensors"):
            assert f.read_bytes() == (again[name] / f.name).read_bytes(), f
    assert ckpts["mm_projector"].read_bytes() == again["mm_projector"].read_bytes()
    manifest = json.loads((tmp_path / C.MANIFEST_NAME).read_text())
    assert "tiny_extra" in manifest["builders"] and MANIFEST_NAME != C.MANIFEST_NAME
