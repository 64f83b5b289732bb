"""CUDA graphs of the DiT forward (turbodiffusion_core/cuda_graphs.py) and the pipeline option that uses them.

CPU: the wrapper runs eagerly (nothing to capture) and the pipeline reports graphs off. GPU (skipped without
CUDA): a small real DiT replayed from a graph gives what the eager forward gives, call after call with new
inputs; a new shape gets its own graph; a forward that cannot be captured runs eagerly; the tiny pipeline
makes the same video with and without graphs.
"""

from __future__ import annotations

import pytest
import torch

from turbodiffusion_core.cuda_graphs import GraphedForward

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A folder for the tiny checkpoints (written on first load); own fixture, so the GPU run needs no conftest."""
    return tmp_path_factory.mktemp("tiny_models")


def test_cpu_calls_run_eagerly():
    calls = []

    def fn(x, scale=1.0):
        calls.append(x.shape)
        return x * scale

    graphed = GraphedForward(fn)
    x = torch.arange(6.0)
    for _ in range(3):
        torch.testing.assert_close(graphed(x, scale=2.0), x * 2)
    assert len(calls) == 3 and graphed.stats() == {"graphs": 0, "replays": 0, "failed": 0}
    # a call whose arguments cannot key a graph (a list) runs eagerly on a GPU too
    from turbodiffusion_core.cuda_graphs import _hashable, _signature

    assert _hashable(_signature((x,), {"scale": 2.0})[0])
    assert not _hashable(_signature((x,), {"extra": [1, 2]})[0])
    assert GraphedForward(lambda v, extra: v + len(extra))(x, extra=[1, 2]).tolist() == (x + 2).tolist()


def test_pipeline_reports_graphs_off_on_cpu(tiny_models):
    from turbodiffusion_core.pipeline import load_pipeline

    pipe = load_pipeline("tiny-t2v", models_dir=tiny_models, device="cpu", cuda_graphs=True)
    try:
        assert pipe.info()["cuda_graphs"] == "off" and pipe._dit("dit") is pipe._forward["dit"]
    finally:
        pipe.close()
        # a CPU load flushes subnormal floats process-wide; later tests in this process (hypothesis) need them
        torch.set_flush_denormal(False)


def small_dit():
    """A 2-block DiT wide enough for every kernel (SLA blocks, FP8 GEMM tiles), FP8 linears as served."""
    from tests.kernel_support import enliven_dit
    from turbodiffusion_core.models.configs import DiTConfig
    from turbodiffusion_core.models.dit import WanModel

    torch.manual_seed(3)
    cfg = DiTConfig(dim=512, ffn_dim=1536, num_heads=4, num_layers=2, in_dim=16, text_dim=256)
    with torch.device("cuda"):
        model = enliven_dit(WanModel(cfg, with_sla_proj=True, quant="fp8"))
    return model.set_dtype(torch.bfloat16).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@cuda
def test_replays_match_the_eager_forward():
    model = small_dit()
    graphed = GraphedForward(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    context = torch.randn(1, 100, model.cfg.text_dim, device="cuda", generator=g).bfloat16()
    outs = []
    with torch.inference_mode():
        for step, shape in enumerate([(5, 32, 48)] * 4 + [(5, 32, 64)] * 3):  # 1920 and 2560 tokens
            x = torch.randn(1, 16, *shape, device="cuda", generator=g).bfloat16()
            t = torch.tensor([900.0 - 100 * step], device="cuda")
            got = graphed(x, t, context, attention="sla", sla_topk=0.5)
            expected = model(x, t, context, attention="sla", sla_topk=0.5)
            err = rel_err(got, expected)
            print(f"call {step} {shape}: graph vs eager rel err {err:.2e}")
            assert err < 1e-3
            outs.append(got)
    # the first call of each shape is eager, the second captures: 2 graphs, (4-1) + (3-1) replays
    assert graphed.stats() == {"graphs": 2, "replays": 5, "failed": 0}
    assert not torch.equal(outs[2], outs[3])  # each call returns its own result, not the static output
    assert outs[2].data_ptr() != outs[3].data_ptr()


@cuda
def test_a_forward_that_cannot_be_captured_runs_eagerly():
    def syncing(x):
        return x * float(x.sum().item())  # a host synchronisation: not allowed while capturing

    graphed = GraphedForward(syncing, name="syncing")
    x = torch.ones(4, device="cuda")
    with torch.inference_mode():
        results = [graphed(x) for _ in range(3)]
    for r in results:
        torch.testing.assert_close(r, torch.full((4,), 4.0, device="cuda"))
    assert graphed.stats()["failed"] == 1 and graphed.stats()["graphs"] == 0
    # the failed capture left nothing behind: CUDA's default generator draws again (it stayed in capture mode
    # before _recover_from_failed_capture), and a capturable function still gets its graph
    assert torch.randn(8, device="cuda").isfinite().all()
    doubled = GraphedForward(lambda v: v * 2)
    with torch.inference_mode():
        outs = [doubled(x) for _ in range(3)]
    assert doubled.stats() == {"graphs": 1, "replays": 2, "failed": 0}
    torch.testing.assert_close(outs[-1], x * 2)


@cuda
def test_pipeline_makes_the_same_video_with_graphs(tiny_models):
    import numpy as np

    from turbodiffusion_core import spec
    from turbodiffusion_core.pipeline import load_pipeline

    req = spec.resolve(spec.GenerationRequest(prompt="a red kite", model="tiny-t2v", seed=4, steps=4))
    frames = {}
    for graphs in (False, True):
        pipe = load_pipeline("tiny-t2v", models_dir=tiny_models, device="cuda", attention="original",
                             cuda_graphs=graphs)
        try:
            frames[graphs] = np.asarray(pipe.generate(req).frames, dtype=np.float32)
            if graphs:
                stats = pipe.info()["cuda_graphs"]["dit"]
                assert stats["graphs"] == 1 and stats["replays"] == 3
                # what the warm-up does when the graphs leave the VAE decode too little memory
                pipe.disable_cuda_graphs("test")
                assert pipe.info()["cuda_graphs"] == "off: test" and pipe._dit("dit") is pipe._forward["dit"]
                frames["eager again"] = np.asarray(pipe.generate(req).frames, dtype=np.float32)
        finally:
            pipe.close()
    assert np.abs(frames[True] - frames[False]).mean() < 1.0  # 8-bit frames, same up to rounding
    assert np.array_equal(frames["eager again"], frames[False])
