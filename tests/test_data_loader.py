"""bagel.data loader: pack budgets, the overflow buffer (nothing lost), rank and worker sharding (disjoint
and complete per epoch), determinism, save and restore mid-epoch (the next 10 packs identical, with
and without worker processes), CFG dropout rates, VAE encoding into pack_samples, the built-in example
data and the folder converter."""

import json
import os
import pickle
import random
from collections import Counter

import pytest
import torch
from data_helpers import (
    VAE_ARGS,
    VIT_ARGS,
    data_config,
    image_bytes,
    model_config,
    write_config,
    write_jsonl,
    write_parquet,
)

from bagel.data import (
    DataConfig,
    DroppedImage,
    Text,
    VaeImage,
    VitImage,
    build_loader,
    encode_vae_images,
    pack_samples,
    sample_num_tokens,
    tiny_tokenizer,
)
from bagel.data.convert import convert_edits, convert_folder, main
from bagel.data.example import write_example_dataset
from bagel.data.readers import SampleBuilder
from bagel.data.transforms import ImageTransform
from bagel.vae import FluxVAE, FluxVAEConfig


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def cfg(tok):
    return model_config(tok)


@pytest.fixture(scope="module")
def example(tmp_path_factory, cfg):
    return write_example_dataset(tmp_path_factory.mktemp("example"), cfg)


def example_config(path, **kw):
    base = dict(
        expected_num_tokens=300,
        max_num_tokens=384,
        max_num_tokens_per_sample=256,
        prefer_buffer_before=200,
        max_buffer_size=4,
        text_cond_dropout_prob=0.1,
        vit_cond_dropout_prob=0.3,
        vae_cond_dropout_prob=0.3,
    )
    base.update(kw)
    return data_config(path, **base)


def take(loader, n):
    out = []
    for raw in loader:
        out.append(raw)
        if len(out) == n:
            break
    return out


def same_packs(a, b):
    assert [p.sample_ids for p in a] == [p.sample_ids for p in b]
    for pa, pb in zip(a, b, strict=True):
        assert pa.num_tokens == pb.num_tokens and pa.worker_id == pb.worker_id
        for sa, sb in zip(pa.samples, pb.samples, strict=True):
            assert [type(s) for s in sa] == [type(s) for s in sb]
            for x, y in zip(sa, sb, strict=True):
                if isinstance(x, Text):
                    assert list(x.ids) == list(y.ids) and x.loss == y.loss
                elif isinstance(x, (VitImage, VaeImage)):
                    assert torch.equal(x.pixels, y.pixels)
                if isinstance(x, VaeImage):
                    assert x.noised == y.noised and x.timestep == y.timestep


# ---------------------------------------------------------------------------------------------- packing
def test_pack_budgets_and_nothing_lost(example, tok, cfg):
    dc = example_config(example)
    loader = build_loader(dc, cfg, tok)
    packs = take(loader, 40)
    for p, nxt in zip(packs, packs[1:], strict=False):
        assert p.num_tokens <= dc.max_num_tokens
        assert sum(sample_num_tokens(s, cfg) for s in p.samples) == p.num_tokens
        assert all(sample_num_tokens(s, cfg) <= dc.max_num_tokens_per_sample for s in p.samples)
        if p.num_tokens < dc.expected_num_tokens:
            # closed early only because the next sample did not fit: that sample opens the next pack
            assert p.num_tokens + sample_num_tokens(nxt.samples[0], cfg) > dc.max_num_tokens
    ids = [i for p in packs for i in p.sample_ids]
    assert len(ids) == len(set(ids))  # no sample twice
    # every group appears, and mandatory ones (t2i, vlm) open every pack
    groups = Counter(g for g, _, _ in ids)
    assert set(groups) == {0, 1, 2, 3}
    assert all({0, 2} <= {g for g, _, _ in p.sample_ids} for p in packs)
    # everything drawn from group 0's first epoch comes out, in time (the buffer drains)
    first = sorted(pos for g, e, pos in ids if g == 0 and e == 0)
    assert first == list(range(len(first)))


