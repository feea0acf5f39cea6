"""
bench.py: what a training step costs. Median of timed steps after warm-up; images/s, achieved
TFLOP/s from the FLOPs functions in hieratok.py, MFU against the GPU's bf16 peak, peak memory.

  python bench.py                                   # CPU: reduced-width paper geometry, all parts
  python bench.py --preset paper-f16d16 --batch 32 --compile --parts tokenizer lpips gan dit
  python bench.py --parts ratio data                # multi/single ratio, data loader
  python bench.py --preset cpu-64 --dec_depth 8 --parts tokenizer   # any config field is a flag

Parts:
  tokenizer   generator step (forward, backward, AdamW) without LPIPS
  lpips       the same with LPIPS (--lpips_net vgg | alex; its ImageNet weights, found offline)
  gan         the GAN stage's discriminator step (PatchGAN, hinge; FLOPs from torch's counter) and
              generator step (+ adversarial term and adaptive weight; tokenizer FLOPs only)
  dit         a DiT step on the preset's latent, DDPM and flow matching, and their time ratio
  ratio       multi-scale / single-scale step time of the same preset beside their FLOP ratio
  progressive decoding z up to each scale (HieraTok.decode(z, upto=k)) against the full decode
  data        ImageFolder pipeline (decode + ADM crop) images/s in one process = per loader worker
  checkpoint  bytes and seconds of a checkpoint write (the GAN stage's; the DiT's with its EMA) to
              --write_dir: the grace period a preempted run needs (paper presets: 11 GB of memory)
  profile     torch.profiler table of the tokenizer step's costliest kernels
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

import hieratok as H
import runtime as R

REDUCED = dict(enc_dim=192, enc_heads=3, dec_dim=256, dec_heads=4, drop_path=0.0)
pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
pre.add_argument("--preset", default="reduced")
named = pre.parse_known_args()[0].preset
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.error = lambda msg: parser.exit(2, f"error: {msg}\n")        # one line, not the usage
arg = parser.add_argument
arg("--preset", default="reduced", help="tokenizer preset, or 'reduced': the paper's geometry (256 "
    "px, patch 16, 6 + 24 blocks, 341 tokens) at widths 192 / 256, small enough for a CPU")
arg("--dit_preset", default=None, help="DiT preset (default XL for paper presets, tiny otherwise)")
arg("--batch", type=int, default=None, help="images per step (default 32 on CUDA, 4 on CPU)")
arg("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast on CUDA; CPU "
    "runs fp32")
arg("--compile", action="store_true", help="torch.compile the models")
arg("--warmup", type=int, default=None, help="untimed steps (default 5 on CUDA, 2 on CPU; more "
    "with compile)")
arg("--iters", type=int, default=None, help="timed steps (default 30 on CUDA, 5 on CPU)")
arg("--parts", nargs="+", default=["tokenizer", "lpips", "gan", "dit", "ratio", "data",
                                   "progressive"])
arg("--out", default=None, help="append the results as JSON lines to this file")
arg("--write_dir", default=None, help="checkpoint part: where to write (default: the temp dir; "
    "give the file system the runs write to)")
R.add_config_flags(parser, H.HieraTokConfig,
                   REDUCED if named == "reduced" else H.TOKENIZER_PRESETS.get(named, {}))
args = parser.parse_args()
if args.write_dir and not os.path.isdir(args.write_dir):
    parser.error(f"--write_dir {args.write_dir} is not a directory")

_, _, _, device, amp = R.setup(precision=args.precision)
cuda = device.type == "cuda"
batch = args.batch or (32 if cuda else 4)
warmup = args.warmup or ((10 if args.compile else 5) if cuda else 2)
iters = args.iters or (30 if cuda else 5)
peak_flops = R.peak_flops(device)
GROUP = 5                                     # steps per timed group on CUDA (see timed)
results = []


def tok_cfg(**kw):
    """The preset with the config flags given on the command line, then `kw`, on top."""
    over = {**R.config_overrides(args, H.HieraTokConfig), **kw}
    if args.preset == "reduced":
        return H.tokenizer_config("paper-f16d16", **{**REDUCED, **over})
    return H.tokenizer_config(args.preset, **over)


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(*steps, n_warm=None, n_iter=None):
    """Median seconds per step after warm-up. On CUDA steps run in back-to-back groups of
    GROUP with one sync per group, as in train.py, which never syncs inside the loop: a sync after
    every step would idle the GPU while the CPU launches the next step's first kernels. Several
    steps are timed interleaved (group by group), so a drift in machine speed affects them alike."""
    group = GROUP if cuda else 1
    for _ in range(warmup if n_warm is None else n_warm):
        for step in steps:
            step()
    sync()
    times = [[] for _ in steps]
    for _ in range(max(1, (iters if n_iter is None else n_iter) // group)):
        for step, ts in zip(steps, times):
            t = time.perf_counter()
            for _ in range(group):
                step()
            sync()
            ts.append((time.perf_counter() - t) / group)
    meds = [statistics.median(ts) for ts in times]
    return meds[0] if len(steps) == 1 else meds


def report(name, sec, flops_per_image=None, n=None):
    n = n or batch
    row = {"part": name, "device": torch.cuda.get_device_name() if cuda else "cpu", "batch": n,
           "precision": args.precision if cuda else "fp32", "compile": args.compile,
           "step_ms": sec * 1e3, "img_per_s": n / sec}
    if flops_per_image:
        row["tflops"] = flops_per_image * n / sec / 1e12
        if peak_flops:
            row["mfu"] = row["tflops"] * 1e12 / peak_flops
    if cuda:
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    results.append(row)
    extra = "".join(f" | {k} {row[k]:.3g}" for k in ("tflops", "mfu", "peak_mem_gb") if k in row)
    print(f"{name:<28} {row['step_ms']:9.1f} ms | {row['img_per_s']:8.1f} img/s{extra}", flush=True)
    return row


def adamw(model):
    return torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4,
                             fused=True)


def tokenizer_step(cfg, lpips=None, disc=None):
    """One generator step as train.py runs it, with the GAN stage's adversarial term and its
    adaptive weight when a (frozen) discriminator is given; returns a closure."""
    model = H.HieraTok(cfg).to(device).train()
    fwd = torch.compile(model) if args.compile else model
    opt = adamw(model)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1

    def step():
        with amp:
            loss = H.generator_loss(cfg, x, fwd(x), lpips, disc=disc, gan_weight=0.6)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_tokenizer(lpips_on):
    cfg = tok_cfg(lpips_weight=1.0 if lpips_on else 0.0)
    lp = R.build_lpips(cfg.lpips_net).to(device) if lpips_on else None
    if lp is not None and args.compile:
        lp = torch.compile(lp)
    sec = timed(tokenizer_step(cfg, lp))
    name = f"tokenizer{' + lpips-' + cfg.lpips_net if lpips_on else ''} ({args.preset})"
    report(name, sec, 3 * H.tokenizer_flops(cfg))


def bench_gan():
    cfg = tok_cfg()
    disc = H.Discriminator().to(device)
    d = torch.compile(disc) if args.compile else disc
    opt = adamw(disc)
    x = torch.rand(2 * batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    flops = H.count_flops(lambda: disc(x[:1]).sum().backward())   # per image, forward + backward
    disc.zero_grad(set_to_none=True)

    def step():
        with amp:
            d_loss = H.hinge_d_loss(*d(x).float().chunk(2))
        d_loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    report("discriminator step", timed(step), flops, n=2 * batch)
    frozen = H.Discriminator().to(device).requires_grad_(False)      # eager, as in train.py
    report(f"GAN generator step ({args.preset})", timed(tokenizer_step(cfg, disc=frozen)),
           3 * H.tokenizer_flops(cfg))


def dit_step(objective):
    cfg = dit_cfg(objective)
    model = H.DiT(cfg).to(device).train()
    fwd = torch.compile(model) if args.compile else model
    opt = adamw(model)
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def step():
        with amp:
            loss = H.dit_loss(fwd, cfg, z, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def dit_cfg(objective):
    name = args.dit_preset or ("XL" if args.preset.startswith("paper") else "tiny")
    return H.dit_config(name, tok_cfg(), objective=objective)


def bench_dit():
    """A DiT step with each objective, timed interleaved: DDPM's 2C output channels and its
    variational term against flow matching's velocity."""
    cfgs = [dit_cfg(o) for o in ("ddpm", "flow")]
    secs = timed(*[dit_step(c.objective) for c in cfgs])
    for cfg, sec in zip(cfgs, secs):
        report(f"DiT step, {cfg.objective} ({cfg.depth} x {cfg.dim})", sec, 3 * H.dit_flops(cfg))
    row = {"part": "dit ratio", "ddpm_over_flow": secs[0] / secs[1]}
    results.append(row)
    print(f"DDPM / flow step time: {row['ddpm_over_flow']:.3f}x")


