"""End to end on one GPU: request start to MP4 on disk, stage by stage, against the original Wan baseline.

    python bench/bench_e2e.py --out bench/results/e2e_h100.json          # about 4-5 minutes on an H100
    python bench/bench_e2e.py --no-i2v --out ...                          # T2V sections only (about 2-3 min)
    python bench/bench_e2e.py --compile --no-i2v --out ...                # + torch.compile of the DiT forward
    python bench/bench_e2e.py --only t2v_14b,i2v_a14b --budget-s 540 --out ...   # the 14B sections alone
    python bench/bench_e2e.py --smoke --out /tmp/e2e_smoke.json           # tiny shapes on the CPU (script check)

Random weights at the real shapes (no weights can be downloaded), modules built directly in memory on the
GPU and run through the same VideoPipeline class the worker uses (its in-memory constructor). Sections,
each timed, each wrapped so one failure is recorded and the others still run; the JSON is rewritten after
every section, so a run cut short still leaves its results:

1. build: umT5-XXL encoder (5.7B params, bf16, built random on the GPU), Wan2.1 VAE, 1.3B DiT.
2. baseline_dit: diffusers WanTransformer3DModel (same weights, bf16, SDPA) one forward at 480p 81 frames.
3. vae: our VAE decode vs diffusers AutoencoderKLWan.decode, same weights, bf16, 480p 81 frames; relative
   error of ours against diffusers.
4. warmup: VideoPipeline.warmup() (one 1-step generation at 832x480x81: Triton autotune, cuDNN plans).
5. e2e_t5_gpu: turbowan2.1-t2v-1.3b-480p shape, 81 frames, 4 steps, SLA top-k 0.10, fp8 linears: several
   requests back to back with distinct prompts (text encoder runs every time), outputs written by the
   pipeline (MP4 encoded on a thread while the VAE decodes). Per request: wall time to MP4 closed on disk
   and to all outputs, per-stage timings; medians; peak GPU memory; steady-state seconds per video and
   videos per hour with a full queue (= 3600 / mean seconds per back-to-back request). Then the same
   prompt again (prompt cache hit), and one request the old way (frames first, then write the files) to
   show what the overlap saves.
6. e2e_t5_cpu: the text encoder moved to host memory: peak GPU memory and e2e (repeat prompt, cache hit);
   the CPU encode time of a new prompt is estimated from one umT5-XXL layer timed on the CPU x 24.
7. baseline: original Wan2.1 1.3B with diffusers, 50 steps with CFG = 100 DiT forwards, ESTIMATED as
   2 x text encode (prompt + negative prompt, measured above) + 100 x the measured diffusers forward +
   the measured diffusers VAE decode + a sequential MP4 encode (measured): not run in full.
8. i2v_a14b (unless --no-i2v, and only if time is left): Wan2.2 I2V A14B shape, two 14B experts in fp8,
   720p 81 frames 4 steps: per-step DiT time, expert switch cost and peak GPU memory in "resident" and
   "swap" modes, and the unhidden (synchronous) cost of moving one expert in. The text encoder here is a
   1-layer stand-in at umT5-XXL width (excluded from the memory figures' meaning; see section 5).
9. compile (only with --compile): the DiT forward under torch.compile (inductor): compile time, e2e.
10. t2v_14b (with --with-14b or --only t2v_14b): turbowan2.1-t2v-14b-720p shape, 1280x720, 81 frames,
   4 steps, SLA top-k 0.10, fp8 linears, the real-size umT5-XXL on the GPU: warm-up, then two requests:
   request start to MP4, stage timings and peak GPU memory.

--only picks sections by name; a section that needs an earlier one's state builds what it needs itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from turbodiffusion_core import spec  # noqa: E402
from turbodiffusion_core.pipeline import VideoPipeline  # noqa: E402

PROMPTS = [
    "A cat walks slowly across a sunny garden, chasing a yellow butterfly between the flowers.",
    "A busy city street at night, neon lights reflecting on wet asphalt, cars passing by.",
    "Two astronauts float inside a space station, the Earth glowing blue through the window.",
    "A golden retriever plays with a red ball on the beach at sunset, waves rolling behind it.",
    "An old man reads a newspaper on a wooden bench under a large oak tree in autumn.",
    "A close-up of a cup of coffee, steam rising, morning light coming through the kitchen window.",
    "A young woman dances in a field of sunflowers, her hair moving in the wind.",
    "A red kite flies high above green hills on a windy spring afternoon.",
]

REAL = dict(
    device="cuda", dtype=torch.bfloat16, t2v_preset="turbowan2.1-t2v-1.3b-480p", t2v_arch="wan2.1-t2v-1.3b",
    vae="wan2.1", t5="umt5-xxl", size="832x480", frames=81, i2v_preset="turbowan2.2-i2v-a14b-720p",
    i2v_arch="wan2.2-i2v-a14b", i2v_image=(1280, 720), quant="fp8", attention="sla", t5_layers=24,
    t2v14_preset="turbowan2.1-t2v-14b-720p", t2v14_arch="wan2.1-t2v-14b", t2v14_size="1280x720",
)
SMOKE = dict(
    device="cpu", dtype=torch.float32, t2v_preset="tiny-t2v", t2v_arch="tiny-t2v", vae="tiny", t5="tiny",
    size="224x128", frames=5, i2v_preset="tiny-i2v", i2v_arch="tiny-i2v", i2v_image=(224, 128), quant="fp8",
    attention="sla", t5_layers=2, t2v14_preset="tiny-t2v", t2v14_arch="tiny-t2v", t2v14_size="224x128",
)


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()


def peak() -> dict:
    if not torch.cuda.is_available():
        return {}
    sync()
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3),
            "allocated_now_gb": round(torch.cuda.memory_allocated() / 2**30, 3)}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any], warmup: int = 1, repeat: int = 3) -> tuple[list[float], Any]:
    """Wall times (s) of `repeat` synchronised calls after `warmup` calls; returns (times, last output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return times, out


def med(values: list[float]) -> Optional[float]:
    return round(statistics.median(values), 4) if values else None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def median_timings(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in keys}


# ------------------------------------------------------------------------------------------------
# random modules at the real shapes
# ------------------------------------------------------------------------------------------------
from bench.random_models import random_dit, random_vae  # noqa: E402
from worker.residency import EngineOptions  # noqa: E402

WORKER_OPTIONS = EngineOptions.from_env()
"""The worker's TD_* options; the decode, output and forward ones (TD_VAE_CHUNK_FRAMES, TD_CUDNN_BENCHMARK,
TD_MP4_ENCODER, TD_CUDA_GRAPHS) apply here too."""
PIPE_OPTIONS = {k: v for k, v in WORKER_OPTIONS.decode_args.items() if k in ("mp4_encoder", "cuda_graphs")}


def diffusers_vae_like(vae, dtype: torch.dtype):
    """diffusers AutoencoderKLWan holding our VAE's weights (the verified key map in tests/data/keys)."""
    from diffusers import AutoencoderKLWan

    mapping = json.loads((ROOT / "tests/data/keys/wan-to-diffusers-vae-map.json").read_text())["tensors"]
    device = next(vae.parameters()).device
    with torch.device(device):
        theirs = AutoencoderKLWan(base_dim=vae.config.dim, z_dim=vae.config.z_dim).eval()
    theirs.load_state_dict({mapping[k]["to"]: v for k, v in vae.state_dict().items()}, strict=True)
    return theirs.to(dtype).requires_grad_(False)


def random_umt5(config: str, device: str, dtype: torch.dtype, layers: Optional[int] = None, vocab: Optional[int] = None):
    """transformers UMT5EncoderModel at a T5_CONFIGS shape with random weights, allocated directly on
    `device` in `dtype` (no float32 copy, no CPU detour)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from turbodiffusion_core.models.text_encoder import T5_CONFIGS

    kwargs = dict(T5_CONFIGS[config])
    if layers is not None:
        kwargs["num_layers"] = layers
    if vocab is not None:
        kwargs["vocab_size"] = vocab
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = UMT5EncoderModel(UMT5Config(**kwargs))
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 0.1, generator=gen)
            elif "shared" in name or "embed_tokens" in name:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.eval().requires_grad_(False)


def text_encoder_from(model, workdir: Path):
    from transformers import AutoTokenizer

    from turbodiffusion_core.models.text_encoder import TextEncoder
    from turbodiffusion_core.models.tokenizer_builder import build_tiny_tokenizer

    folder = workdir / "tokenizer"
    if not folder.exists():
        build_tiny_tokenizer(folder)
    return TextEncoder(model, AutoTokenizer.from_pretrained(str(folder)))


def count_params(model) -> int:
    """Elements of the parameters and buffers (a quantized linear keeps its weight as a buffer)."""
    return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())


# ------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cfg = dict(SMOKE if args.smoke else REAL)
        if args.attention:
            self.cfg["attention"] = args.attention
        if args.quant:
            self.cfg["quant"] = args.quant
        self.started = time.perf_counter()
        self.workdir = Path(tempfile.mkdtemp(prefix="td-e2e-"))
        self.state: dict[str, Any] = {}
        self.result: dict[str, Any] = {
            "what": "request start to MP4 on disk, random weights at the real shapes, in-memory VideoPipeline",
            "command": "python " + " ".join(sys.argv),
            "smoke": bool(args.smoke),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "memory_cap_gb": args.memory_cap_gb,
            "attention": self.cfg["attention"],
            "quant": self.cfg["quant"],
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("TD_")},  # the engine's settings
            "sections": {},
        }
        try:
            import triton

            self.result["triton"] = triton.__version__
        except ImportError:
            pass

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        self.result["seconds"] = round(self.elapsed(), 1)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.result, indent=2, default=str))

    def section(self, name: str, fn: Callable[[], dict], need_s: float = 0.0) -> None:
        left = self.args.budget_s - self.elapsed()
        if left < need_s:
            self.result["sections"][name] = {"skipped": f"{left:.0f} s of the {self.args.budget_s:.0f} s budget left, "
                                                        f"section needs about {need_s:.0f} s"}
            print(f"[{self.elapsed():6.1f}s] {name}: skipped (time budget)", flush=True)
            self.save()
            return
        print(f"[{self.elapsed():6.1f}s] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # record and go on: one broken section must not hide the others
            out = {"error": f"{type(exc).__name__}: {exc}"[:1000],
                   "traceback": traceback.format_exc()[-3000:]}
            print(f"    ERROR {out['error'][:300]}", flush=True)
        out["section_seconds"] = round(time.perf_counter() - start, 2)
        self.result["sections"][name] = out
        free_memory()
        self.save()

    def request(self, prompt: str, **kw) -> spec.ResolvedRequest:
        c = self.cfg
        fields = dict(prompt=prompt, model=c["t2v_preset"], size=c["size"], num_frames=c["frames"], steps=4,
                      seed=42, attention_type=c["attention"], sla_topk=0.10)
        fields.update(kw)
        return spec.resolve(spec.GenerationRequest(**fields))

    def run_vae(self):
        """Our VAE as the pipelines run it (run dtype, channels-last on CUDA): the vae section's, or a fresh
        one with the same seeded weights when that section did not run or failed."""
        if "vae" not in self.state:
            c = self.cfg
            vae = random_vae(c["vae"], c["device"], seed=2).to(c["dtype"])
            self.state["vae"] = vae.use_channels_last() if c["device"] == "cuda" else vae
        self.state["vae"].decode_chunk_frames = WORKER_OPTIONS.decode_args["vae_chunk_frames"]
        return self.state["vae"]

    # --- sections --------------------------------------------------------------------------------
    def build(self) -> dict:
        c, out = self.cfg, {}
        reset_peak()
        start = time.perf_counter()
        t5 = random_umt5(c["t5"], c["device"], torch.bfloat16 if c["device"] == "cuda" else torch.float32)
        sync()
        out["t5_build_s"] = round(time.perf_counter() - start, 2)
        out["t5_params_b"] = round(count_params(t5) / 1e9, 3)
        out["t5_gb"] = round(sum(p.numel() * p.element_size() for p in t5.parameters()) / 2**30, 3)
        self.state["t5"] = t5
        start = time.perf_counter()
        self.state["dit"] = random_dit(c["t2v_arch"], c["device"], c["dtype"], seed=1)
        self.state["vae32"] = random_vae(c["vae"], c["device"], seed=2)
        sync()
        out["dit_vae_build_s"] = round(time.perf_counter() - start, 2)
        out["dit_params_b"] = round(count_params(self.state["dit"]) / 1e9, 3)
        out.update(peak())
        return out

    def baseline_dit(self) -> dict:
        from bench.diffusers_twin import diffusers_twin

        c = self.cfg
        dit = self.state["dit"]
        twin = diffusers_twin(dit, device=c["device"], dtype=c["dtype"])
        cfg = dit.cfg
        w, h = spec.parse_size(c["size"])
        g = torch.Generator(device=c["device"]).manual_seed(0)
        x = torch.randn(1, cfg.in_dim, spec.latent_frames(c["frames"]), h // 8, w // 8, device=c["device"],
                        generator=g).to(c["dtype"])
        t = torch.tensor([988.0], device=c["device"], dtype=c["dtype"])
        context = (torch.randn(1, 512, cfg.text_dim, device=c["device"], generator=g) * 0.1).to(c["dtype"])
        reset_peak()
        with torch.inference_mode():
            times, _ = timed(lambda: twin(x, t, context, return_dict=False)[0], warmup=1, repeat=3)
        twin = None  # noqa: F841  (frees it; the lambda above is done)
        out = {"impl": "diffusers WanTransformer3DModel (SDPA, bf16)", "forward_s_all": [round(v, 4) for v in times],
               "forward_s": med(times), **peak()}
        self.state["baseline_forward_s"] = out["forward_s"]
        return out

    def vae(self) -> dict:
        c = self.cfg
        vae = self.state.pop("vae32")
        theirs = diffusers_vae_like(vae, c["dtype"])
        ours = vae.to(c["dtype"])
        if c["device"] == "cuda":
            ours.use_channels_last()
        ours.decode_chunk_frames = WORKER_OPTIONS.decode_args["vae_chunk_frames"]
        self.state["vae"] = ours
        from turbodiffusion_core.models.vae import VAE_CONFIGS

        cfgv = VAE_CONFIGS[c["vae"]]
        w, h = spec.parse_size(c["size"])
        g = torch.Generator(device=c["device"]).manual_seed(3)
        lat = torch.randn(1, 16, spec.latent_frames(c["frames"]), h // 8, w // 8, device=c["device"], generator=g)
        mean = torch.tensor(cfgv.latent_mean, device=c["device"]).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfgv.latent_std, device=c["device"]).view(1, -1, 1, 1, 1)
        out: dict[str, Any] = {}
        reset_peak()
        with torch.inference_mode():
            times, ref = timed(lambda: theirs.decode((lat * std + mean).to(c["dtype"])).sample, warmup=1, repeat=3)
        out["diffusers_decode_s_all"] = [round(v, 4) for v in times]
        out["diffusers_decode_s"] = med(times)
        out["diffusers_peak_gb"] = peak().get("peak_allocated_gb")
        ref = ref.float()
        theirs = None  # noqa: F841
        free_memory()
        reset_peak()
        with torch.inference_mode():
            times, mine = timed(lambda: ours.decode(lat), warmup=1, repeat=3)
        out["ours_decode_s_all"] = [round(v, 4) for v in times]
        out["ours_decode_s"] = med(times)
        out["ours_peak_gb"] = peak().get("peak_allocated_gb")
        out["rel_err_ours_vs_diffusers"] = rel_err(mine.float(), ref)
        out["speedup"] = round(out["diffusers_decode_s"] / out["ours_decode_s"], 3)
        self.state["diffusers_vae_decode_s"] = out["diffusers_decode_s"]
        return out

    def pipeline(self) -> dict:
        from turbodiffusion_core.quant import quantize_model_linears

        c = self.cfg
        dit = self.state.pop("dit")
        quantize_model_linears(dit, c["quant"])
        dit.quant = c["quant"]
        free_memory()
        pipe = VideoPipeline.from_modules(
            c["t2v_preset"], text_encoder=text_encoder_from(self.state.pop("t5"), self.workdir),
            vae=self.run_vae(), experts={"dit": dit}, device=torch.device(c["device"]), dtype=c["dtype"],
            attention=c["attention"], quant=c["quant"], **PIPE_OPTIONS)
        self.state["pipe"] = pipe
        reset_peak()
        start = time.perf_counter()
        timings = pipe.warmup()
        return {"warmup_s": round(time.perf_counter() - start, 3), "warmup_timings": timings, "info": pipe.info(),
                **peak()}

    def _run(self, pipe, prompt: str, folder: Path, **kw) -> dict:
        req = self.request(prompt, **kw)
        sync()
        start = time.perf_counter()
        result = pipe.generate(req, output_dir=folder, stem="video")
        wall = time.perf_counter() - start
        mp4 = result.files["video"]
        return {"wall_s": wall, "to_mp4_s": wall - result.timings.get("store", 0.0), "mp4_bytes": mp4.stat().st_size,
                "timings": result.timings}

    def e2e_t5_gpu(self) -> dict:
        pipe = self.state["pipe"]
        n = self.args.requests
        runs = []
        reset_peak()
        start = time.perf_counter()
        for i in range(n):
            runs.append(self._run(pipe, PROMPTS[i % len(PROMPTS)] + f" (take {i})", self.workdir / f"r{i}"))
        back_to_back = time.perf_counter() - start
        mem = peak()
        hits = [self._run(pipe, PROMPTS[0] + " (take 0)", self.workdir / f"h{i}") for i in range(2)]
        # the old way: frames first, then the files (no overlap), for comparison
        from turbodiffusion_core.video import write_outputs

        sync()
        t0 = time.perf_counter()
        res = pipe.generate(self.request(PROMPTS[1] + " (take 1)"))
        t1 = time.perf_counter()
        write_outputs(res.frames, self.workdir / "seq", stem="video")
        t2 = time.perf_counter()
        from turbodiffusion_core.video import write_mp4

        seq_mp4 = [0.0]
        s = time.perf_counter()
        write_mp4(res.frames, self.workdir / "seq" / "again.mp4")
        seq_mp4[0] = time.perf_counter() - s
        self.state["sequential_mp4_s"] = seq_mp4[0]
        med_t = median_timings([r["timings"] for r in runs])
        self.state["t5_gpu_encode_s"] = med_t.get("text_encode")
        self.state["ours_e2e_s"] = med([r["to_mp4_s"] for r in runs])
        per_video = back_to_back / n
        return {
            "requests": n,
            "to_mp4_s_median": med([r["to_mp4_s"] for r in runs]),
            "all_outputs_s_median": med([r["wall_s"] for r in runs]),
            "to_mp4_s_all": [round(r["to_mp4_s"], 4) for r in runs],
            "stage_median_s": med_t,
            "mp4_bytes": runs[-1]["mp4_bytes"],
            "steady_state_s_per_video": round(per_video, 4),
            "videos_per_hour": round(3600.0 / per_video, 1),
            "cache_hit_to_mp4_s": med([r["to_mp4_s"] for r in hits]),
            "cache_hit_text_encode_s": med([r["timings"]["text_encode"] for r in hits]),
            "not_overlapped": {"generate_s": round(t1 - t0, 4), "write_outputs_s": round(t2 - t1, 4),
                               "total_s": round(t2 - t0, 4), "vae_decode_s": round(res.timings["vae_decode"], 4)},
            "sequential_mp4_encode_s": round(seq_mp4[0], 4),
            "prompt_cache": pipe.info().get("prompt_cache"),
            **mem,
        }

    def e2e_t5_cpu(self) -> dict:
        pipe = self.state["pipe"]
        enc = pipe.text_encoder
        start = time.perf_counter()
        enc.to("cpu")
        free_memory()
        move_s = time.perf_counter() - start
        reset_peak()
        runs = [self._run(pipe, PROMPTS[0] + " (take 0)", self.workdir / f"c{i}") for i in range(2)]
        out = {"move_to_cpu_s": round(move_s, 2), "text_encoder_placement": pipe.info()["text_encoder"],
               "cache_hit_to_mp4_s_median": med([r["to_mp4_s"] for r in runs]),
               "stage_median_s": median_timings([r["timings"] for r in runs]), **peak()}
        # a new prompt on the CPU encoder: one umT5-XXL layer timed on the CPU, x layers (estimate)
        pipe.text_encoder = None
        del enc
        free_memory()
        try:
            c = self.cfg
            layer = random_umt5(c["t5"], "cpu", torch.bfloat16, layers=1, vocab=1024)
            ids = torch.randint(3, 1000, (1, 512))
            mask = torch.ones(1, 512, dtype=torch.long)
            with torch.inference_mode():
                times, _ = timed(lambda: layer(input_ids=ids, attention_mask=mask).last_hidden_state, warmup=1,
                                 repeat=2)
            out["cpu_one_layer_s"] = med(times)
            out["cpu_encode_estimate_s"] = round(med(times) * c["t5_layers"], 3)
            out["cache_miss_to_mp4_s_estimate"] = round(out["cache_hit_to_mp4_s_median"] + out["cpu_encode_estimate_s"], 3)
            layer = None  # noqa: F841
        except Exception as exc:
            out["cpu_estimate_error"] = f"{type(exc).__name__}: {exc}"[:500]
        return out

    def baseline(self) -> dict:
        s = self.state
        parts = {
            "text_encode_x2_s": None if s.get("t5_gpu_encode_s") is None else 2 * s["t5_gpu_encode_s"],
            "dit_100_forwards_s": None if s.get("baseline_forward_s") is None else 100 * s["baseline_forward_s"],
            "vae_decode_s": s.get("diffusers_vae_decode_s"),
            "mp4_encode_s": s.get("sequential_mp4_s"),
        }
        missing = [k for k, v in parts.items() if v is None]
        out: dict[str, Any] = {"method": "estimated from measured parts (not run in full): 2 text encodes "
                                         "(prompt + negative) + 100 diffusers DiT forwards (50 steps x CFG) + "
                                         "diffusers VAE decode + sequential MP4 encode",
                               "parts_s": {k: None if v is None else round(v, 4) for k, v in parts.items()}}
        if missing:
            out["incomplete"] = f"missing measurements: {', '.join(missing)}"
            return out
        total = sum(parts.values())
        out["baseline_e2e_s"] = round(total, 3)
        if s.get("ours_e2e_s"):
            out["ours_e2e_s"] = s["ours_e2e_s"]
            out["speedup"] = round(total / s["ours_e2e_s"], 1)
        return out

    def t2v_14b(self) -> dict:
        """14B T2V at 720p, 81 frames, 4 steps, sla + fp8, with the real-size text encoder on the GPU: request
        start to MP4 and peak GPU memory (issue 6's 14B targets: <= 12 s, <= 40 GB)."""
        from turbodiffusion_core.quant import quantize_model_linears

        c = self.cfg
        self.state.pop("pipe", None)
        free_memory()
        t5 = self.state.pop("t5", None)
        if t5 is None:
            t5 = random_umt5(c["t5"], c["device"], torch.bfloat16 if c["device"] == "cuda" else torch.float32)
        vae = self.run_vae()
        start = time.perf_counter()
        dit = random_dit(c["t2v14_arch"], c["device"], c["dtype"], seed=20)
        quantize_model_linears(dit, c["quant"])
        dit.quant = c["quant"]
        free_memory()
        sync()
        out: dict[str, Any] = {"build_s": round(time.perf_counter() - start, 2),
                               "dit_params_b": round(count_params(dit) / 1e9, 3)}
        cap = self.args.memory_cap_gb
        if cap is not None and c["device"] == "cuda":
            from turbodiffusion_core.models.text_encoder import quantize_umt5_fp8

            quantize_umt5_fp8(t5)  # what the worker's TD_TEXT_ENCODER=gpu-fp8 loads
            free_memory()
            torch.cuda.set_per_process_memory_fraction(cap * 1e9 / torch.cuda.get_device_properties(0).total_memory)
            out.update(memory_cap_gb=cap, text_encoder_placement="gpu-fp8",
                       allocated_at_cap_gb=round(torch.cuda.memory_allocated() / 2**30, 3))
        pipe = VideoPipeline.from_modules(
            c["t2v14_preset"], text_encoder=text_encoder_from(t5, self.workdir), vae=vae, experts={"dit": dit},
            device=torch.device(c["device"]), dtype=c["dtype"], attention=c["attention"], quant=c["quant"],
            **PIPE_OPTIONS)
        reset_peak()
        start = time.perf_counter()
        out["warmup_timings"] = pipe.warmup()
        out["warmup_s"] = round(time.perf_counter() - start, 2)
        out["warmup_peak"] = peak()
        self.save()
        runs = []
        reset_peak()
        for i in range(2):
            req = self.request(PROMPTS[4 + i], model=c["t2v14_preset"], size=c["t2v14_size"])
            sync()
            t0 = time.perf_counter()
            result = pipe.generate(req, output_dir=self.workdir / f"t14_{i}", stem="video")
            wall = time.perf_counter() - t0
            runs.append({"wall_s": wall, "to_mp4_s": wall - result.timings.get("store", 0.0),
                         "timings": result.timings})
        out.update({
            "size": c["t2v14_size"], "frames": c["frames"], "steps": 4, "attention": c["attention"], "sla_topk": 0.10,
            "quant": c["quant"], "text_encoder": pipe.info().get("text_encoder"),
            "cuda_graphs": pipe.info().get("cuda_graphs"),
            "to_mp4_s_all": [round(r["to_mp4_s"], 3) for r in runs],
            "to_mp4_s_median": med([r["to_mp4_s"] for r in runs]),
            "stage_median_s": median_timings([r["timings"] for r in runs]),
            **peak(),
        })
        pipe = dit = t5 = None  # noqa: F841
        return out

    def i2v(self) -> dict:
        from PIL import Image

        from turbodiffusion_core.quant import quantize_model_linears

        c = self.cfg
        self.state.pop("pipe", None)
        free_memory()
        experts = {}
        for i, name in enumerate(("high", "low")):
            m = random_dit(c["i2v_arch"], c["device"], c["dtype"], seed=10 + i)
            quantize_model_linears(m, c["quant"])
            m.quant = c["quant"]
            experts[name] = m
            free_memory()
        d_model = 4096 if c["t5"] == "umt5-xxl" else 32
        stand_in = random_umt5(c["t5"], c["device"], torch.bfloat16 if c["device"] == "cuda" else torch.float32,
                               layers=1, vocab=1024)
        assert stand_in.config.d_model == d_model
        vae = self.run_vae()
        pipe = VideoPipeline.from_modules(
            c["i2v_preset"], text_encoder=text_encoder_from(stand_in, self.workdir), vae=vae, experts=experts,
            device=torch.device(c["device"]), dtype=c["dtype"], attention=c["attention"], quant=c["quant"],
            expert_residency="resident", **PIPE_OPTIONS)
        rng = np.random.default_rng(0)
        image = Image.fromarray((rng.random((c["i2v_image"][1], c["i2v_image"][0], 3)) * 255).astype(np.uint8))
        req = spec.resolve(spec.GenerationRequest(prompt=PROMPTS[2], model=c["i2v_preset"], num_frames=c["frames"],
                                                  steps=4, seed=5, attention_type=c["attention"], sla_topk=0.10))
        out: dict[str, Any] = {"size": req.size, "frames": req.num_frames, "steps": req.steps,
                               "expert_gb": round(sum(t.numel() * t.element_size() for t in
                                                      [*experts["high"].parameters(), *experts["high"].buffers()])
                                                  / 2**30, 3),
                               "note": "text encoder is a 1-layer stand-in; figures are DiT + VAE + activations"}

        frames = {}

        def one(tag: str, folder: str) -> dict:
            reset_peak()
            sync()
            start = time.perf_counter()
            res = pipe.generate(req, image=image, output_dir=self.workdir / folder)
            wall = time.perf_counter() - start
            frames[tag] = res.frames
            return {"wall_s": round(wall, 3), "timings": {k: round(v, 4) for k, v in res.timings.items()},
                    "experts": res.info.get("experts"), "moves": res.info.get("expert_residency"), **peak()}

        # warm-up at this shape: one step runs the same DiT kernels (both experts share every shape),
        # the VAE encode and decode; the measured runs below then start warm
        pipe.generate(req.model_copy(update={"steps": 1}), image=image, output_dir=self.workdir / "i2v_warm")
        out["resident"] = one("resident", "i2v_r")
        self.save()
        start = time.perf_counter()
        pipe.set_expert_residency("swap")
        sync()
        out["swap_setup_s"] = round(time.perf_counter() - start, 2)
        free_memory()
        out["swap"] = one("swap", "i2v_s")
        out["swap"]["residency"] = pipe.residency.describe()
        diff = np.abs(frames["resident"].astype(np.int16) - frames["swap"].astype(np.int16))
        out["swap_vs_resident_frames"] = {"identical": bool(diff.max() == 0), "max_abs_diff": int(diff.max()),
                                          "mean_abs_diff": round(float(diff.mean()), 4)}
        r, s = out["resident"]["timings"], out["swap"]["timings"]
        steps = [f"step_{i}" for i in range(1, 5)]
        out["dit_step_s_resident"] = [r.get(k) for k in steps]
        out["dit_step_s_swap"] = [s.get(k) for k in steps]
        if all(k in r and k in s for k in steps):
            out["switch_cost_s"] = round(sum(s[k] for k in steps) - sum(r[k] for k in steps), 4)
        # the unhidden cost: one expert moved in with nothing to overlap it
        sync()
        start = time.perf_counter()
        pipe.residency.ensure("low")
        sync()
        out["sync_switch_s"] = round(time.perf_counter() - start, 3)
        out["h2d_gb_per_s"] = round(out["expert_gb"] / max(out["sync_switch_s"], 1e-9), 1)
        pipe.residency.ensure("high")
        sync()
        pipe = experts = None  # noqa: F841
        return out

    def compile_section(self) -> dict:
        pipe = self.state.get("pipe")
        if pipe is None or pipe.text_encoder is None:
            raise RuntimeError("needs the T2V pipeline of the earlier sections (run with the text encoder on GPU)")
        c = self.cfg
        compiled = VideoPipeline.from_modules(
            c["t2v_preset"], text_encoder=pipe.text_encoder, vae=pipe.vae, experts=pipe.experts,
            device=pipe.device, dtype=pipe.dtype, attention=pipe.attention, quant=pipe.quant, compile_dit=True,
            **PIPE_OPTIONS)
        start = time.perf_counter()
        compiled.warmup()
        out = {"compile_warmup_s": round(time.perf_counter() - start, 2)}
        runs = [self._run(compiled, PROMPTS[3] + f" (compiled {i})", self.workdir / f"k{i}") for i in range(3)]
        out["to_mp4_s_median"] = med([r["to_mp4_s"] for r in runs])
        out["stage_median_s"] = median_timings([r["timings"] for r in runs])
        return out

    # --- driver --------------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        only = set(a.only.split(",")) if a.only else None

        def want(name: str) -> bool:
            return only is None or name in only

        t2v_1b = [n for n in ("build", "baseline_dit", "vae", "warmup", "e2e_t5_gpu", "e2e_t5_cpu", "baseline")
                  if want(n)]
        if t2v_1b:
            self.section("build", self.build)
        if want("baseline_dit"):
            self.section("baseline_dit", self.baseline_dit)
        if want("vae"):
            self.section("vae", self.vae)
        self.state.pop("vae32", None)
        if want("warmup") or want("e2e_t5_gpu") or want("e2e_t5_cpu"):
            self.section("warmup", self.pipeline)
        if "pipe" in self.state:
            if want("e2e_t5_gpu"):
                self.section("e2e_t5_gpu", self.e2e_t5_gpu)
            if a.compile:
                self.section("compile", self.compile_section, need_s=60)
            if want("e2e_t5_cpu"):
                self.section("e2e_t5_cpu", self.e2e_t5_cpu)
        if want("baseline"):
            self.section("baseline", self.baseline)
        if (only is not None and "t2v_14b" in only) or a.with_14b:
            self.section("t2v_14b", self.t2v_14b, need_s=0 if a.smoke else 120)
        if not a.no_i2v and want("i2v_a14b"):
            self.section("i2v_a14b", self.i2v, need_s=0 if a.smoke else 150)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.save()
        self.print_table()

    def print_table(self) -> None:
        s = self.result["sections"]

        def get(sec: str, key: str):
            v = s.get(sec, {}).get(key)
            return "-" if v is None else v

        print(f"\n{self.result['gpu']}, torch {self.result['torch']}  ({self.result['seconds']} s)")
        label = f"{self.cfg['attention']}+{self.cfg['quant']}"
        rows = [
            (f"T2V 1.3B 480p 81f 4 steps {label}: request -> MP4 (median)", get("e2e_t5_gpu", "to_mp4_s_median"), "s"),
            ("  all outputs (MP4 + thumbnail + spritesheet)", get("e2e_t5_gpu", "all_outputs_s_median"), "s"),
            ("  same prompt again (prompt cache hit)", get("e2e_t5_gpu", "cache_hit_to_mp4_s"), "s"),
            ("  without overlap (frames, then files)", s.get("e2e_t5_gpu", {}).get("not_overlapped", {}).get("total_s", "-"), "s"),
            ("  peak GPU memory, text encoder on GPU", get("e2e_t5_gpu", "peak_allocated_gb"), "GiB"),
            ("  peak GPU memory, text encoder on CPU", get("e2e_t5_cpu", "peak_allocated_gb"), "GiB"),
            ("  new prompt with the encoder on CPU (estimate)", get("e2e_t5_cpu", "cache_miss_to_mp4_s_estimate"), "s"),
            ("  steady state per video, full queue", get("e2e_t5_gpu", "steady_state_s_per_video"), "s"),
            ("  videos per hour per GPU", get("e2e_t5_gpu", "videos_per_hour"), ""),
            ("  warm-up at load", get("warmup", "warmup_s"), "s"),
            ("Original Wan 1.3B, 50 steps CFG, diffusers (estimated)", get("baseline", "baseline_e2e_s"), "s"),
            ("  diffusers DiT forward", get("baseline_dit", "forward_s"), "s"),
            ("  speedup end to end", get("baseline", "speedup"), "x"),
            ("VAE decode 480p 81f: ours", get("vae", "ours_decode_s"), "s"),
            ("  diffusers AutoencoderKLWan", get("vae", "diffusers_decode_s"), "s"),
            ("  rel err ours vs diffusers", get("vae", "rel_err_ours_vs_diffusers"), ""),
        ]
        if "t2v_14b" in s:
            t = s["t2v_14b"]
            rows += [
                (f"T2V 14B 720p 81f 4 steps {label}: request -> MP4 (median)", t.get("to_mp4_s_median", "-"), "s"),
                ("  stages (median)", t.get("stage_median_s", "-"), "s"),
                ("  peak GPU memory, text encoder on GPU", t.get("peak_allocated_gb", "-"), "GiB"),
            ]
        if "i2v_a14b" in s:
            i = s["i2v_a14b"]
            rows += [
                ("I2V A14B 720p 81f 4 steps fp8: DiT steps, resident", i.get("dit_step_s_resident", "-"), "s"),
                ("  DiT steps, swap", i.get("dit_step_s_swap", "-"), "s"),
                ("  switch cost (swap - resident, 4 steps)", i.get("switch_cost_s", "-"), "s"),
                ("  unhidden switch (sync copy of one expert)", i.get("sync_switch_s", "-"), "s"),
                ("  peak GPU memory resident / swap", f"{i.get('resident', {}).get('peak_allocated_gb', '-')} / "
                                                       f"{i.get('swap', {}).get('peak_allocated_gb', '-')}", "GiB"),
                ("  request -> outputs resident / swap", f"{i.get('resident', {}).get('wall_s', '-')} / "
                                                         f"{i.get('swap', {}).get('wall_s', '-')}", "s"),
            ]
        if "compile" in s:
            rows.append(("torch.compile: request -> MP4 (median)", get("compile", "to_mp4_s_median"), "s"))
        for label, value, unit in rows:
            print(f"{label:62} {value!s:>24} {unit}")
        for name, sec in s.items():
            if "error" in sec:
                print(f"ERROR in {name}: {sec['error'][:300]}")
            if "skipped" in sec:
                print(f"skipped {name}: {sec['skipped']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e.json")
    ap.add_argument("--requests", type=int, default=5, help="back-to-back requests in the e2e section")
    ap.add_argument("--no-i2v", action="store_true", help="skip the Wan2.2 I2V A14B section")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile of the DiT forward")
    ap.add_argument("--only", default=None,
                    help="comma-separated sections to run (build, baseline_dit, vae, warmup, e2e_t5_gpu, e2e_t5_cpu, "
                         "baseline, t2v_14b, i2v_a14b); default: all of them except t2v_14b (see --with-14b)")
    ap.add_argument("--with-14b", action="store_true", help="also the 14B T2V 720p section (t2v_14b)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="sections that would not finish within this many seconds are skipped")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    ap.add_argument("--attention", default=None, choices=["sla", "sagesla", "auto", "original"],
                    help="attention backend of the pipelines (default sla, our Triton kernel; auto: what a worker "
                         "picks by default)")
    ap.add_argument("--quant", default=None, choices=["fp8", "int8"],
                    help="the DiTs' block linears (default fp8; int8: per channel, the Gluon GEMM on Hopper)")
    ap.add_argument("--memory-cap-gb", type=float, default=None,
                    help="t2v_14b: once the models are built (in bf16, then quantized: the bench's own way, not the "
                         "loader's), keep the text encoder in fp8 on the GPU (placement gpu-fp8) and let the process "
                         "use at most this many GB (10^9 bytes) of the GPU for the warm-up and the requests, as if "
                         "the card were that small (torch.cuda.set_per_process_memory_fraction): a run that "
                         "finishes fits")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    if args.memory_cap_gb is not None and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        if args.memory_cap_gb * 1e9 > total:
            print(f"--memory-cap-gb {args.memory_cap_gb} is more than the GPU's {total / 1e9:.1f} GB", file=sys.stderr)
            return 2
    # Global backend switches as the worker sets them: no TF32; cuDNN's algorithm search only when
    # TD_CUDNN_BENCHMARK asks for it (worker.residency.EngineOptions, as the VAE's frames per pass).
    torch.backends.cudnn.benchmark = torch.cuda.is_available() and WORKER_OPTIONS.decode_args["cudnn_benchmark"]
    if args.smoke:
        torch.set_flush_denormal(True)
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