def test_long_samples_dropped_or_truncated_and_counted(tmp_path, tok, cfg):
    words = ["word " * 12] * 5 + ["word " * 200]  # one long text among short ones (one per pack)
    write_jsonl(str(tmp_path / "t.jsonl"), [{"text": w} for w in words])
    y = write_config(
        str(tmp_path),
        {"text_pretrain": {"dataset_names": ["t"]}},
        {"text_pretrain": {"t": {"jsonl_path": "t.jsonl"}}},
    )
    long_ids = len(tok.encode(words[-1], add_special_tokens=False))
    assert long_ids + 2 > 64
    kw = dict(expected_num_tokens=64, max_num_tokens=64, max_num_tokens_per_sample=64)
    loader = build_loader(data_config(y, **kw), cfg, tok)
    seen = [i for p in take(loader, 12) for i in p.sample_ids]
    assert all(p.num_tokens > 32 for p in take(build_loader(data_config(y, **kw), cfg, tok), 3))
    # 12 packs of one sample: epochs 0 and 1 (5 usable samples each) and 2 of epoch 2
    assert [e for _, e, _ in seen] == [0] * 5 + [1] * 5 + [2] * 2
    reader = loader.stream.packer(0).groups[0]
    assert all(reader.locate(e, p)[1] != 5 for _, e, p in seen)  # never line 5, the long one
    assert loader.skip_counts()["too_many_tokens"] in (2, 3)
    loader = build_loader(data_config(y, long_samples="truncate", **kw), cfg, tok)
    packs = take(loader, 12)
    long = [s for p in packs for s in p.samples if sample_num_tokens(s, cfg) == 64]
    assert long and all(list(s[0].ids) == tok.encode(words[-1], add_special_tokens=False)[:62] for s in long)
    assert loader.skip_counts()["truncated"] == len(long)


def test_buffer_holds_a_sample_that_does_not_fit(tmp_path, tok, cfg):
    # texts of 10 and 40 tokens; packs of at most 64: a 40 after a 40 waits in the buffer
    texts = [" ".join(["a"] * n) for n in (8, 38, 8, 38, 38, 8, 38, 8)]
    write_jsonl(str(tmp_path / "t.jsonl"), [{"text": t} for t in texts])
    y = write_config(
        str(tmp_path),
        {"text_pretrain": {"dataset_names": ["t"]}},
        {"text_pretrain": {"t": {"jsonl_path": "t.jsonl"}}},
    )
    dc = data_config(
        y,
        expected_num_tokens=60,
        max_num_tokens=64,
        max_num_tokens_per_sample=64,
        prefer_buffer_before=30,
        max_buffer_size=2,
    )
    packs = take(build_loader(dc, cfg, tok), 16)
    ids = [i for p in packs for i in p.sample_ids]
    assert all(p.num_tokens <= 64 for p in packs)
    for epoch in (0, 1):  # every sample of the first two epochs, exactly once
        assert sorted(pos for _, e, pos in ids if e == epoch) == list(range(8))


def test_large_mandatory_samples_never_overflow_and_the_carry_over_stays_bounded(tmp_path, tok, cfg):
    # three mandatory groups whose samples take 60% of a pack: upstream packs them all regardless of
    # max_num_tokens; here each waits for a pack of its own, and the waiting list stays short
    groups, info = {}, {}
    long = " ".join(["w"] * 17)  # 33 tokens (" w" is two) + bos/eos: > 64 / 2
    write_jsonl(str(tmp_path / "t.jsonl"), [{"text": long}] * 4)
    os.makedirs(tmp_path / "img")
    (tmp_path / "img" / "a.png").write_bytes(image_bytes(24, 24))
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": " ".join(["w"] * 20)}]
    write_jsonl(str(tmp_path / "v.jsonl"), [{"image": "a.png", "conversations": conv}] * 4)
    write_parquet(
        str(tmp_path / "t2i" / "a.parquet"),
        {"image": [image_bytes(64, 64)] * 4, "captions": [json.dumps({"a": " ".join(["w"] * 20)})] * 4},
    )
    groups = {
        "t2i_pretrain": {"dataset_names": ["t"], "image_transform_args": VAE_ARGS, "is_mandatory": True},
        "vlm_sft": {"dataset_names": ["v"], "image_transform_args": VIT_ARGS, "is_mandatory": True},
        "text_pretrain": {"dataset_names": ["x"], "is_mandatory": True},
    }
    info = {
        "t2i_pretrain": {"t": {"data_dir": "t2i"}},
        "vlm_sft": {"v": {"data_dir": "img", "jsonl_path": "v.jsonl"}},
        "text_pretrain": {"x": {"jsonl_path": "t.jsonl"}},
    }
    y = write_config(str(tmp_path), groups, info)
    dc = data_config(y, expected_num_tokens=60, max_num_tokens=64, max_num_tokens_per_sample=64)
    loader = build_loader(dc, cfg, tok)
    sizes = {
        g: sample_num_tokens(p.samples[i], cfg)
        for p in take(loader, 6)
        for i, (g, _, _) in enumerate(p.sample_ids)
    }
    assert len(sizes) == 3 and all(n > 32 for n in sizes.values())
    for p in take(loader, 30):
        assert p.num_tokens <= 64 and len(p.state["pending"]) <= 3 + 1  # mandatory groups + 1 carried