def bench_ratio():
    multi = tok_cfg(lpips_weight=0.0)
    single = tok_cfg(lpips_weight=0.0, scales=(multi.grid,))
    t_multi, t_single = timed(tokenizer_step(multi), tokenizer_step(single))
    f_ratio = H.tokenizer_flops(multi) / H.tokenizer_flops(single)
    report("ratio: multi-scale step", t_multi, 3 * H.tokenizer_flops(multi))
    report("ratio: single-scale step", t_single, 3 * H.tokenizer_flops(single))
    row = {"part": "ratio", "time_ratio": t_multi / t_single, "flop_ratio": f_ratio,
           "time_over_flop": t_multi / t_single / f_ratio}
    results.append(row)
    print(f"multi/single: time {row['time_ratio']:.3f}x, FLOPs {f_ratio:.3f}x -> time/FLOP "
          f"ratio {row['time_over_flop']:.3f}")


@torch.no_grad()
def bench_progressive():
    """Decoding z (latent projection, downsampler, decoder, heads) up to each scale: time and FLOPs
    of every prefix beside the full decode, whose images it gives to float rounding (tested)."""
    cfg = tok_cfg(lpips_weight=0.0)
    model = H.HieraTok(cfg).to(device).eval()
    z = torch.randn(batch, cfg.latent_dim, cfg.grid, cfg.grid, device=device)
    n = len(cfg.scales)

    def decode(k):
        def step():
            with amp:
                model.decode(z, upto=k)
        return step
    secs = timed(*[decode(k) for k in range(1, n + 1)])
    flops = [H.decoder_flops(cfg, k) for k in range(1, n + 1)]   # each counted once (~0.5 s)
    for k, sec, f in zip(range(1, n + 1), secs, flops):
        s = cfg.scales[k - 1]
        row = report(f"decode up to scale {s} ({s * cfg.patch_size} px)", sec, f)
        row.update(upto=k, gflops=f / 1e9, speedup=secs[-1] / sec, flop_ratio=flops[-1] / f)
        print(f"    {row['gflops']:.3f} GFLOPs per image; {row['speedup']:.1f}x faster than the "
              f"full decode ({row['flop_ratio']:.1f}x fewer FLOPs)")


