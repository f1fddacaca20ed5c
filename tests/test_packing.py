"""Multimodal sequence packing (``train.packing``): layout unit tests and equivalence proofs on tiny models.

The proofs run a micro-batch of the tiny LLaVA (and mPLUG-Owl2) both ways, padded and packed, in
float32 on CPU: the loss, the gradients and every sample's logits must agree. Each proof carries
a control that breaks the packing (position ids not restarting, so attention crosses samples) and
must then disagree, so the comparison is known to be sensitive.
"""

from __future__ import annotations

import dataclasses

import pytest
import tiny_train_setup as T
import torch
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from icmlab import paths
from icmlab.inputs.encode import IGNORE_INDEX
from icmlab.io import read_jsonl
from icmlab.models import get_family
from icmlab.train.dataset import SupervisedDataset, TrainingCollator
from icmlab.train.packing import pack_samples, padding_fraction, plan_rows

torch.set_num_threads(1)

PAD = 3
IMG = 99


def _sample(n: int, tag: int, image: bool = False, image_tokens: int = 4) -> dict:
    """A fake encoded sample of ``n`` tokens: BOS, ``tag`` ids, optionally an image run; every label trained."""
    ids = [1] + [tag] * (n - 1)
    if image:
        assert n >= image_tokens + 3, "an image sample needs its tag before and after the run"
        ids = [1, tag] + [IMG] * image_tokens + [tag] * (n - 2 - image_tokens)
    pixels = torch.full((3, 2, 2), float(tag)) if image else None
    return {"input_ids": ids, "labels": list(ids), "pixel_values": pixels, "id": f"s{tag}"}


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    seg = find_packed_sequence_indices(position_ids)
    return torch.zeros_like(position_ids) if seg is None else seg


# ------------------------------------------------------------------ layout (no model)
def test_plan_rows_is_first_fit_decreasing():
    assert plan_rows([7, 5, 4, 3, 1], 10) == [[0, 3], [1, 2, 4]]
    # in-order first fit would need 4 rows ([3,3,3] [7] [7] [7]); decreasing order pairs 7 with 3
    assert plan_rows([3, 3, 3, 7, 7, 7], 10) == [[3, 0], [4, 1], [5, 2]]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 50, (40,), generator=g).tolist()
    rows = plan_rows(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(40))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) >= -(-sum(lengths) // 64)
    assert len(rows) <= len(plan_rows(lengths[::-1], 64)) + 1  # order-independent up to ties


def test_positions_restart_and_padding_is_a_separate_segment():
    samples = [_sample(6, 10), _sample(3, 11), _sample(4, 12), _sample(2, 13)]
    batch = pack_samples(samples, pad_token_id=PAD, max_length=8)
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
    # FFD: rows [6, 2] and [4, 3 + 1 pad]; each sample and the pad restart at 0
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 0, 1, 2, 0]]
    padded = pack_samples(samples[:3], pad_token_id=PAD, max_length=9)  # [6, 3] and [4 + 5 pads]
    pos, ids = padded["position_ids"], padded["input_ids"]
    assert pos[1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4] and ids[1, 4:].tolist() == [PAD] * 5
    assert (padded["labels"][1, 4:] == IGNORE_INDEX).all()
    # transformers' own segment finder: one segment per sample, and the padding on its own
    seg = _segments(pos)
    assert seg[0].tolist() == [0] * 6 + [1] * 3
    assert seg[1].tolist() == [0] * 4 + [1] * 5
    # with causal + same-segment masking no real token can see a pad: pads come after and differ in segment
    real = ids[1] != PAD
    assert not (seg[1][real].unsqueeze(1) == seg[1][~real].unsqueeze(0)).any()


