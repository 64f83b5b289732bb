"""`turbodiffusion`: one command, several subcommands.

    turbodiffusion generate --model tiny-t2v --prompt "a cat" --out cat.mp4   prompt -> MP4 on this machine
    turbodiffusion models                                                    presets, and which are on disk
    turbodiffusion download turbowan2.1-t2v-1.3b-480p                        fetch a preset's files
    turbodiffusion serve                                                     API + Redis + worker, one process
    turbodiffusion worker --model ...                                        a GPU worker for a shared Redis
    turbodiffusion webhook-worker                                            delivers signed webhooks

A thin dispatcher: `generate`, `models` and `download` call the engine; `serve`, `worker` and
`webhook-worker` are registered by the server and worker packages. Heavy imports happen inside the
subcommand that needs them, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from turbodiffusion_core import spec


def _models_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", type=Path, default=None,
                   help="folder holding one sub-folder per model (default: $TD_MODELS_DIR or ./models)")


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate one video from a prompt (and an image for I2V models)",
        description="Generate one video on this machine and write it as MP4. Without a GPU, use --model tiny-t2v "
                    "(random weights, written on first use) to try the whole path in seconds.",
    )
    p.add_argument("--model", default="tiny-t2v", choices=list(spec.PRESETS), help="model preset (default tiny-t2v)")
    p.add_argument("--prompt", required=True, help="what the video shows (any language; long English prompts work best)")
    p.add_argument("--image", type=Path, help="first frame for image-to-video models (JPEG/PNG/WebP)")
    p.add_argument("--extend", type=Path, metavar="VIDEO",
                   help="continue this MP4 with an image-to-video model from its last frame, at its size; --out "
                        "gets the whole clip (VIDEO followed by the new --num-frames / --seconds)")
    p.add_argument("--seed", type=int, default=0, help="0 draws a random seed (printed); any other value reproduces")
    p.add_argument("--num-frames", type=int, help="4k+1 frames at 16 fps (81 = 5 s); default from the preset")
    p.add_argument("--seconds", type=float, help="length in seconds instead of --num-frames")
    p.add_argument("--resolution", help="480p or 720p (tiny presets: tiny)")
    p.add_argument("--aspect-ratio", choices=spec.ASPECT_RATIOS, help="default 16:9")
    p.add_argument("--size", help="WIDTHxHEIGHT instead of resolution + aspect ratio, e.g. 832x480")
    p.add_argument("--steps", type=int, help="denoising steps (rCM models 1-4, default 4; original Wan 50)")
    p.add_argument("--sigma-max", type=float, help="initial rCM sigma (default 80 T2V, 200 I2V)")
    p.add_argument("--attention", default=None, choices=spec.ATTENTION_TYPES, help="attention backend (default auto)")
    p.add_argument("--sla-topk", type=float, help="fraction of key blocks SLA keeps (0.05 draft, 0.10 default, 0.15 quality)")
    p.add_argument("--quant", choices=(*spec.QUANT_MODES, "auto"),
                   help="quantized linears: int8 (TurboDiffusion -quant format), fp8, none (bf16), or auto (bf16 if "
                        "it fits in free GPU memory beside the text encoder, else fp8/int8; see `turbodiffusion plan`)")
    p.add_argument("--ode", action="store_true", help="deterministic ODE sampling instead of SDE (I2V)")
    p.add_argument("--boundary", type=float, help="I2V: switch to the low-noise expert below this RF time (0.5-1.0, default 0.9)")
    p.add_argument("--adaptive-resolution", action="store_true", help="I2V: keep the image's aspect ratio at the preset's area")
    p.add_argument("--negative-prompt", help="original Wan models only: what to steer away from")
    p.add_argument("--guidance-scale", type=float, help="original Wan models only: CFG scale (default 5)")
    p.add_argument("--shift", type=float, help="original Wan models only: flow shift (default 5)")
    p.add_argument("--out", type=Path, default=Path("output.mp4"), help="MP4 to write (default output.mp4)")
    p.add_argument("--extras", action="store_true", help="also write the thumbnail (.webp) and spritesheet (.jpg) beside it")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--gpus", help="one video on several GPUs (sequence parallel), e.g. 0,1,2,3; also works under "
                                  "torchrun --nproc-per-node N -m turbodiffusion generate ...")
    _models_dir_arg(p)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from tqdm import tqdm

    from turbodiffusion_core.errors import EngineError
    from turbodiffusion_core.pipeline import load_pipeline

    try:
        request = spec.GenerationRequest(
            prompt=args.prompt, model=args.model, seed=args.seed, num_frames=args.num_frames, seconds=args.seconds,
            resolution=args.resolution, aspect_ratio=args.aspect_ratio, size=args.size, steps=args.steps,
            sigma_max=args.sigma_max, attention_type=args.attention, sla_topk=args.sla_topk,
            quant=None if args.quant == "auto" else args.quant,
            ode=args.ode, boundary=args.boundary, adaptive_resolution=args.adaptive_resolution,
            negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale, shift=args.shift,
        )
        image = prefix = None
        if args.image is not None and args.extend is not None:
            raise ValueError("give either --image or --extend: an extension starts from the video's last frame")
        if args.image is not None:
            from PIL import Image

            image = Image.open(args.image)
            image.load()
            request.image_width, request.image_height = image.size
        if args.extend is not None:
            from PIL import Image

            from turbodiffusion_core.video import read_video_frames

            if spec.get_preset(request.model).task != "i2v":
                raise ValueError(f"--extend needs an image-to-video --model; {request.model} is text-to-video")
            prefix = read_video_frames(args.extend)
            image = Image.fromarray(prefix[-1])
            request.image_width, request.image_height = image.size
            if not (request.size or request.resolution or request.aspect_ratio):
                request.size = spec.format_size(*image.size)
        resolved = spec.resolve(request)
        if prefix is not None and (resolved.width, resolved.height) != image.size:
            raise ValueError(f"{args.extend} is {image.size[0]}x{image.size[1]}; an extension keeps that size "
                             f"(got {resolved.size})")
        if resolved.task == "i2v" and image is None:
            raise ValueError(f"{resolved.model} is an image-to-video model: give the first frame with --image")
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except spec.SpecError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    try:
        from turbodiffusion_core.parallel.launch import launched_by_torchrun, parallel_pipeline

        if args.gpus or launched_by_torchrun():
            pipe = parallel_pipeline(resolved.model, gpus=args.gpus, device=args.device, models_dir=args.models_dir,
                                     attention=args.attention or "auto", quant=args.quant)
            if pipe is None:  # a torchrun rank other than 0: it ran its share of every DiT step for rank 0
                return 0
        else:
            pipe = load_pipeline(resolved.model, models_dir=args.models_dir, device=args.device,
                                 attention=args.attention or "auto", quant=args.quant)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    load_s = time.perf_counter() - started

    bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n_fmt}% [{elapsed}<{remaining}]")

    def on_progress(ev: spec.ProgressEvent) -> None:
        label = ev.stage if ev.step is None else f"{ev.stage} {ev.step}/{ev.total_steps}"
        bar.set_description(label)
        bar.update(max(0, ev.percent - bar.n))

    # The MP4 is encoded on a thread while the VAE decodes (the same path the workers use).
    variants = ("video", "thumbnail", "spritesheet") if args.extras else ("video",)
    result = pipe.generate(resolved, image=image, on_progress=on_progress, output_dir=args.out.parent,
                           stem=args.out.stem, variants=variants, prefix_frames=prefix)
    bar.update(100 - bar.n)
    bar.close()
    for variant, path in sorted(result.files.items()):
        if variant != "video":
            print(f"wrote {path}")
    out = result.files["video"]
    print(f"wrote {out} ({result.num_frames} frames, {result.width}x{result.height}, {spec.FPS} fps)")
    print(f"seed: {result.seed}")
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"timings: load {load_s:.2f}s, {stages}")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list model presets and whether their files are on disk")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _models_dir_arg(p)
    p.set_defaults(func=_cmd_models)


def _cmd_models(args) -> int:
    models_dir = args.models_dir or spec.default_models_dir()
    rows = []
    for preset in spec.PRESETS.values():
        present = not spec.missing_files(preset, models_dir, quant="int8")
        quant = any(preset.local_path(models_dir, f).exists() for f in preset.files if f.role.endswith("_quant"))
        state = "present" if present else ("written on first use" if preset.tiny else "not downloaded")
        rows.append({**preset.describe(), "local": state, "int8_file": quant})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["id"]) for r in rows)
    print(f"{'model'.ljust(width)}  task  sampler  steps  resolutions   local")
    for r in rows:
        print(f"{r['id'].ljust(width)}  {r['task']}   {r['sampler'].ljust(7)}  {r['default_steps']:>5}  "
              f"{','.join(r['resolutions']).ljust(12)}  {r['local']}")
    print(f"\nmodels dir: {models_dir.resolve()}")
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="what each preset becomes on a GPU of a given size (quantization, text encoder, experts)",
        description="For each GPU memory size, what a worker with --quant auto, TD_TEXT_ENCODER=auto and "
                    "TD_EXPERT_RESIDENCY=auto would choose for each preset, with the weights on the GPU and the "
                    "estimated peak (weights + the working-memory reserve). Weight sizes are exact; the peak is "
                    "an estimate calibrated on the 1.3B 480p measurement. Loads nothing.",
    )
    p.add_argument("--gpu-gb", default="16,24,40,80", help="comma-separated free GPU memory sizes in GiB "
                                                           "(default %(default)s)")
    p.add_argument("--model", action="append", choices=[k for k in spec.PRESETS if not spec.PRESETS[k].tiny],
                   help="preset(s) to plan (default: every non-tiny preset)")
    p.add_argument("--no-fp8", action="store_true", help="plan with int8 rather than fp8 for the quantized linears (the same size; the loader picks "
                        "int8 on Hopper and before Ada, fp8 on other GPUs)")
    p.add_argument("--text-encoder", default="auto", choices=("auto", "gpu", "gpu-fp8", "cpu"),
                   help="text encoder placement to plan with (TD_TEXT_ENCODER; default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args) -> int:
    from turbodiffusion_core.memory_plan import plan

    try:
        sizes = [float(s) for s in args.gpu_gb.split(",") if s.strip()]
    except ValueError:
        print(f"error: --gpu-gb takes numbers like 16,24,40; got {args.gpu_gb!r}", file=sys.stderr)
        return 2
    models = args.model or [k for k, p in spec.PRESETS.items() if not p.tiny]
    rows = [plan(m, gb, fp8_ok=not args.no_fp8, text_encoder=args.text_encoder) for m in models for gb in sizes]
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    width = max(len(r.model) for r in rows)
    print(f"{'model'.ljust(width)}  GPU GB  quant  text enc.  experts    weights GB  peak GB (est.)  fits")
    for r in rows:
        print(f"{r.model.ljust(width)}  {r.gpu_gb:>6g}  {(r.quant or 'bf16'):5}  {r.text_encoder:9}  "
              f"{r.expert_residency:9}  {r.weights_gb:>10.1f}  {r.peak_gb:>14.1f}  {'yes' if r.fits else 'NO'}")
    return 0


def _add_download(sub) -> None:
    p = sub.add_parser(
        "download", help="download the files a preset needs from the Hugging Face Hub (resumable)",
        description="Fetch exactly the files a preset needs (DiT checkpoint, Wan2.1 VAE, umT5 encoder, tokenizer) "
                    "into MODELS_DIR. Interrupted downloads resume. Set HF_TOKEN for gated repos.",
    )
    p.add_argument("model", choices=[p for p in spec.PRESETS if not spec.PRESETS[p].tiny])
    p.add_argument("--quant", action="store_true", help="also fetch the released int8 -quant checkpoint(s)")
    p.add_argument("--quant-only", action="store_true", help="fetch only the -quant checkpoint(s), not the bf16 ones")
    p.add_argument("--dry-run", action="store_true", help="print the plan without downloading")
    _models_dir_arg(p)
    p.set_defaults(func=_cmd_download)


def _cmd_download(args) -> int:
    from turbodiffusion_core.download import download, download_plan

    preset = spec.get_preset(args.model)
    models_dir = args.models_dir or spec.default_models_dir()
    quant = args.quant or args.quant_only
    plan = download_plan(preset, models_dir, quant=quant, bf16=not args.quant_only)
    for item in plan:
        print(f"{item.repo}:{item.repo_path}{'/' if item.folder else ''} -> {item.local_path}")
    if args.dry_run:
        return 0
    download(preset, models_dir, quant=quant, bf16=not args.quant_only, token=os.environ.get("HF_TOKEN"))
    print(f"{preset.id}: ready in {models_dir / preset.local_folder}")
    return 0


# Subcommands owned by the server and worker packages: (module, what it adds).
_REGISTERED = ("server.launcher", "worker.main", "worker.webhook_worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbodiffusion",
        description="Text/image-to-video with Wan2.1/Wan2.2 + TurboDiffusion (rCM, SLA, quantized linears), "
                    "as a CLI and as an OpenAI-compatible /v1/videos server.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_models(sub)
    _add_plan(sub)
    _add_download(sub)
    for module in _REGISTERED:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a package still being written must not break the engine commands
            if e.name and module.startswith(e.name):
                continue
            raise
        mod.register_cli(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # TD_LOG_LEVEL (the servers' setting) applies to every subcommand; -v overrides it
    level = "DEBUG" if args.verbose else os.environ.get("TD_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
