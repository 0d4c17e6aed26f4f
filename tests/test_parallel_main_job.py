"""The main job's model on its real data (32k vocabulary, 8 experts, images and video frames, from its
own generator, shrunk): a few fp32 training steps under tp2 x pp2, tp2 + sp with ep2 and dp2 x tp2 on
4 gloo processes give the single-process per-step losses (experiments/parallel_equivalence.py runs the
20-step version on the full dataset)."""


def test_main_job_model_same_losses_in_every_layout(gloo_pool, job):
    import parallel_equivalence as pe
    res = pe.run(steps=3, batch_size=8, pool=gloo_pool)
    for name in pe.LAYOUTS:
        assert res[name]["max_rel"] < 1e-4, (name, res[name]["losses"], res["reference"])


def test_main_job_model_same_losses_under_cp(gloo_pool, job):
    """The same under cp2 x tp2 (the 12-step version: ``parallel_equivalence.py --cp``); ``job``: the
    dataset shrunk and written under tmp_path."""
    import parallel_equivalence as pe
    res = pe.run(steps=2, batch_size=8, pool=gloo_pool, layouts={"cp2xtp2": pe.CP_LAYOUTS["cp2xtp2"]})
    assert res["cp2xtp2"]["max_rel"] < 1e-4, (res["cp2xtp2"]["losses"], res["reference"])