# ---------------------------------------------------------------------------------------------- sharding
def test_rank_and_worker_shards_are_disjoint_and_complete(tmp_path, tok, cfg):
    # 3 parquet files with row groups of 4 (37 rows) + one listed twice (num_used_data cycles files)
    for k, n in enumerate((13, 16, 8)):
        imgs = [image_bytes(16, 16, seed=i) for i in range(n)]
        write_parquet(
            str(tmp_path / "t2i" / f"{k}.parquet"), {"image": imgs, "captions": ['{"a": "b"}'] * n}, 4
        )
    group = {"dataset_names": ["t"], "image_transform_args": VAE_ARGS, "num_used_data": [4]}
    y = write_config(str(tmp_path), {"t2i_pretrain": group}, {"t2i_pretrain": {"t": {"data_dir": "t2i"}}})
    total = 13 + 16 + 8 + 13
    world, workers = 2, 3
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            stream = build_loader(
                data_config(y, num_workers=workers), cfg, tok, rank=rank, world_size=world
            ).stream
            for w in range(workers):
                reader = stream.packer(w).groups[0]
                assert abs(len(reader) - total / (world * workers)) < 1
                seen += [reader.locate(epoch, pos) for pos in range(reader.lo, reader.hi)]
        assert len(seen) == total and len(set(seen)) == total  # every record once
    orders = [
        [build_loader(data_config(y), cfg, tok).stream.packer(0).groups[0].locate(e, p) for p in range(total)]
        for e in (0, 1)
    ]
    assert orders[0] != orders[1]  # a new order each epoch
    with pytest.raises(ValueError, match="fewer than the 64 shards"):
        build_loader(data_config(y, num_workers=8), cfg, tok, rank=0, world_size=8)


def test_worker_processes_share_out_the_data(example, tok, cfg):
    dc = example_config(example, num_workers=2)
    packs = take(build_loader(dc, cfg, tok), 6)
    assert [p.worker_id for p in packs] == [0, 1] * 3  # round robin
    by_worker = [{i for p in packs if p.worker_id == w for i in p.sample_ids if i[1] == 0} for w in (0, 1)]
    assert by_worker[0] and by_worker[1] and not by_worker[0] & by_worker[1]


# ---------------------------------------------------------------------------------------------- determinism and resume
def test_deterministic_given_the_seed(example, tok, cfg):
    a = take(build_loader(example_config(example), cfg, tok), 5)
    b = take(build_loader(example_config(example), cfg, tok), 5)
    same_packs(a, b)
    c = take(build_loader(example_config(example, seed=1), cfg, tok), 5)
    assert [p.sample_ids for p in a] != [p.sample_ids for p in c]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_save_and_restore_mid_epoch_gives_the_same_next_10_packs(example, tok, cfg, num_workers):
    dc = example_config(example, num_workers=num_workers)
    whole = take(build_loader(dc, cfg, tok), 30)
    # stop where the last pack left samples waiting (buffer or carry-over), with an odd pack count
    # under workers, so that the restored loader must start at worker 1
    stop = next(
        i + 1
        for i, p in enumerate(whole)
        if i >= 2 and (p.state["buffer"] or p.state["pending"]) and (not num_workers or i % 2 == 0)
    )
    assert stop <= 20
    first = build_loader(dc, cfg, tok)
    head = take(first, stop)
    same_packs(head, whole[:stop])
    state = first.state_dict()
    if num_workers:
        assert state["next_worker"] == stop % num_workers == 1
    state = json.loads(json.dumps(pickle.loads(pickle.dumps(state))))  # survives pickle and JSON
    resumed = build_loader(dc, cfg, tok)
    resumed.load_state_dict(state)
    same_packs(take(resumed, 10), whole[stop : stop + 10])
    assert resumed.skip_counts() == first.skip_counts() or num_workers  # counters continue