def test_label_boundary_masks_the_first_label_of_every_sample():
    samples = [_sample(5, 10), _sample(4, 11), _sample(3, 12)]
    batch = pack_samples(samples, pad_token_id=PAD, max_length=12)
    assert batch["input_ids"].shape == (1, 12)
    labels, ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
    starts = [0, 5, 9]
    for s, n in zip(starts, (5, 4, 3)):
        assert labels[s] == IGNORE_INDEX  # nothing predicts across the boundary into this sample
        assert labels[s + 1 : s + n] == ids[s + 1 : s + n]  # the rest is trained exactly as before


def test_pixel_values_follow_the_placeholder_runs():
    # FFD reorders: rows [text 12], [img 9, img 7], [img 8] -> images 13, 12, 10
    samples = [_sample(8, 10, image=True), _sample(12, 11), _sample(7, 12, image=True), _sample(9, 13, image=True)]
    batch = pack_samples(samples, pad_token_id=PAD, max_length=16)
    flat_ids = batch["input_ids"].reshape(-1)
    runs = [k for k in range(len(flat_ids)) if flat_ids[k] == IMG and (k == 0 or flat_ids[k - 1] != IMG)]
    owner_tags = [int(flat_ids[k - 1]) for k in runs]  # the sample's own tag id precedes its image run
    assert len(runs) == 3 and batch["pixel_values"].shape == (3, 3, 2, 2)
    assert [int(p[0, 0, 0]) for p in batch["pixel_values"]] == owner_tags
    assert owner_tags != [10, 12, 13]  # the packing really changed the order (else this proves nothing)


def test_sample_longer_than_max_length_gets_its_own_row():
    samples = [_sample(12, 10), _sample(3, 11), _sample(4, 12)]
    batch = pack_samples(samples, pad_token_id=PAD, max_length=8)
    assert batch["input_ids"].shape == (2, 12)
    assert batch["input_ids"][0].tolist() == samples[0]["input_ids"]
    assert batch["position_ids"][0].tolist() == list(range(12))
    assert batch["input_ids"][1, :7].tolist() == samples[2]["input_ids"] + samples[1]["input_ids"]


def test_text_only_and_mixed_batches():
    text = pack_samples([_sample(4, 10), _sample(5, 11)], pad_token_id=PAD, max_length=16)
    assert "pixel_values" not in text and text["input_ids"].shape == (1, 9)
    mixed = pack_samples([_sample(4, 10), _sample(8, 11, image=True)], pad_token_id=PAD, max_length=16)
    assert mixed["pixel_values"].shape == (1, 3, 2, 2) and int(mixed["pixel_values"][0, 0, 0, 0]) == 11


def test_flatten_gives_one_unpadded_varlen_row():
    samples = [_sample(6, 10), _sample(3, 11), _sample(4, 12), _sample(5, 13)]
    batch = pack_samples(samples, pad_token_id=PAD, max_length=8, flatten=True)
    assert batch["input_ids"].shape == (1, 18) and not (batch["input_ids"] == PAD).any()
    # what transformers' flash-attention path derives from the position ids: one segment per sample
    assert bool(_is_packed_sequence(batch["position_ids"], 1))
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    lengths = [len(samples[i]["input_ids"]) for row in plan_rows([6, 3, 4, 5], 8) for i in row]
    assert cu_q.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()] and int(max_q) == 6


def test_collator_switches_and_errors():
    samples = [_sample(4, 10), _sample(5, 11)]
    plain = TrainingCollator(PAD)(samples)
    assert "attention_mask" in plain and "position_ids" not in plain and plain["use_cache"] is False
    packed = TrainingCollator(PAD, packing=True, max_length=16)(samples)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, 9)
    with pytest.raises(ValueError, match="data.model_max_length"):
        TrainingCollator(PAD, packing=True)
    with pytest.raises(ValueError, match="empty"):
        pack_samples([], pad_token_id=PAD, max_length=8)
    with pytest.raises(ValueError, match="sample 1"):
        pack_samples([_sample(3, 10), {"input_ids": [1, 2], "labels": [1]}], pad_token_id=PAD, max_length=8)
    with pytest.raises(ValueError, match="model_max_length"):
        plan_rows([3], 0)
    assert padding_fraction([6, 2]) == pytest.approx(1 - 8 / 12)


