"""Hypothesis strategies shared by the sharding-equivalence tiers: a layout of 2-4 ranks (never one: a
run compared with itself proves nothing), then a small config and batch that the layout fits (heads,
kv heads, experts, vocab, mlp divisible; any sequence length); and the explicit cases where a
sharding bug hides, which both tiers always run (``EXPLICIT``). ``cases(cp=True)`` draws
context-parallel layouts (cp 2 or 4, with whatever else fits), a layout of the vision tower, and puts
the first image of a row across a boundary of the cp chunks."""
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from neva.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from neva.parallel.plan import Layout


@dataclass(frozen=True)
class Case:
    layout: Layout
    cfg: ModelConfig
    batch_seed: int
    rows_per_shard: int
    seq_len: int
    images_per_row: tuple           # pattern of one data shard (every shard repeats it)
    padded: bool
    packed: bool
    n_micro: int = 1                # micro-batches per data rank
    uneven: bool = True             # label counts differ per data shard (real processes only: a simulated
                                    # world needs equal shapes per rank, and the loss gathers label rows)
    image_start: int = 1            # where a row's first image starts (its k-th: + k * (tokens + 1))
    vision: str = "tp"              # the vision tower's layout (neva.parallel.plan.Plan.towers)

    def batch(self) -> dict:
        g = torch.Generator().manual_seed(self.batch_seed)
        cfg, lay = self.cfg, self.layout
        n_shards = lay.dp * lay.ep
        per = cfg.tokens_per_image
        B, T = n_shards * self.rows_per_shard, self.seq_len
        ids = torch.randint(0, cfg.llm.vocab_size - 1, (B, T), generator=g)
        labels = ids.clone()
        if self.uneven:  # shard k drops a larger share of its labels than shard k - 1
            rate = torch.linspace(0.1, 0.8, n_shards).repeat_interleave(self.rows_per_shard)
            labels[torch.rand(B, T, generator=g) < rate[:, None]] = -100
        else:            # the same mask on every data shard
            labels[(torch.rand(self.rows_per_shard, T, generator=g) < 0.3).repeat(n_shards, 1)] = -100
        labels[:, -2] = ids[:, -2]      # at least one trained token per row (never padded, never media)
        n_img = 0
        for b in range(B):
            k = self.images_per_row[b % self.rows_per_shard]
            for j in range(k):
                s = self.image_start + j * (per + 1)
                ids[b, s:s + per] = cfg.image_token_id
                labels[b, s:s + per] = -100
            n_img += k
        out = {"input_ids": ids, "labels": labels}
        if n_img:
            out["pixel_values"] = torch.randn(n_img, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
        if self.padded:  # right padding of a few tokens on the last row of each shard
            am = torch.ones(B, T, dtype=torch.long)
            am[self.rows_per_shard - 1::self.rows_per_shard, T - 1:] = 0
            out["attention_mask"] = am
            out["labels"] = out["labels"].masked_fill(am == 0, -100)
        if self.packed:  # two samples per row, positions restarting
            cut = T // 2 + 1
            if cut == T - 2:  # the row's one sure label would open segment 2, where nothing predicts it
                cut += 1
            seg = torch.ones(B, T, dtype=torch.long)
            seg[:, cut:] = 2
            pos = torch.cat([torch.arange(cut), torch.arange(T - cut)]).expand(B, T).clone()
            out.update(segment_ids=seg, position_ids=pos)
        return out


@st.composite
def cases(draw, max_world: int = 4, pp: bool = False, fill: bool = False, uneven: bool = True,
          cp: bool = False) -> Case:
    """``fill``: dp takes up the rest of ``max_world`` (a fixed-size process pool). ``uneven``: label
    counts differ per data shard (needs real processes). ``cp``: a context-parallel layout (cp >= 2)."""
    sizes = [(t, e, p, d, c) for t in (1, 2, 4) for e in (1, 2) for p in ((1, 2, 4) if pp else (1,))
             for d in (1, 2, 4) for c in ((2, 4) if cp else (1,))
             if 1 < t * e * p * d * c <= max_world and (not fill or t * e * p * d * c == max_world)]
    tp, ep, ppn, dp, cpn = draw(st.sampled_from(sizes))
    sp = tp > 1 and draw(st.booleans())
    layout = Layout(tp=tp, pp=ppn, ep=ep, dp=dp, sp=sp, cp=cpn)

    kv = tp * draw(st.integers(1, 2))
    heads = kv * draw(st.sampled_from([1, 2]))
    hd = draw(st.sampled_from([4, 8]))
    experts = ep * draw(st.integers(1, 3)) if (ep > 1 or draw(st.booleans())) else 0
    top_k = draw(st.integers(1, min(2, experts))) if experts else 2
    kind = "mixtral" if experts else draw(st.sampled_from(["llama", "mistral", "nemotron"]))
    n_layers = draw(st.integers(max(1, ppn), ppn + 2))
    vocab = tp * draw(st.integers(8, 20))
    llm = LLMConfig(kind=kind, vocab_size=vocab, dim=draw(st.sampled_from([16, 32])), n_layers=n_layers,
                    n_heads=heads, n_kv_heads=kv, head_dim=hd, ffn_dim=tp * draw(st.sampled_from([8, 16])),
                    n_experts=experts, top_k=top_k, z_loss_coef=0.001 if experts else 0.0,
                    mlp="relu2" if kind == "nemotron" else "swiglu",
                    norm="layernorm1p" if kind == "nemotron" else "rms",
                    rotary_pct=0.5 if kind == "nemotron" else 1.0,
                    sliding_window=draw(st.sampled_from([None, 5])) if kind == "mistral" else None,
                    tie_embeddings=ppn == 1 and draw(st.booleans()), max_position=256)
    vkind = draw(st.sampled_from(["clip", "siglip"]))
    vheads = tp * draw(st.sampled_from([1, 2]))
    vision = VisionConfig(kind=vkind, image_size=16, patch_size=8, dim=vheads * 4, n_layers=draw(st.integers(1, 2)),
                          n_heads=vheads, mlp_dim=tp * 8, eps=1e-5,
                          act="quick_gelu" if vkind == "clip" else "gelu_tanh",
                          select_layer=draw(st.sampled_from([-1, -2])),
                          select_feature=draw(st.sampled_from(["patch", "cls_patch"])) if vkind == "clip" else "patch")
    proj = draw(st.sampled_from(["mlp2x_gelu", "linear", "mlp3x_gelu"] + (["mlp_downsample"] if vision.select_feature == "patch" else [])))
    cfg = ModelConfig(vision=vision, projector=ProjectorConfig(proj), llm=llm, image_token_id=vocab - 1).validate()
    per = cfg.tokens_per_image
    rows = draw(st.integers(1, 2))
    images = tuple(draw(st.lists(st.integers(0, 2), min_size=rows, max_size=rows)))
    min_len = max(images) * (per + 1) + 3
    seq_len = draw(st.integers(min_len, min_len + 9))
    start, vis = 1, "tp"
    if cp:
        vis = draw(st.sampled_from(["tp", "replicate", "frames"]))
        m = 2 * cpn * (tp if sp else 1)                  # what model.normalize_batch pads T to
        c = -(-seq_len // m) * m // (2 * cpn)            # tokens per cp chunk
        b = draw(st.integers(1, 2 * cpn - 1))            # an image across the boundary of chunks b-1 and b
        cand = b * c - draw(st.integers(1, max(1, per - 1)))
        start = cand if 1 <= cand and cand + max(images) * (per + 1) + 2 <= seq_len else 1
    return Case(layout, cfg, draw(st.integers(0, 2**16)), rows, seq_len, images,
                padded=draw(st.booleans()), packed=draw(st.booleans()),
                n_micro=draw(st.sampled_from([m for m in (1, 2) if rows % m == 0])), uneven=uneven,
                image_start=start, vision=vis)


def _explicit(layout: Layout, kind: str, seq_len: int, *, window=None, experts: int = 0, padded=False, packed=False,
              rows: int = 2, images=(1, 0), seed: int = 7) -> Case:
    tp = layout.tp
    llm = LLMConfig(kind=kind, vocab_size=tp * 16, dim=32, n_layers=2 * layout.pp, n_heads=2 * tp, n_kv_heads=tp,
                    head_dim=8, ffn_dim=tp * 16, n_experts=experts, top_k=2,
                    z_loss_coef=0.001 if experts else 0.0, sliding_window=window, max_position=256)
    vision = VisionConfig(kind="siglip", image_size=16, patch_size=8, dim=tp * 8, n_layers=1, n_heads=tp, mlp_dim=tp * 8,
                          eps=1e-5, act="gelu_tanh", select_layer=-1)
    cfg = ModelConfig(vision=vision, projector=ProjectorConfig("mlp2x_gelu"), llm=llm, image_token_id=tp * 16 - 1).validate()
    return Case(layout, cfg, seed, rows, seq_len, images, padded=padded, packed=packed, n_micro=2 if rows % 2 == 0 else 1)


# Where a sharding bug hides, run by both tiers on 4 ranks: a sliding window shorter than the sequence
# under tp2 + sp (T = 15 is padded to 16 for the split), packed and padded; expert parallelism with
# padding; four data shards with very different label counts (and one row of each shard padded). Every
# case has uneven label counts per shard on real processes; the simulated tier runs them with equal ones.
EXPLICIT = {
    "window<T tp2+sp packed": _explicit(Layout(tp=2, dp=2, sp=True), "mistral", 15, window=4, packed=True),
    "window<T tp2+sp padded": _explicit(Layout(tp=2, dp=2, sp=True), "mistral", 15, window=4, padded=True),
    "ep2 padded": _explicit(Layout(ep=2, dp=2), "mixtral", 14, experts=4, padded=True),
    "ep2 tp2+sp padded": _explicit(Layout(ep=2, tp=2, sp=True), "mixtral", 13, experts=4, padded=True),
    "uneven labels dp4": _explicit(Layout(dp=4), "llama", 12, padded=True, images=(0, 1)),
    # drawn by hypothesis: in layer 1 no token of either ep rank routes to rank 3's experts, whose
    # empty expert output then hung off no graph, so its backward skipped an all-to-all: a gloo abort
    "ep2 cp2, an ep rank whose experts get no token": Case(
        Layout(ep=2, cp=2),
        ModelConfig(vision=VisionConfig(kind="clip", image_size=16, patch_size=8, dim=8, n_layers=1, n_heads=2,
                                        mlp_dim=8, eps=1e-5, act="quick_gelu", select_layer=-1, select_feature="cls_patch"),
                    projector=ProjectorConfig("mlp3x_gelu"),
                    llm=LLMConfig(kind="mixtral", vocab_size=10, dim=32, n_layers=3, n_heads=2, n_kv_heads=2, head_dim=8,
                                  ffn_dim=8, n_experts=6, top_k=1, z_loss_coef=0.001, tie_embeddings=True,
                                  max_position=256),
                    image_token_id=9).validate(),
        batch_seed=1136, rows_per_shard=2, seq_len=10, images_per_row=(1, 1), padded=False, packed=False,
        n_micro=2, image_start=2),
}