def test_a_group_can_opt_out_of_resuming(tmp_path, tok, cfg):
    write_jsonl(str(tmp_path / "t.jsonl"), [{"text": f"line {i}"} for i in range(6)])
    group = {"dataset_names": ["t"], "resume_data_status": False}
    y = write_config(
        str(tmp_path), {"text_pretrain": group}, {"text_pretrain": {"t": {"jsonl_path": "t.jsonl"}}}
    )
    fresh = take(build_loader(data_config(y), cfg, tok), 3)
    loader = build_loader(data_config(y), cfg, tok)
    take(loader, 2)
    resumed = build_loader(data_config(y), cfg, tok)
    resumed.load_state_dict(loader.state_dict())
    assert [p.sample_ids for p in take(resumed, 3)] == [p.sample_ids for p in fresh]


def test_the_stream_pickles_for_spawned_workers(example, tok, cfg):
    loader = build_loader(example_config(example), cfg, tok)
    first = take(loader, 2)  # sources now hold an open JSONL file and a cached row group
    stream = pickle.loads(pickle.dumps(loader.stream))
    packer = stream.packer(0)
    assert [s.id for s in packer.next_pack()] == first[0].sample_ids


def test_restore_refuses_another_layout(example, tok, cfg):
    loader = build_loader(example_config(example), cfg, tok)
    take(loader, 2)
    state = loader.state_dict()
    other = build_loader(example_config(example, seed=3), cfg, tok)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        build_loader(example_config(example), cfg, tok, rank=1, world_size=2).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- CFG dropout
def test_cfg_dropout_rates(tok):
    from bagel.data.config import GroupSpec, ImageTransformArgs
    from bagel.data.transforms import open_image

    probs = dict(text_cond_dropout_prob=0.2, vit_cond_dropout_prob=0.5, vae_cond_dropout_prob=0.35)
    dc = DataConfig(**probs, min_image_side=1)
    vae_tr = ImageTransform(ImageTransformArgs(16, 16, 16))
    vit_tr = ImageTransform(ImageTransformArgs(4, 8, 4))
    img = image_bytes(16, 16)
    open_image(img, min_side=1, max_pixels=10**6)
    n = 1500
    t2i = SampleBuilder(GroupSpec("t2i_pretrain", (), ()), dc, tok, vae_tr, None)
    kept = sum(
        isinstance(t2i.build({"image": img, "captions": '{"a": "x"}'}, random.Random(i), None)[0], Text)
        for i in range(n)
    )
    edit = SampleBuilder(GroupSpec("unified_edit", (), ()), dc, tok, vae_tr, vit_tr)
    drops = Counter()
    for i in range(n):
        for s in edit.build({"image_list": [img, img], "instruction_list": [["x"]]}, random.Random(i), None):
            if isinstance(s, DroppedImage):
                drops[s.kind] += 1
            elif isinstance(s, Text):
                drops["text_kept"] += 1
    sigma = lambda p: 4 * (p * (1 - p) / n) ** 0.5  # noqa: E731 - 4 standard deviations
    assert abs(kept / n - 0.8) < sigma(0.2)
    assert abs(drops["text_kept"] / n - 0.8) < sigma(0.2)
    assert abs(drops["vit"] / n - 0.5) < sigma(0.5)
    assert abs(drops["vae"] / n - 0.35) < sigma(0.35)


