"""
train.py: one training loop for HieraTok's three jobs.

  tokenizer   stage 1: L1 + MSE + LPIPS + KL over every scale
  gan         stage 2: stage 1's losses + a PatchGAN (hinge, adaptive weight), from a stage-1 checkpoint
  dit         a DiT with flow matching on the latents of a tokenizer checkpoint

  python train.py                                                     # tiny tokenizer, built-in data, CPU, ~3 min
  python train.py --job dit --tokenizer runs/tokenizer-tiny           # tiny DiT on its latents
  torchrun --nproc_per_node=8 train.py --preset paper-f16d16 --data /data/imagenet/train \
      --lpips_weights vgg16-397923af.pth --epochs 100                 # paper stage 1 (see README for all)

Rerunning a command resumes from the newest checkpoint in its --out directory. Sections below:
arguments, setup (DDP, precision, seeds), data, models, optimizers, resume, loop, checkpoint.
"""

import argparse
import bisect
import contextlib
import copy
import json
import math
import os
import time

import torch
import torch._functorch.config                              # donated_buffer (see --compile below)
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import hieratok as H

# ----------------------------------------------------------------------------------------------
# arguments

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
g = p.add_argument_group("job")
g.add_argument("--job", default="tokenizer", choices=["tokenizer", "gan", "dit"], help="what to train")
g.add_argument("--out", default=None, help="run directory (checkpoints, log.jsonl); default runs/<job>-<preset>")
g.add_argument("--seed", type=int, default=0, help="base seed; rank r uses seed + r")
g = p.add_argument_group("tokenizer model")
g.add_argument("--preset", default="tiny", help=f"tokenizer preset: {', '.join(H.TOKENIZER_PRESETS)}")
g.add_argument("--scales", type=int, nargs="+", default=None, help="override the scale list, e.g. 1 2 4 8 16 (16 = single scale)")
g.add_argument("--downsampler", default=None, choices=["conv", "interp"], help="override the downsampler")
g.add_argument("--attention", default=None, choices=["causal", "independent", "full"], help="override the decoder attention")
g.add_argument("--kl_weight", type=float, default=None, help="override the KL weight (paper 1e-6, ablation 1e-5)")
g.add_argument("--lpips_weight", type=float, default=None, help="override the LPIPS weight (0 turns LPIPS off)")
g.add_argument("--lpips_weights", default=None, help=f"path to torchvision's {H.VGG16_FILE} (else the torch hub cache)")
g = p.add_argument_group("GAN stage")
g.add_argument("--init", default=None, help="stage-1 checkpoint (file or run directory) that the GAN stage starts from")
g.add_argument("--gan_weight", type=float, default=0.6, help="weight of the adversarial term (times the adaptive weight)")
g.add_argument("--disc_start", type=int, default=2000, help="steps of discriminator warm-up before its loss reaches the generator")
g.add_argument("--disc_ramp", type=int, default=2000, help="steps over which the adversarial weight ramps linearly to full")
g.add_argument("--disc_lr", type=float, default=1e-4, help="discriminator peak learning rate")
g.add_argument("--freeze_encoder", action="store_true", help="train only the decoder side, so the latent stays fixed")
g = p.add_argument_group("VF alignment loss (the scaled-up recipe; tokenizer and GAN jobs)")
g.add_argument("--vf_weight", type=float, default=0.0, help="VF loss weight (times its adaptive weight); 0 = off, VA-VAE uses 0.1")
g.add_argument("--vf_model", default="dinov2", choices=["dinov2", "random"], help="frozen feature network (random: smoke tests only)")
g.add_argument("--vf_weights", default=None, help="DINOv2 ViT-B/14 weight file (dinov2_vitb14_pretrain.pth)")
g.add_argument("--vf_repo", default=None, help="local DINOv2 code checkout for torch.hub (default: the torch hub cache)")
g.add_argument("--vf_margin_cos", type=float, default=0.5, help="margin of the per-position cosine term")
g.add_argument("--vf_margin_dist", type=float, default=0.25, help="margin of the distance-matrix term")
g = p.add_argument_group("DiT")
g.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (file or run directory) whose latents the DiT learns")
g.add_argument("--dit_preset", default="tiny", help=f"DiT preset: {', '.join(H.DIT_PRESETS)}")
g.add_argument("--dit_patch", type=int, default=1, help="DiT patch size on the latent grid")
g.add_argument("--t_dist", default="logit_normal", choices=["logit_normal", "uniform"], help="flow-matching time distribution")
g.add_argument("--label_drop", type=float, default=0.1, help="label dropout for classifier-free guidance (stored in the DiT config)")
g.add_argument("--stats_batches", type=int, default=20, help="batches per rank to measure the latent mean / std")
g.add_argument("--cache", default=None, help="latent cache directory: built once (moments of each image and its flip), reused after")
g = p.add_argument_group("data")
g.add_argument("--data", default=None, help="ImageFolder root (root/class/img.jpg); default: the built-in Shapes data")
g.add_argument("--workers", type=int, default=2, help="data-loader processes per rank")
g = p.add_argument_group("optimisation")
g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs, else 300)")
g.add_argument("--epochs", type=float, default=None, help="epochs of the data set, converted to steps")
g.add_argument("--global_batch", type=int, default=256, help="images per optimizer step over all ranks")
g.add_argument("--batch", type=int, default=None, help="images per rank per micro-step (default: global_batch / ranks)")
g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4 as in the paper; 1e-3 for tiny presets)")
g.add_argument("--lr_end", type=float, default=1e-5, help="final learning rate of the tokenizer's cosine schedule")
g.add_argument("--warmup", type=float, default=0.03, help="warm-up as a fraction of the steps (tokenizer)")
g.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay (tokenizer 0.05, DiT 0)")
g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
g.add_argument("--ema", type=float, default=None, help="EMA decay, 0 = off (default: DiT 0.9999, tokenizer off)")
g = p.add_argument_group("system")
g.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
g.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast on CUDA (CPU always runs fp32)")
g.add_argument("--compile", action="store_true", help="torch.compile the model")
g.add_argument("--log_every", type=int, default=25, help="steps between log lines")
g.add_argument("--ckpt_every", type=int, default=200, help="steps between checkpoints")
g.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
g.add_argument("--stop_at", type=int, default=None, help="checkpoint and exit at this step (to fit a job time limit); rerun to go on")
g.add_argument("--deterministic", action="store_true", help="deterministic kernels (for exact-resume tests)")
args = p.parse_args()

