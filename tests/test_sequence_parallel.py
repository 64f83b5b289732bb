"""Sequence parallelism (turbodiffusion_core/parallel) on the CPU: two gloo ranks equal one process.

One group of two ranks serves the whole module: this pytest process is rank 0 (it spawns rank 1, which
loads the tiny-t2v DiT and the random models below), so the single-process reference runs on the very
same weights in the very same process. fp32 throughout; tolerance: relative error < 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turbodiffusion_core import spec
from turbodiffusion_core.errors import Cancelled
from turbodiffusion_core.models.configs import DIT_CONFIGS
from turbodiffusion_core.models.dit import WanModel
from turbodiffusion_core.parallel import SequenceParallelError, SequenceShard, SPGroup, check_world_size

EXTRA = "tests.test_sequence_parallel:random_experts"


def random_experts(device: torch.device) -> dict[str, WanModel]:
    """Random tiny DiTs, every parameter drawn (norms, modulation and SLA proj_l included) so that any
    token or head mixed up by the parallel path changes the output. Called on every rank: same seed,
    same weights."""
    out = {}
    with torch.random.fork_rng(devices=[]):
        for seed, arch in enumerate(("tiny-t2v", "tiny-i2v")):
            torch.manual_seed(100 + seed)
            model = WanModel(DIT_CONFIGS[arch], with_sla_proj=True).eval()
            with torch.no_grad():
                for param in model.parameters():
                    param.normal_(0.0, 0.2)
            out[f"random-{arch}"] = model.to(device)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def group(models_dir):
    from turbodiffusion_core.parallel.launch import start_group

    torch.set_flush_denormal(True)  # as every rank's loader does
    g = start_group(["tiny-t2v"], world_size=2, device="cpu", models_dir=models_dir, extra_experts=EXTRA)
    yield g
    g.close()
    assert all(not p.is_alive() for p in g.processes)


# ---------------------------------------------------------------------------------------------------
# without a process group
# ---------------------------------------------------------------------------------------------------
def test_head_count_must_divide_by_ranks_with_a_clear_error():
    check_world_size(12, 4)
    check_world_size(40, 8)
    with pytest.raises(SequenceParallelError, match=r"12 heads.*5 GPUs.*1, 2, 3, 4, 6, 12"):
        check_world_size(12, 5)
    with pytest.raises(SequenceParallelError, match=r"40 heads.*3 GPUs.*1, 2, 4, 5, 8, 10, 20, 40"):
        check_world_size(40, 3)
    with pytest.raises(SequenceParallelError, match="2 heads"):
        SequenceShard(SPGroup(None, 0, 4), 100, 2)


def test_start_group_refuses_a_bad_rank_count_before_starting_anything(models_dir):
    from turbodiffusion_core.parallel.launch import start_group

    with pytest.raises(SequenceParallelError, match="tiny-t2v has 2 heads"):
        start_group(["tiny-t2v"], world_size=3, device="cpu", models_dir=models_dir)


def test_shards_cover_the_padded_sequence_in_order_with_global_rope_positions():
    length, n = 7, 3  # local 3, padded 9
    x = torch.arange(2 * length * 4, dtype=torch.float32).view(2, length, 4)
    rope = torch.polar(torch.ones(length, 1, 5), torch.rand(length, 1, 5))
    shards = [SequenceShard(SPGroup(None, r, n), length, 3) for r in range(n)]
    parts = [s.split(x) for s in shards]
    assert [p.shape[1] for p in parts] == [3, 3, 3]
    joined = torch.cat(parts, dim=1)
    assert torch.equal(joined[:, :length], x) and torch.equal(joined[:, length:], torch.zeros(2, 2, 4))
    ropes = torch.cat([s.split_rope(rope) for s in shards])
    assert torch.equal(ropes[:length], rope) and torch.equal(ropes[length:], torch.ones(2, 1, 5, dtype=rope.dtype))


# ---------------------------------------------------------------------------------------------------
# two gloo ranks
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention,topk", [("original", None), ("sla_reference", 0.4)])
@pytest.mark.parametrize("latent_hw", [(16, 18), (14, 18)], ids=["even-L", "odd-L"])
def test_dit_forward_on_two_ranks_equals_one_process(group, attention, topk, latent_hw):
    proxy = group.extra["random-tiny-t2v"]
    torch.manual_seed(3)
    h, w = latent_hw
    x = torch.randn(1, 16, 5, h, w)  # 5 x h/2 x w/2 tokens: 360 (even) or 315 (odd -> padded to 316)
    context = torch.randn(1, 9, 32)
    t = torch.tensor([750.0])
    with torch.inference_mode():
        single = proxy.model(x, t, context, attention=attention, sla_topk=topk)
        parallel = proxy(x, t, context, attention=attention, sla_topk=topk)
    assert parallel.shape == single.shape == (1, 16, 5, h, w)
    assert rel_err(parallel, single) < 1e-5
    if attention == "sla_reference":  # the sparse pattern is really sparse here (2 of 5 key blocks kept)
        with torch.inference_mode():
            dense = proxy.model(x, t, context, attention="original")
        assert rel_err(single, dense) > 1e-3


def test_i2v_expert_with_conditioning_and_a_batch_of_two(group):
    proxy = group.extra["random-tiny-i2v"]
    torch.manual_seed(4)
    x = torch.randn(2, 16, 3, 6, 10)  # 45 tokens each: odd
    y = torch.randn(2, 20, 3, 6, 10)
    context = torch.randn(2, 5, 32)
    t = torch.tensor([900.0, 300.0])
    with torch.inference_mode():
        single = proxy.model(x, t, context, y=y, attention="sla_reference", sla_topk=0.5)
        parallel = proxy(x, t, context, y=y, attention="sla_reference", sla_topk=0.5)
    assert rel_err(parallel, single) < 1e-5
    assert rel_err(parallel[1], single[0]) > 0.1  # the batch rows did not get mixed up


def test_whole_tiny_generation_on_two_ranks_equals_one_process(group, models_dir):
    from turbodiffusion_core.pipeline import load_pipeline

    req = spec.resolve(spec.GenerationRequest(prompt="一只橙色的猫在花园里追逐蝴蝶", model="tiny-t2v", seed=11,
                                              size="128x96", num_frames=5, steps=2, attention_type="sla"))
    pipe = group.pipelines["tiny-t2v"]
    assert pipe.sequence_parallel == 2
    events = []
    before = group.ctx.forwards
    parallel = pipe.generate(req, on_progress=events.append)
    assert group.ctx.forwards - before == 2  # both steps ran over the two ranks
    single = load_pipeline("tiny-t2v", models_dir=models_dir, device="cpu").generate(req)
    assert parallel.frames.shape == single.frames.shape == (5, 96, 128, 3)
    diff = np.abs(parallel.frames.astype(int) - single.frames.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # equal up to a rounding flip of the uint8 frames
    assert parallel.frames.std() > 0
    steps = [e.step for e in events if e.stage == "denoise" and e.step]
    assert steps == [1, 2]  # progress comes from rank 0

    # cancel on rank 0 after step 1: the other rank just gets no further command, and the group serves on
    checks = []
    with pytest.raises(Cancelled, match="before step 2"):
        pipe.generate(req, should_cancel=lambda: checks.append(1) or len(checks) > 1)
    again = pipe.generate(req)
    assert np.array_equal(again.frames, parallel.frames)


def test_a_worker_owning_the_group_serves_queued_videos(group, settings, client):
    """worker/group.py: rank 0 is an ordinary RQ worker whose pipeline runs over both ranks."""
    from tests.conftest import FAST, wait_for, wait_status
    from worker.group import group_runtime, stop_when_broken
    from worker.main import EmbeddedWorker

    watches = []
    holder = {}

    def build():
        holder["rt"] = group_runtime(settings, group)
        return holder["rt"]

    worker = EmbeddedWorker(build).start(wait=60)
    try:
        before = group.ctx.forwards
        created = client.post("/v1/videos", json=dict(FAST, prompt="a paper boat", num_frames=5, steps=2)).json()
        video = wait_status(client, created["id"], timeout=60)
        assert video["status"] == "completed", video
        assert group.ctx.forwards - before == 2
        content = client.get(f"/v1/videos/{created['id']}/content")
        assert content.status_code == 200 and content.content[4:8] == b"ftyp"
        watches.append(stop_when_broken(group, worker._worker, interval=0.05))
        assert not watches[0].wait(0.2) and worker.alive  # a healthy group does not stop its worker
        group.ctx.broken = "simulated failure"  # as a failed parallel forward marks it
        try:
            # a job that meets a broken group is the worker's failure, not the video's: the job code leaves
            # the video to its lease (retried elsewhere) instead of failing it (worker/tasks.py)
            from turbodiffusion_core import spec
            from turbodiffusion_core.errors import WorkerBroken

            pipe = holder["rt"].residency.get("tiny-t2v")
            req = spec.resolve(spec.GenerationRequest(prompt="x", model="tiny-t2v", num_frames=5, steps=1))
            with pytest.raises(WorkerBroken):
                pipe.generate(req)
            assert watches[0].wait(5)
            wait_for(lambda: not worker.alive, 15, what="the worker of a broken group to stop")
        finally:
            group.ctx.broken = None  # nothing is really out of step: let the rest of the module go on
    finally:
        worker.stop()
