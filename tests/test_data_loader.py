"""The sampler is deterministic, shards across data-parallel ranks, and resumes exactly from a
three-integer state; worker processes give the same batches as the main process."""
import dataclasses

import pytest
import torch

from data_helpers import synth_dir, tiny_model
from neva.data import DataConfig, NevaDataset, ResumableSampler, SamplerState
from neva.data.loader import Loader, one_pass, padding_report


def test_sampler_shards_ranks_disjointly_and_covers_each_epoch():
    world, B, n = 3, 4, 50
    ss = [ResumableSampler(n, B, rank=r, world=world, seed=5) for r in range(world)]
    assert ss[0].steps_per_epoch == 4                       # 50 // 12; the tail of 2 waits for another epoch
    for epoch in range(2):
        seen = [i for step in range(4) for s in ss for i in s.batch(epoch, step)]
        assert len(seen) == len(set(seen)) == 48
    assert ss[0].batch(0, 0) != ss[0].batch(1, 0)            # a new order each epoch
    assert ResumableSampler(n, B, rank=1, world=3, seed=5).batch(1, 2) == ss[1].batch(1, 2)   # deterministic
    with pytest.raises(ValueError, match="cannot fill one global batch of 32 x 2 ranks"):
        ResumableSampler(50, 32, world=2)


def test_sampler_state_advances_over_epochs():
    s = ResumableSampler(10, 3, seed=1)                      # 3 steps an epoch
    st = s.advance(SamplerState(seed=1), 7)
    assert (st.epoch, st.step) == (2, 1)
    it = s.iterate(SamplerState(0, 0, 1))
    batches = [next(it) for _ in range(7)]
    assert next(s.iterate(st)) == next(it) and batches[3] == s.batch(1, 0)


@pytest.fixture(scope="module")
def ds():
    cfg = DataConfig(data_path=str(synth_dir() / "train.jsonl"), batch_size=4, num_workers=0, max_seq_len=160)
    return NevaDataset(cfg, tiny_model())


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_continues_with_exactly_the_next_batches(ds, packing):
    cfg = dataclasses.replace(ds.cfg, packing=packing, batch_size=2)
    ref = Loader(ds, cfg)
    it = iter(ref)
    run = [next(it) for _ in range(ref.steps_per_epoch + 3)]  # across an epoch boundary
    a = Loader(ds, cfg)
    it = iter(a)
    for _ in range(5):
        next(it)
    state = a.state_dict()
    assert state == {"epoch": 0, "step": 5, "seed": 0, "global_batch": 2}
    b = Loader(ds, cfg)                                       # a fresh process after a kill
    b.load_state_dict(state)
    resumed = [batch for _, batch in zip(range(len(run) - 5), b)]
    assert all(same(x, y) for x, y in zip(resumed, run[5:]))
    assert b.epoch == 1 and b.state_dict()["step"] == 3
    with pytest.raises(ValueError, match="data seed is 9 but data.seed=0"):
        b.load_state_dict({"epoch": 0, "step": 1, "seed": 9})


def test_worker_processes_give_the_main_process_batches(ds):
    cfg0 = dataclasses.replace(ds.cfg, num_workers=0)
    cfg2 = dataclasses.replace(ds.cfg, num_workers=2)
    b0 = [b for _, b in zip(range(4), Loader(ds, cfg0))]
    b2 = [b for _, b in zip(range(4), Loader(ds, cfg2))]
    assert all(same(x, y) for x, y in zip(b0, b2))


def test_batch_contract_and_data_parallel_ranks(ds):
    cfg = dataclasses.replace(ds.cfg, batch_size=3)
    b = [next(iter(Loader(ds, cfg, rank=r, world=2))) for r in range(2)]
    ids = [set(int(x) for x in bb["input_ids"][:, 1:].sum(1)) for bb in b]
    assert ids[0] != ids[1]
    for bb in b:
        assert bb["input_ids"].dtype == torch.int64 and bb["input_ids"].shape == bb["labels"].shape
        n_img = int((bb["input_ids"] == 32000).sum()) // 16
        assert bb["pixel_values"].shape == (n_img, 3, 32, 32)
        assert ((bb["attention_mask"] == 0) <= (bb["labels"] == -100)).all()   # padding is never trained
    full = [x for x in one_pass(ds, ds.cfg)]
    assert sum(x["input_ids"].shape[0] for x in full) == len(ds)


def test_padding_report(ds):
    r = padding_report(ds.lengths, dataclasses.replace(ds.cfg, max_seq_len=512))
    assert 0 <= r["packed"] < r["unpacked_fixed"] and r["unpacked_longest"] < r["unpacked_fixed"]


@pytest.mark.parametrize("packing", [False, True])
def test_each_sample_gets_its_own_images(ds, packing):
    """Read the answer to "How many shapes are there?" off the pixels that the batch puts with it."""
    cfg = dataclasses.replace(ds.cfg, packing=packing, batch_size=4, max_seq_len=256)
    tok, checked = ds.tok, 0
    it = iter(Loader(ds, cfg))
    for _ in range(6):
        b = next(it)
        k_img = 0
        seg = b["segment_ids"] if packing else b["attention_mask"]
        for r in range(b["input_ids"].shape[0]):
            for k in range(1, int(seg[r].max()) + 1):
                ids = b["input_ids"][r][seg[r] == k]
                n = int((ids == 32000).sum()) // 16
                pix, k_img = b["pixel_values"][k_img:k_img + n], k_img + n
                text = tok.decode(ids[ids != 32000])
                if "How many shapes are there? [/INST]" not in text:
                    continue
                answer = int(text.split("How many shapes are there? [/INST]")[1].lstrip()[0])
                x = pix[0] * 0.5 + 0.5                              # SigLIP normalisation undone
                quads = [x[:, y:y + 16, z:z + 16] for y in (0, 16) for z in (0, 16)]
                assert sum(int(((q - 24 / 255).abs().sum(0) > 0.3).sum() > 20) for q in quads) == answer
                checked += 1
        assert k_img == b["pixel_values"].shape[0]
    assert checked >= 5