# ----------------------------------------------------------------------------------------------
# setup: DDP from the environment (torchrun), else one process

use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
ddp = "RANK" in os.environ
if ddp:
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
else:
    rank, world, local = 0, 1, 0
master = rank == 0
device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
if args.deterministic:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it for reproducible results
    torch.use_deterministic_algorithms(True)
torch.manual_seed(args.seed + rank)
amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" and args.precision == "bf16")
dit_job = args.job == "dit"


def fail(msg):
    """Stop every rank with one clear message (argument and input errors)."""
    if master:
        print(f"error: {msg}", flush=True)
    raise SystemExit(2)


def log(msg):
    if master:
        tqdm.write(msg)


# ----------------------------------------------------------------------------------------------
# models

lpips, disc, tok = None, None, None
try:
    if args.job == "tokenizer":
        over = {k: getattr(args, k) for k in ("scales", "downsampler", "attention", "kl_weight", "lpips_weight")}
        cfg = H.tokenizer_config(args.preset, **{k: v for k, v in over.items() if v is not None})
        preset_name = args.preset
        model = H.HieraTok(cfg)
    elif args.job == "gan":
        if args.init is None:
            fail("the GAN stage starts from a stage-1 checkpoint: pass --init runs/<stage-1 run>")
        init = H.load_checkpoint(H.resolve_checkpoint(args.init), kinds=("tokenizer", "gan"))
        cfg = H.HieraTokConfig(**init["config"])
        preset_name = str(init["args"].get("preset"))            # the stage-1 run's preset
        model = H.HieraTok(cfg)
        model.load_state_dict(init["model"])
        disc = H.Discriminator().to(device)
        if args.freeze_encoder:
            model.encoder.requires_grad_(False)
    else:
        if args.tokenizer is None:
            fail("the DiT job needs a tokenizer: pass --tokenizer runs/<tokenizer run or checkpoint>")
        tok_path = os.path.abspath(H.resolve_checkpoint(args.tokenizer))
        tok, tok_ckpt = H.model_from_checkpoint(tok_path, kinds=("tokenizer", "gan"))
        tok = tok.to(device).requires_grad_(False)
        preset_name = args.dit_preset
    image_size = tok.cfg.image_size if dit_job else cfg.image_size
    data = H.dataset(args.data, image_size)                 # the DiT takes its class count from the data
    if dit_job:
        cfg = H.dit_config(args.dit_preset, tok.cfg, patch_size=args.dit_patch, class_dropout=args.label_drop,
                           num_classes=len(data.classes))
        model = H.DiT(cfg)