# ---------------------------------------------------------------------------------------------- VAE and the model
def test_encode_vae_images_feeds_pack_samples(example, tok, cfg):
    # the FLUX architecture (8x down, 16 channels), made narrow and shallow for the CPU
    vae = FluxVAE(FluxVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)).initialize_weights(0)
    dc = example_config(example, expected_num_tokens=150)
    loader = build_loader(dc, cfg, tok)
    for raw in take(loader, 1):
        samples = encode_vae_images(raw.samples, vae, micro_batch_size=2, sample=False)
        pixels = [s.pixels for segs in raw.samples for s in segs if isinstance(s, VaeImage)]
        latents = [s.latent for segs in samples for s in segs if isinstance(s, VaeImage)]
        assert pixels and len(latents) == len(pixels)
        for px, lat in zip(pixels[:1], latents, strict=False):  # image by image, against the batched call
            assert lat.shape == (16, px.shape[1] // 8, px.shape[2] // 8)
            torch.testing.assert_close(lat, vae.encode(px[None], sample=False)[0], rtol=1e-5, atol=1e-5)
        batch = pack_samples(
            samples, cfg, max_num_tokens=dc.max_num_tokens, special_tokens=loader.special_tokens
        )
        assert batch["sequence_length"] == raw.num_tokens and sum(batch["sample_lens"]) == dc.max_num_tokens
        assert batch["padded_latent"].shape[1] == 16
    with pytest.raises(ValueError, match="encode it first"):
        pack_samples(raw.samples, cfg)


# ---------------------------------------------------------------------------------------------- example and converter
def test_example_dataset_uses_every_format_without_skips(example, tok, cfg):
    folder = os.path.dirname(example)
    for rel in (
        "t2i/part-00000.parquet",
        "editing/example_edit/part-00000.parquet",
        "vlm/example.jsonl",
        "text/example.jsonl",
    ):
        assert os.path.isfile(os.path.join(folder, rel))
    loader = build_loader(example_config(example), cfg, tok)
    kinds = Counter(type(s).__name__ for p in take(loader, 12) for segs in p.samples for s in segs)
    assert {"Text", "VitImage", "VaeImage"} <= set(kinds) and loader.skip_counts() == {}


def test_convert_folder_and_its_command(tmp_path, tok, cfg, capsys):
    src = tmp_path / "photos"
    os.makedirs(src / "sub")
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        (src / name).write_bytes(image_bytes(40, 24, fmt="JPEG" if name.endswith("jpg") else "PNG", seed=i))
    (src / "a.txt").write_text("a gradient\n")
    (src / "sub" / "c.txt").write_text("another gradient")
    res = convert_folder(
        src,
        tmp_path / "out",
        name="photos",
        rows_per_file=1,
        image_stride=16,
        max_image_size=64,
        min_image_size=16,
    )
    assert res.num_rows == 2 and res.num_without_caption == 1 and len(res.files) == 2
    loader = build_loader(data_config(res.yaml_path), cfg, tok)
    segs = next(iter(loader)).samples[0]
    assert (
        isinstance(segs[0], Text) and isinstance(segs[1], VaeImage) and segs[1].pixels.shape == (3, 32, 32)
    )  # 40x24: round(2.5), round(1.5) strides
    texts = {tok.decode(s.samples[0][0].ids) for s in take(loader, 4)}
    assert texts == {"a gradient", "another gradient"}
    # a JSONL source, through the command
    write_jsonl(str(tmp_path / "list.jsonl"), [{"image": "photos/b.jpg", "caption": "a jpeg"}])
    assert main([str(tmp_path / "list.jsonl"), str(tmp_path / "out2")]) == 0
    assert "wrote 1 rows" in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out3")]) == 1
    with pytest.raises(SystemExit) as e:
        main([str(src), str(tmp_path / "out4"), "--rows-per-file", "0"])
    assert e.value.code == 2


def test_convert_edits(tmp_path, tok, cfg):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(32, 32, seed=i))
    lines = [
        {"source": "0.png", "target": "1.png", "instruction": "make it blue"},
        {"images": ["0.png", "1.png", "2.png"], "instructions": [["turn it", "rotate it"], "shift it"]},
        {"source": "1.png", "target": "2.png", "instruction": ""},
    ]
    write_jsonl(str(tmp_path / "edits.jsonl"), lines)
    res = convert_edits(
        tmp_path / "edits.jsonl",
        tmp_path / "out",
        vit_patch_size=4,
        vit_max_image_size=16,
        vit_min_image_size=8,
    )
    assert res.num_rows == 2 and res.num_without_caption == 1
    import pyarrow.parquet as pq

    table = pq.read_table(res.files[0]).to_pylist()
    assert table[1]["instruction_list"] == [["turn it", "rotate it"], ["shift it"]]
    assert table[0]["image_list"][1] == (tmp_path / "1.png").read_bytes()
    loader = build_loader(data_config(res.yaml_path), cfg, tok)
    kinds = [type(s).__name__ for s in next(iter(loader)).samples[0]]
    assert kinds[:2] == ["VaeImage", "VitImage"] and kinds[-1] == "VaeImage"
    assert main(["--edit", str(tmp_path / "edits.jsonl"), str(tmp_path / "out2"), "--name", "e"]) == 0
    write_jsonl(str(tmp_path / "bad.jsonl"), [{"source": "0.png"}])
    with pytest.raises(ValueError, match="bad.jsonl:1: needs 'source' and 'target'"):
        convert_edits(tmp_path / "bad.jsonl", tmp_path / "out3")
