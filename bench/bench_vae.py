"""GPU check + timing of our WanVAE vs diffusers AutoencoderKLWan (same random weights)."""
import json, sys, time
import torch

sys.path.insert(0, ".")
from turbodiffusion_core.models.vae import VAE_CONFIGS, WanVAE

KEYS = "tests/data/keys/wan-to-diffusers-vae-map.json"
MAP = {k: v["to"] for k, v in json.load(open(KEYS))["tensors"].items()}
from diffusers import AutoencoderKLWan

dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version(), flush=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(cfg, seed=0):
    torch.manual_seed(seed)
    ours = WanVAE(cfg).eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.05)
        ours.decoder.head[2].weight.mul_(0.3)
    theirs = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim).eval()
    theirs.load_state_dict({MAP[k]: v for k, v in ours.state_dict().items()}, strict=True)
    return ours, theirs


mean = torch.tensor(VAE_CONFIGS["wan2.1"].latent_mean, device=dev).view(1, -1, 1, 1, 1)
std = torch.tensor(VAE_CONFIGS["wan2.1"].latent_std, device=dev).view(1, -1, 1, 1, 1)

# 1) correctness on GPU, real channel widths, small frames, fp32 without TF32
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
ours, theirs = make(VAE_CONFIGS["wan2.1"])
ours.to(dev); theirs.to(dev)
z = torch.randn(2, 16, 3, 16, 24, device=dev)
vid = torch.rand(2, 3, 9, 128, 192, device=dev) * 2 - 1
with torch.no_grad():
    ref = theirs.decode(z * std + mean).sample
    eref = (theirs.encode(vid).latent_dist.mode() - mean) / std
print("fp32 contiguous: decode rel err vs diffusers", rel(ours.decode(z), ref), "encode", rel(ours.encode(vid), eref))
ours.use_channels_last()
print("fp32 CL fused:   decode rel err vs diffusers", rel(ours.decode(z), ref), "encode", rel(ours.encode(vid), eref))
ours.to(torch.bfloat16)
print("bf16 CL fused:   decode rel err vs fp32 diffusers", rel(ours.decode(z).float(), ref), "encode", rel(ours.encode(vid), eref))
with torch.no_grad():
    theirs.to(torch.bfloat16)
    print("diffusers bf16:  decode rel err vs its fp32", rel(theirs.decode((z * std + mean).bfloat16()).sample.float(), ref),
          "encode", rel((theirs.encode(vid.bfloat16()).latent_dist.mode().float() - mean) / std, eref), flush=True)
torch.backends.cudnn.allow_tf32 = True
torch.backends.cuda.matmul.allow_tf32 = True
del ours, theirs
torch.cuda.empty_cache()

# 2) timing at 480p, 81 frames
ours, theirs = make(VAE_CONFIGS["wan2.1"], seed=1)
ours.to(dev, torch.bfloat16); theirs.to(dev, torch.bfloat16)
lat = torch.randn(1, 16, 21, 60, 104, device=dev)
REPS = 3


def timeit(name, fn):
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(REPS):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    ts.sort()
    print(f"{name:45s} median {ts[len(ts)//2]*1000:8.1f} ms  min {ts[0]*1000:8.1f}  peak {torch.cuda.max_memory_allocated()/2**30:6.2f} GiB", flush=True)
    return out


with torch.no_grad():
    d = timeit("diffusers decode bf16", lambda: theirs.decode((lat * std + mean).bfloat16()).sample)
o = timeit("ours decode bf16 contiguous (no fusion)", lambda: ours.decode(lat))
ours.use_channels_last()
o2 = timeit("ours decode bf16 channels_last_3d (fused)", lambda: ours.decode(lat))
print("  ours CL vs diffusers rel err", rel(o2, d), " contiguous vs diffusers", rel(o, d))
import turbodiffusion_core.models.vae as V
V.TAP_SPLIT_MAX_CHANNELS = 0
timeit("ours decode bf16 CL, no tap split", lambda: ours.decode(lat))
V.TAP_SPLIT_MAX_CHANNELS = 96
V.TAP_SPLIT_MAX_CHANNELS = 0
video = torch.rand(1, 3, 81, 480, 832, device=dev, dtype=torch.bfloat16) * 2 - 1
timeit("ours encode bf16 CL, no tap split", lambda: ours.encode(video))
V.TAP_SPLIT_MAX_CHANNELS = 96

with torch.no_grad():
    timeit("diffusers encode bf16", lambda: theirs.encode(video).latent_dist.mode())
timeit("ours encode bf16 CL", lambda: ours.encode(video))

from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA], record_shapes=True) as prof:
    ours.decode(lat)
    torch.cuda.synchronize()
rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
for e in rows[:10]:
    print(f"{e.device_time_total/1e3:9.1f} ms  n={e.count:5d}  {e.key[:100]}")
print("--- by input shape (copies, convs)")
rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.device_time_total)
for e in [r for r in rows if r.key.startswith("aten::")][:14]:
    print(f"{e.device_time_total/1e3:9.1f} ms  n={e.count:5d}  {e.key[:30]} {str(e.input_shapes)[:120]}")