def profile(step):
    for _ in range(warmup):
        step()
    sync()
    kinds = torch.profiler.ProfilerActivity
    acts = [kinds.CPU] + ([kinds.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            step()
        sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))


def bench_data():
    from PIL import Image
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "c"))
        rng = np.random.default_rng(0)
        for i in range(64):                              # ImageNet-like JPEGs: 500x375, quality 90
            arr = rng.random((375, 500, 3)) * 64 + np.linspace(0, 190, 500)[None, :, None]
            arr = arr.astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(root, "c", f"{i}.JPEG"), quality=90)
        ds = R.ImageFolder(root, 256)
        sec = timed(lambda: [ds[i] for i in range(len(ds))], n_warm=1, n_iter=3)
        report("data: decode + ADM crop, 1 worker", sec, n=len(ds))


def stepped_adamw(model):
    """AdamW over `model` after one step of zero gradients: its state as a run's checkpoint has."""
    opt = adamw(model)
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def bench_checkpoint():
    """Bytes and seconds of R.save_checkpoint (one file, fsync, rename) for what train.py writes:
    the GAN stage's tokenizer with AdamW and its discriminator with AdamW, and the DiT with AdamW
    and its EMA, both from CPU memory (a GPU run adds the device-to-host copy)."""
    def gan_state():
        model, disc = H.HieraTok(tok_cfg()), H.Discriminator()
        return dict(model=model.state_dict(), opt=stepped_adamw(model).state_dict(),
                    disc=disc.state_dict(), opt_d=stepped_adamw(disc).state_dict())

    def dit_state():
        model = H.DiT(dit_cfg("ddpm"))
        return dict(model=model.state_dict(), opt=stepped_adamw(model).state_dict(),
                    ema={k: v.clone() for k, v in model.state_dict().items()})  # its own copy
    for name, build in ((f"checkpoint: GAN stage ({args.preset})", gan_state),
                        (f"checkpoint: DiT {dit_cfg('ddpm').depth} x {dit_cfg('ddpm').dim}",
                         dit_state)):
        state = build()
        with tempfile.TemporaryDirectory(dir=args.write_dir) as d:
            path = os.path.join(d, "ckpt.pt")
            t = time.perf_counter()
            R.save_checkpoint(state, path)
            sec, size = time.perf_counter() - t, os.path.getsize(path)
        del state
        results.append({"part": name, "bytes": size, "seconds": sec, "dir": args.write_dir
                        or tempfile.gettempdir()})
        print(f"{name:<28} {size / 2 ** 30:7.2f} GiB in {sec:6.1f} s ({size / 2 ** 20 / sec:.0f} "
              f"MiB/s, {args.write_dir or tempfile.gettempdir()})", flush=True)


PARTS = {"tokenizer": lambda: bench_tokenizer(False), "lpips": lambda: bench_tokenizer(True),
         "gan": bench_gan, "dit": bench_dit, "ratio": bench_ratio, "data": bench_data,
         "checkpoint": bench_checkpoint,
         "progressive": bench_progressive,
         "profile": lambda: profile(tokenizer_step(tok_cfg(lpips_weight=0.0)))}
for part in args.parts:
    if part not in PARTS:
        raise SystemExit(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    PARTS[part]()
if args.out:
    with open(args.out, "a") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")