# ------------------------------------------------------------------ equivalence on the tiny models
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("packing")
    return {
        "dir": d,
        "hf": T.build_llava_hf(d / "base"),
        "owl": T.build_mplug_owl2(d / "owl"),
        "records": T.build_records(d / "data", n_image=10, n_text=4),
    }


def _bundle_and_samples(tiny: dict, family: str = "llava15", attn: str = "sdpa", n: int = 8):
    base = tiny["hf"] if family == "llava15" else tiny["owl"]
    cfg = T.make_config(tiny["dir"], base, family=family)
    cfg = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, attn_implementation=attn))
    bundle = get_family(family).load_for_training(cfg)
    records = tiny["records"] if family == "llava15" else T.to_mplug_dialect(tiny["records"])
    ds = SupervisedDataset.from_bundle(records, bundle, cfg)
    samples = [ds[i] for i in range(n)]
    assert any(s["pixel_values"] is None for s in samples) and any(s["pixel_values"] is not None for s in samples)
    return bundle, samples


def _grads(model: torch.nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(tiny, attn):
    bundle, samples = _bundle_and_samples(tiny, attn=attn)
    model = bundle.model.train()
    pad = bundle.tokenizer.pad_token_id
    packed = TrainingCollator(pad, packing=True, max_length=300)(samples)
    assert packed["input_ids"].shape[0] < len(samples)  # several samples really share rows
    loss_u, grads_u = _grads(model, TrainingCollator(pad)(samples))
    loss_p, grads_p = _grads(model, packed)
    assert abs(loss_p - loss_u) < 1e-5
    assert grads_u.keys() == grads_p.keys() and any("multi_modal_projector" in k for k in grads_u)
    for name, g in grads_u.items():
        torch.testing.assert_close(grads_p[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # control: position ids that do not restart let attention cross samples, and the loss moves
    crossed = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    with torch.no_grad():
        assert abs(model(**crossed).loss.item() - loss_u) > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_sample_run_alone(tiny, attn):
    bundle, samples = _bundle_and_samples(tiny, attn=attn)
    model = bundle.model.eval()
    pad = bundle.tokenizer.pad_token_id
    packed = TrainingCollator(pad, packing=True, max_length=300)(samples)
    rows = plan_rows([len(s["input_ids"]) for s in samples], 300)
    with torch.no_grad():
        logits = model(**packed).logits
        for r, row in enumerate(rows):
            offset = 0
            for i in row:
                alone = model(**TrainingCollator(pad)([samples[i]])).logits[0]
                n = alone.shape[0]
                torch.testing.assert_close(
                    logits[r, offset : offset + n],
                    alone,
                    rtol=1e-5,
                    atol=1e-5,
                    msg=f"sample {i} (row {r}, offset {offset})",
                )
                offset += n


def test_mplug_owl2_packed_loss_equals_unpacked(tiny):
    bundle, samples = _bundle_and_samples(tiny, family="mplug_owl2")
    model = bundle.model.train()
    pad = bundle.tokenizer.pad_token_id
    packed = TrainingCollator(pad, packing=True, max_length=300)(samples)
    assert packed["input_ids"].shape[0] < len(samples)
    loss_u, grads_u = _grads(model, TrainingCollator(pad)(samples))
    loss_p, grads_p = _grads(model, packed)
    assert abs(loss_p - loss_u) < 1e-5
    for name, g in grads_u.items():
        torch.testing.assert_close(grads_p[name], g, rtol=1e-4, atol=1e-6, msg=name)
    crossed = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    with torch.no_grad():
        assert abs(model(**crossed).loss.item() - loss_u) > 1e-3


# ------------------------------------------------------------------ through the train stage
def test_train_run_with_packing_matches_unpacked_run(tiny, tmp_path, monkeypatch):
    """``icmlab.train.stage.run`` with packing: batches really packed, same losses as the padded run, model written."""
    import icmlab.train.dataset
    from icmlab.train.stage import run

    seen = []
    real_pack = icmlab.train.dataset.pack_samples

    def spy(samples, **kwargs):
        batch = real_pack(samples, **kwargs)
        seen.append((len(samples), tuple(batch["input_ids"].shape), kwargs))
        return batch

    monkeypatch.setattr(icmlab.train.dataset, "pack_samples", spy)
    tmp_path.joinpath("data").symlink_to(tiny["dir"] / "data")
    losses = {}
    for packing in (False, True):
        cfg = T.make_config(tmp_path, tiny["hf"], run_name=f"packing-{packing}", max_steps=2, packing=packing)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, model_max_length=512))
        T.write_training_json(cfg, tiny["records"])
        result = run(cfg)
        assert result.global_step == 2 and (result.model_dir / "model.safetensors").is_file()
        losses[packing] = [r["loss"] for r in read_jsonl(paths.metrics_jsonl(cfg))]
    assert seen and all(shape[0] < n for n, shape, _ in seen)  # 4 samples per micro-batch, fewer rows
    assert all(kw["max_length"] == 512 and kw["flatten"] is False for *_, kw in seen)
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-6, abs=1e-6)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_train_stage_flattens_rows_only_for_flash_attention(tmp_path):
    from types import SimpleNamespace

    from icmlab.train.build import build_collator as _build_collator

    cfg = T.make_config(tmp_path, tmp_path / "model", packing=True)
    for attn, flatten in (("flash_attention_2", True), ("sdpa", False), ("eager", False)):
        bundle = SimpleNamespace(
            tokenizer=SimpleNamespace(pad_token_id=PAD), extra={"attn_implementation": attn}, model=None
        )
        collator = _build_collator(cfg, bundle)
        assert (collator.packing, collator.flatten, collator.max_length) == (True, flatten, 256)
    off = T.make_config(tmp_path, tmp_path / "model")
    assert _build_collator(off, bundle).packing is False