except (ValueError, FileNotFoundError, RuntimeError) as e:
    fail(str(e))
vf = None
if args.vf_weight > 0:
    if dit_job or args.freeze_encoder:
        fail("the VF loss shapes the encoder's latent: use it in the tokenizer or GAN job, without --freeze_encoder")
    try:
        net = H.RandomFeatures() if args.vf_model == "random" else H.DINOv2Features(args.vf_weights, args.vf_repo)
    except FileNotFoundError as e:
        fail(str(e))
    vf = H.VFLoss(net, net.dim, cfg.latent_dim, args.vf_margin_cos, args.vf_margin_dist).to(device)
if not dit_job and cfg.lpips_weight > 0:
    try:                                                   # fail before any work if the weights are missing
        lpips = H.build_lpips(args.lpips_weights).to(device)
    except FileNotFoundError as e:
        fail(str(e))
model = model.to(device)
raw = model                                                # the uncompiled module: saved, EMA'd, inspected

# ----------------------------------------------------------------------------------------------
# data

batch = args.batch or args.global_batch // world
if args.global_batch % (batch * world):
    fail(f"--global_batch {args.global_batch} is not a multiple of --batch {batch} x {world} ranks")
accum = args.global_batch // (batch * world)
if len(data) < batch * world:
    fail(f"the data set has {len(data)} images, fewer than one global micro-batch ({batch} x {world})")
steps = args.steps or (round(args.epochs * len(data) / args.global_batch) if args.epochs else 300)
out_dir = args.out or os.path.join("runs", f"{args.job}-{preset_name}")


class Sampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start mid-epoch, so a resumed run sees exactly the batches an
    uninterrupted one would."""
    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])


def loader_for(ds):
    sampler = Sampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    # its own generator: the loader must not draw from the global RNG, whose state resume restores
    loader = torch.utils.data.DataLoader(ds, batch, sampler=sampler, num_workers=args.workers, drop_last=True,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed + rank))
    return loader, sampler


def batches(loader, sampler, pos):
    """Endless (epoch, batch index) -> batch stream from position pos = [epoch, batches done in it];
    pos is updated in place so a checkpoint can record it."""
    while True:
        sampler.set_epoch(pos[0])
        sampler.start = pos[1] * batch
        for b in loader:
            pos[1] += 1
            yield b
        pos[0], pos[1] = pos[0] + 1, 0


# ----------------------------------------------------------------------------------------------
# the DiT's latents: optional one-time cache of posterior moments (image and its flip)


class LatentCache(torch.utils.data.Dataset):
    """Memory-mapped shards of (moments of x, moments of flip(x)) (N, 2, 2d, S, S) in bf16, labels.
    Refuses a cache built from other images or another tokenizer."""

    def __init__(self, root, images):
        shards = [torch.load(os.path.join(root, f), mmap=True, weights_only=True)
                  for f in sorted(os.listdir(root)) if f.startswith("shard_")]
        self.moments = [s["moments"] for s in shards]
        self.labels = torch.cat([s["labels"] for s in shards])
        if len(self.labels) != len(images) or any(s["tokenizer"] != tok_path for s in shards):
            fail(f"the latent cache {root} holds {len(self.labels)} latents of {shards[0]['tokenizer']}, but this "
                 f"run has {len(images)} images and tokenizer {tok_path}; pass a new --cache directory")
        self.ends = torch.tensor([len(m) for m in self.moments]).cumsum(0).tolist()  # shard k ends at ends[k]
        self.classes = images.classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, k):
        i = bisect.bisect_right(self.ends, k)
        return self.moments[i][k - (self.ends[i - 1] if i else 0)], self.labels[k]


@torch.no_grad()
def build_cache(root):
    """Each rank encodes images rank, rank + world, ... and writes its shard atomically."""
    if master:
        log(f"building the latent cache in {root} ({len(data)} images)")
    idx = list(range(rank, len(data), world))
    sub = torch.utils.data.Subset(data, idx)
    dl = torch.utils.data.DataLoader(sub, batch, num_workers=args.workers)
    moments, labels = [], []
    for x, y in tqdm(dl, disable=not master, desc="cache"):
        x = H.to_float(x.to(device))
        with amp:
            m = torch.stack([tok.encoder(x), tok.encoder(x.flip(-1))], dim=1)  # (B, 2, 2d, S, S)
        moments.append(m.to(torch.bfloat16).cpu())
        labels.append(y)
    H.save_checkpoint({"moments": torch.cat(moments), "labels": torch.cat(labels), "tokenizer": tok_path},
                      os.path.join(root, f"shard_{rank:03d}of{world:03d}.pt"))
    if ddp:
        dist.barrier()


def sample_moments(m):
    """Cached moments (B, 2, 2d, S, S) -> z (B, d, S, S): pick x or its flip, then sample the posterior."""
    flip = torch.rand(m.shape[0], device=m.device) < 0.5
    m = torch.where(flip[:, None, None, None], m[:, 1], m[:, 0]).float()
    mean, logvar = m.chunk(2, dim=1)
    return mean + torch.randn_like(mean) * (0.5 * logvar.clamp(-30, 20)).exp()


def random_flip(x):
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def latents(b):
    """A data batch -> (z, y) for the DiT: from the cache, or by encoding on the fly."""
    x, y = b[0].to(device, non_blocking=True), b[1].to(device, non_blocking=True)
    if args.cache:
        return sample_moments(x), y
    with torch.no_grad(), amp:
        return tok.encode(random_flip(H.to_float(x)))[2].float(), y


if dit_job and args.cache:
    if not os.path.isdir(args.cache) or not any(f.startswith("shard_") for f in os.listdir(args.cache)):
        build_cache(args.cache)
    data = LatentCache(args.cache, data)
loader, sampler = loader_for(data)

# ----------------------------------------------------------------------------------------------
# optimizers and schedules

lr = args.lr or (1e-3 if "tiny" in preset_name else 1e-4)
wd = args.weight_decay if args.weight_decay is not None else (0.0 if dit_job else 0.05)
betas = (0.9, 0.999) if dit_job else (0.9, 0.95)
fused = device.type == "cuda"


def adamw(modules, lr, wd, betas):
    """AdamW with no weight decay on biases, norms and embeddings-as-offsets (1-D tensors)."""
    params = [q for m in modules for q in m.parameters() if q.requires_grad]
    groups = [{"params": [q for q in params if q.ndim >= 2], "weight_decay": wd},
              {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_at(step, peak, warmup):
    """Linear warm-up, then cosine from peak to --lr_end (the DiT keeps a constant rate)."""
    if dit_job:
        return peak
    w = max(1, round(warmup * steps))
    if step < w:
        return peak * (step + 1) / w
    return args.lr_end + 0.5 * (peak - args.lr_end) * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


opt = adamw([raw] + ([vf.proj] if vf is not None else []), lr, wd, betas)
opt_d = adamw([disc], args.disc_lr, 0.05, (0.9, 0.95)) if disc is not None else None
ema_decay = args.ema if args.ema is not None else (0.9999 if dit_job else 0.0)
ema = copy.deepcopy(raw).requires_grad_(False) if ema_decay > 0 else None


@torch.no_grad()
def update_ema(step):
    """ema <- ema + (1 - decay) (model - ema), with decay warmed up as (1 + step) / (10 + step): a
    0.9999 average over a short run would still be the initial weights, and sampling prefers EMA."""
    decay = min(ema_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [q.detach() for q in raw.parameters()], 1.0 - decay)
    # buffers (latent statistics) are fixed before training and reach the EMA with its first copy


# ----------------------------------------------------------------------------------------------
# resume: the newest checkpoint in --out, if any

step, pos = 0, [0, 0]
found = H.find_checkpoints(out_dir)
if found:
    try:
        ck = H.load_checkpoint(found[-1], kinds=(args.job,))
        H.check_config(ck, cfg, found[-1])
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    if (ck.get("vf_proj") is None) != (vf is None):
        fail(f"{found[-1]} was trained {'without' if vf is not None else 'with'} the VF loss; match --vf_weight or use a new --out")
    raw.load_state_dict(ck["model"])
    if vf is not None:
        vf.proj.load_state_dict(ck["vf_proj"])
    opt.load_state_dict(ck["opt"])
    if ema is not None and ck.get("ema") is not None:
        ema.load_state_dict(ck["ema"])
    if disc is not None:
        disc.load_state_dict(ck["disc"])
        opt_d.load_state_dict(ck["opt_d"])
    step, pos = ck["step"], list(ck["data"])
    rng = ck["rng"]
    if len(rng) == world:                                  # same rank count: every rank continues its own stream
        torch.set_rng_state(rng[rank]["cpu"])
        if device.type == "cuda" and rng[rank].get("cuda") is not None:
            torch.cuda.set_rng_state(rng[rank]["cuda"])
    else:
        log(f"warning: checkpoint was written by {len(rng)} ranks, now {world}: random streams restart")
        torch.manual_seed(args.seed + rank + 1000 * step)
    log(f"resumed from {found[-1]} at step {step}")
elif dit_job:
    # latent statistics, measured once before training and stored in the DiT's buffers
    s1 = s2 = n = 0
    sample_set = Sampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed + 1)
    for _, b in zip(range(args.stats_batches), torch.utils.data.DataLoader(data, batch, sampler=sample_set,
                                                                         num_workers=args.workers)):
        z, _ = latents(b)
        s1, s2, n = s1 + z.sum((0, 2, 3)), s2 + z.square().sum((0, 2, 3)), n + z.numel() / z.shape[1]
    stats = torch.stack([s1, s2, torch.full_like(s1, n)])
    if ddp:
        dist.all_reduce(stats)
    mean = stats[0] / stats[2]
    raw.set_latent_stats(mean, (stats[1] / stats[2] - mean.square()).clamp_min(0).sqrt())
    log(f"latent mean {[round(v, 3) for v in raw.latent_mean.flatten().tolist()]}, "
        f"std {[round(v, 3) for v in raw.latent_std.flatten().tolist()]}")
if args.compile:                                           # after loading weights, before DDP
    if disc is not None or vf is not None:
        # the adaptive weights run a compiled backward twice (retain_graph): the VF weight the model's,
        # the GAN weight LPIPS's; compiled backward graphs allow that only without buffer donation
        torch._functorch.config.donated_buffer = False
    model = torch.compile(raw)
    lpips = torch.compile(lpips) if lpips is not None else None
if ddp:
    model = DDP(model, device_ids=[local] if device.type == "cuda" else None)   # broadcasts rank 0's weights
    if vf is not None:                                     # outside DDP: start every rank from rank 0's projection
        for q in vf.proj.parameters():
            dist.broadcast(q.data, src=0)
    disc_ddp = DDP(disc, device_ids=[local] if device.type == "cuda" else None) if disc is not None else None
else:
    disc_ddp = disc
if ema is not None and not found:                          # after DDP's broadcast: every rank's EMA alike
    ema.load_state_dict(raw.state_dict())


def save():
    """One dict per checkpoint; every rank's RNG state gathered so resume continues every stream.
    Also logs each rank's sum of trained weights (model, discriminator, VF projection): DDP ranks
    must agree, and a divergence shows here."""
    trained = [raw] + [m for m in (disc, vf.proj if vf is not None else None) if m is not None]
    wsum = torch.stack([q.detach().double().sum() for m in trained for q in m.parameters()]).sum().reshape(1)
    if ddp:
        wsums = [torch.zeros_like(wsum) for _ in range(world)]
        dist.all_gather(wsums, wsum)
        wsum = torch.cat(wsums)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
    rngs = [None] * world
    if ddp:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if master:
        ck = {"job": args.job, "config": H.config_dict(cfg), "model": raw.state_dict(), "opt": opt.state_dict(),
              "ema": ema.state_dict() if ema is not None else None, "step": step, "data": list(pos), "rng": rngs,
              "args": {k: v for k, v in vars(args).items()}}
        if disc is not None:
            ck.update(disc=disc.state_dict(), opt_d=opt_d.state_dict())
        if vf is not None:
            ck.update(vf_proj=vf.proj.state_dict())
        if dit_job:
            ck.update(tokenizer=tok_path, tokenizer_config=H.config_dict(tok.cfg))
        H.save_checkpoint(ck, os.path.join(out_dir, f"ckpt_{step:07d}.pt"))
        for old in H.find_checkpoints(out_dir)[:-args.keep]:
            os.remove(old)
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "checkpoint": f"ckpt_{step:07d}.pt", "weight_sum": wsum.tolist()}) + "\n")
    if ddp:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# the loop

if master:
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):                          # half-written checkpoints of a killed run
        if f.endswith(".tmp"):
            os.remove(os.path.join(out_dir, f))
    n_params = sum(q.numel() for q in raw.parameters())
    log(f"job {args.job} | {n_params / 1e6:.2f}M params | {world} rank(s) on {device.type} | "
        f"batch {batch} x accum {accum} x {world} = {args.global_batch} | {steps} steps | out {out_dir}")
    log(f"config {json.dumps(H.config_dict(cfg))}")
if step >= steps:
    log(f"already trained to step {step} of {steps}; nothing to do")
flops_per_image = 3 * (H.dit_flops(cfg) if dit_job else H.tokenizer_flops(cfg))
peak = H.peak_flops(device)
stream = batches(loader, sampler, pos)
sums, t0, t_steps = {}, time.time(), 0
bar = tqdm(total=steps, initial=step, disable=not master, dynamic_ncols=True, desc=args.job)
model.train()
while step < steps:
    for group in opt.param_groups:
        group["lr"] = lr_at(step, lr, args.warmup)
    fakes = []
    for micro in range(accum):
        sync = micro == accum - 1
        ctx = model.no_sync() if ddp and not sync else contextlib.nullcontext()
        with ctx:
            if dit_job:
                z, y = latents(next(stream))
                with amp:
                    loss = H.flow_matching_loss(model, raw.normalize(z), y, args.t_dist)
                terms = {"loss": loss.detach()}
            else:
                x, _ = next(stream)
                x = random_flip(H.to_float(x.to(device, non_blocking=True)))
                with amp:
                    if disc is None:
                        recons, mean, logvar = model(x)
                    else:                                  # the finest head's input, for the adaptive weight
                        recons, mean, logvar, feats = model(x, features=True)
                    loss, terms = H.reconstruction_loss(cfg, x, recons, mean, logvar, lpips)
                    rec_loss = loss
                    if vf is not None:                     # align the latent with frozen features
                        vf_loss = vf(mean, x)
                        last = raw.encoder.to_moments.weight
                        w = H.adaptive_weight(*[torch.autograd.grad(t, last, retain_graph=True)[0]
                                                for t in (rec_loss, vf_loss)]) * args.vf_weight
                        loss = loss + w * vf_loss
                        terms.update(vf_loss=vf_loss.detach(), vf_w=w)
                    if disc is not None:
                        fakes.append((x, recons[-1].detach()))
                        if step >= args.disc_start:          # warm-up over: the adversarial term reaches G
                            disc.requires_grad_(False)
                            g_loss = -disc(recons[-1]).float().mean()
                            disc.requires_grad_(True)
                            ramp = min(1.0, (step - args.disc_start + 1) / max(1, args.disc_ramp))
                            w = H.gan_adaptive_weight(rec_loss, g_loss, recons[-1], feats, cfg.patch_size)
                            w = w * args.gan_weight * ramp
                            loss = loss + w * g_loss
                            terms.update(g_loss=g_loss.detach(), gan_w=w)
                terms["loss"] = loss.detach()
            (loss / accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.float() / accum
    if vf is not None and ddp:                             # the projection lives outside DDP: average by hand
        for q in vf.proj.parameters():
            dist.all_reduce(q.grad)
            q.grad /= world
    if args.clip > 0:
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + torch.nn.utils.clip_grad_norm_(raw.parameters(), args.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if disc is not None:                                   # discriminator step on this step's images
        for group in opt_d.param_groups:
            group["lr"] = args.disc_lr * min(1.0, (step + 1) / max(1, round(0.01 * steps)))
        for micro, (x, fake) in enumerate(fakes):
            ctx = disc_ddp.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext()
            with ctx, amp:
                logits = disc_ddp(torch.cat([x, fake])).float()
                d_loss = H.hinge_d_loss(*logits.chunk(2))
                (d_loss / accum).backward()
            sums["d_loss"] = sums.get("d_loss", 0.0) + d_loss.detach() / accum
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
    if ema is not None:
        update_ema(step)
    step += 1
    t_steps += 1
    bar.update(1)
    if step % args.log_every == 0 or step == steps:       # the only host sync: once per interval
        vals = torch.stack([torch.as_tensor(v, device=device, dtype=torch.float32) for v in sums.values()])
        if ddp:
            dist.all_reduce(vals)                          # sum over ranks (gloo has no AVG)
            vals = vals / world
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        rec = {k: v / t_steps for k, v in zip(sums, vals.tolist())}
        ips = t_steps * args.global_batch / dt
        rec.update(step=step, lr=opt.param_groups[0]["lr"], img_per_s=ips)
        if peak:
            rec["mfu"] = flops_per_image * ips / world / peak
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if master:
            main = ["loss"] + [k for k in rec if k.startswith("rec_s")] + ["kl", "g_loss", "d_loss", "vf_loss"]
            txt = " ".join(f"{k} {rec[k]:.4g}" for k in main if k in rec)
            extra = f" | mfu {rec['mfu']:.1%} | mem {rec['peak_mem_gb']:.1f}G" if peak else ""
            log(f"step {step}/{steps} | {txt} | lr {rec['lr']:.2e} | {ips:.1f} img/s{extra}")
            with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
        sums, t0, t_steps = {}, time.time(), 0
    if step % args.ckpt_every == 0 or step == steps or step == args.stop_at:
        save()
    if step == args.stop_at:
        log(f"stopping at step {step} (--stop_at); rerun the same command to continue")
        break
bar.close()
if ddp:
    dist.destroy_process_group()
