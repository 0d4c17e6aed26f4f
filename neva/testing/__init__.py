"""A public harness for the promise users trust most: the sharded run computes what one process
computes. Like ``torch.testing``, it is for tests (ours and yours):

    with local_world(cfg, Layout(tp=2, ep=2, sp=True)) as (par, mode):   # a simulated world, one process
        stats, grads = sharded_grads(par, params, cfg, batch, mode=mode)
        full = gather(par, grads, mode)
    ref_stats, ref_grads = reference_grads(params, cfg, batch, n_micro=2)
    assert max_rel_err(ref_grads, full) < 1e-4

    pool = GlooPool(4)                                                    # real gloo processes, kept alive
    pool.run(check_step, cfg, Layout(tp=2, pp=2), params, batch)          # -> per rank; rank 0 compares

Both sides run the real training step (``neva.train.step.compute_grads``; under pp the real pipeline
schedule), never a copy of it: the reference is the same function in one process over the same
micro-batches. ``replica_mismatches(par, tree)`` compares, byte for byte, the copies of each leaf
shard that several ranks hold (replicas over dp, tp, ep), which ``gather`` never looks at. Whole
training runs (optimizer, accumulation, precision, fp16 overflow, LoRA, ZeRO-1, checkpoints resumed
across layouts) are in ``neva.testing.runs``.
"""
from neva.testing.checks import check_step, gather, max_rel_err, reference_grads, replica_mismatches, sharded_grads
from neva.testing.worlds import GlooPool, local_world, parallel, value_on

__all__ = ["GlooPool", "local_world", "parallel", "value_on", "check_step", "gather", "max_rel_err",
           "reference_grads", "replica_mismatches", "sharded_grads"]