# ------------------------------------------------------------------ flash-attention 2 (GPU)
def _to(batch: dict, device: str, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


@pytest.mark.gpu
def test_flash_attention_packed_matches_unpacked(tiny):
    """bf16 + flash_attention_2: the flattened varlen row gives the padded loss and each sample's own logits."""
    pytest.importorskip("flash_attn")
    from transformers import LlavaForConditionalGeneration

    bundle, samples = _bundle_and_samples(tiny)  # CPU bundle: tokenizer/processor for the samples
    model = (
        LlavaForConditionalGeneration.from_pretrained(
            tiny["hf"], dtype=torch.bfloat16, attn_implementation="flash_attention_2"
        )
        .to("cuda")
        .eval()
    )
    pad = bundle.tokenizer.pad_token_id
    packed = TrainingCollator(pad, packing=True, max_length=300, flatten=True)(samples)
    assert packed["input_ids"].shape[0] == 1
    rows = plan_rows([len(s["input_ids"]) for s in samples], 300)
    with torch.no_grad():
        loss_u = model(**_to(TrainingCollator(pad)(samples), "cuda", torch.bfloat16)).loss.float().item()
        out = model(**_to(packed, "cuda", torch.bfloat16))
        assert out.loss.float().item() == pytest.approx(loss_u, rel=1e-2)
        offset = 0
        for i in (i for row in rows for i in row):
            alone = model(**_to(TrainingCollator(pad)([samples[i]]), "cuda", torch.bfloat16)).logits[0].float()
            n = alone.shape[0]
            # bf16 noise is ~1e-2; attention leaking across samples moves these logits by ~3 (fp32 CPU measurement)
            diff = (out.logits[0, offset : offset + n].float() - alone).abs().max().item()
            assert diff < 0.25, f"sample {i}: max |logit diff| {diff:.3f}"
            offset += n
