"""
train.py: one training loop for HieraTok's three jobs, in nanoGPT's order: flags, set-up, the run's
checks, models, data, optimizers, resume, the loop's helpers, then the loop, top to bottom.

  tokenizer   stage 1: L1 + MSE (+ LPIPS where the scale is large enough) on every scale, + KL
  gan         stage 2: stage 1's losses + a PatchGAN (hinge, adaptive weight), from a stage-1 run
  dit         a DiT on the latents of a tokenizer checkpoint: DDPM (vanilla DiT's), or flow

  python train.py                                          # tiny tokenizer, built-in data, ~3 min
  python train.py --job dit --tokenizer runs/tokenizer-tiny              # tiny DiT on its latents
  python train.py --preset cpu-64 --data photos/train --global_batch 32  # a CPU ablation arm
  python train.py --preset cpu-64 --data photos/train --dec_depth 6 --scales 8   # any config field
  torchrun --nproc_per_node=8 train.py --preset paper-f16d16 --data /data/imagenet/train \\
      --epochs 100 --compile                                             # paper stage 1 (README)

Every field of HieraTokConfig and DiTConfig is a flag (--help lists them with the preset's
values). Rerunning a command resumes from the newest readable checkpoint in its --out (bit for bit
on a CPU, tested; what a resume may change: REFUSED in runtime.py). SIGTERM or SIGUSR1 (a cluster's
preemption) checkpoints the step reached and exits with 75. Each checkpoint also writes a picture
of what the model has learned: a fixed batch reconstructed at every scale (recon_<step>.png), or
DiT samples from fixed seeds (samples_<step>.png).
"""

import atexit
import contextlib
import copy
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings

import torch
import torch._functorch.config                              # donated_buffer (see --compile below)
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import hieratok as H
import runtime as R

# ----------------------------------------------------------------------------------------------
# flags (runtime.py's train_parser): the job's, and every config field's, whose defaults are the
# values of the presets named on the command line; a value out of range is refused in one line

master = int(os.environ.get("RANK", 0)) == 0


def log(msg):
    if master:
        tqdm.write(msg)                                  # on a line of its own under the bar


def fail(msg):
    """Stop every rank with one clear message (bad flags, inputs, checkpoints, a diverged run)."""
    log(f"error: {msg}")
    raise SystemExit(2)


parser = R.train_parser(sys.argv[1:], __doc__.split("\n\n")[0])
parser.error = fail                                      # one line, not the whole usage text
if said := R.renamed_flag(sys.argv[1:], R.TRAIN_RENAMED):  # before argparse reads it as another
    fail(said)
args = parser.parse_args()
job = args.job
warnings.showwarning = lambda message, *_: tqdm.write(f"warning: {message}", file=sys.stderr)

# ----------------------------------------------------------------------------------------------
# set-up: DDP from the environment (torchrun), else one process

try:
    ddp, rank, world, device, amp = R.setup(args.device, args.precision, args.timeout)
except RuntimeError as e:                    # torch.distributed's errors: the group did not form
    tqdm.write(f"error: rank {os.environ.get('RANK')} could not form the process group within "
               f"--timeout {args.timeout:g} min ({str(e).splitlines()[0][:300]}); rerunning "
               f"resumes from the newest checkpoint")
    raise SystemExit(2)
if ddp:                     # a rank stopped, hung or died: one line instead of the backend's trace
    R.explain_lost_rank(rank, args.timeout)
if args.deterministic:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it to reproduce
    torch.use_deterministic_algorithms(True)
torch.manual_seed(args.seed + rank)

# ----------------------------------------------------------------------------------------------
# the run's checks, before any model is built (runtime.py, section 6): the flags against the job,
# the config, the run directory and the checkpoint it resumes from, the DiT's tokenizer, the data
# and steps, and what resuming would change (REFUSED there)

try:
    R.check_job_flags(args)
    if job == "dit":
        preset_name = args.dit_preset
    else:
        cfg, preset_name, init = R.tokenizer_job_config(args)
    out_dir = args.out or os.path.join("runs", f"{job}-{preset_name}")
    R.make_writable_dir(out_dir)
    ck, path = R.load_checkpoint(out_dir, kinds=(job,)) if R.checkpoints(out_dir) else (None, None)
    if job == "dit":
        tok_ck, tok_path, note = R.dit_tokenizer(args, ck, path)
        if note:
            log(note)
        tok_cfg = R.checkpoint_config(tok_ck)
    data = R.dataset(args.data, tok_cfg.image_size if job == "dit" else cfg.image_size)
    if job == "dit":                                     # the class count comes from the data
        cfg = H.dit_config(args.dit_preset, tok_cfg, **{
            "num_classes": len(data.classes), **R.config_overrides(args, H.DiTConfig, "dit_")})
        if cfg.num_classes < len(data.classes):
            raise ValueError(f"--dit_num_classes {cfg.num_classes} is fewer than the data's "
                             f"{len(data.classes)} classes")
    elif cfg.lpips_weight > 0:                           # its weight file, or how to get one
        R.lpips_file(cfg.lpips_net, args.lpips_file)
    batch, accum, steps = R.plan_steps(args, len(data), world)
    # defaults resolved here, so that the checkpoint records (and a resume compares) what was
    # used; peak rate: the paper's were lost in extraction; 1e-4 is the usual tokenizer and DiT
    # rate, 1e-3 suits the CPU-sized presets (shallow, trained for minutes)
    args.batch = batch
    args.lr = args.lr or (1e-3 if preset_name == "tiny" or preset_name.startswith("cpu-") else 1e-4)
    args.weight_decay = args.weight_decay if args.weight_decay is not None else (
        0.0 if job == "dit" else 0.05)
    args.ema = args.ema if args.ema is not None else (0.9999 if job == "dit" else 0.0)
    args.clip = args.clip if args.clip is not None else (0.0 if job == "dit" else 1.0)
    for change in R.resume_changes(args, cfg, steps, ck, path) if ck else []:
        log(change)
except (ValueError, FileNotFoundError) as e:
    fail(str(e))
if job == "gan" and args.disc_start >= steps:
    log(f"warning: --disc_start {args.disc_start} is not below the run's {steps} steps: the "
        f"discriminator never trains, and no adversarial term reaches the tokenizer")

# ----------------------------------------------------------------------------------------------
# models: the preset (or the stage-1 run's config) with the typed flags on top

lpips = disc = tok = vf = None
try:
    if job == "dit":
        tok = R.build_model(tok_ck).to(device).requires_grad_(False)
        model = H.DiT(cfg)
    else:
        model = H.HieraTok(cfg)
    if job == "gan":
        try:
            model.load_state_dict(init["model"])
        except RuntimeError:
            raise ValueError(f"{', '.join(R.config_overrides(args, H.HieraTokConfig))} change the "
                             f"architecture of {args.init}; the GAN stage can change loss weights "
                             f"and the attention mask, not shapes")
        disc = H.Discriminator().to(device)
        if args.freeze_encoder:
            model.encoder.requires_grad_(False)
    if args.vf_weight > 0:
        net = R.DINOv2Features(args.vf_file, args.vf_repo, args.vf_model)
        vf = H.VFLoss(net, net.dim, cfg.latent_dim, args.vf_margin_cos, args.vf_margin_dist)
        vf = vf.to(device)
    if job != "dit" and cfg.lpips_weight > 0:
        lpips = R.build_lpips(cfg.lpips_net, args.lpips_file).to(device)
except (ValueError, FileNotFoundError) as e:
    fail(str(e))
raw = model = model.to(device)                           # raw: the uncompiled module, saved

# ----------------------------------------------------------------------------------------------
# data: each rank's batches in a resumable order; flips drawn on the device from the saved RNG


def loader_worker(_):
    """A data-loader worker leaves SIGTERM and SIGUSR1 to the main process, which stops the run
    (a signal to the process group reaches the workers too, and would kill them mid-batch)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start mid-epoch, so a resumed run sees exactly the batches an
    uninterrupted one would."""
    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])


def batches(pos):
    """Endless stream of this rank's batches from pos = [epoch, images of it seen by all ranks],
    updated in place so that a checkpoint can record it. Rank r takes images r, r + world, ... of
    the epoch's permutation, so the images seen are its first pos[1] for any rank count."""
    sampler = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=True,
                               seed=args.seed, drop_last=True)
    # its own generator: the loader must not draw from the global RNG, whose state resume restores
    loader = torch.utils.data.DataLoader(
        data, batch, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed + rank), worker_init_fn=loader_worker)
    while True:
        sampler.set_epoch(pos[0])
        sampler.start = pos[1] // world
        for b in loader:
            pos[1] += batch * world
            yield b
        pos[0], pos[1] = pos[0] + 1, 0


def images(inputs):
    """A uint8 batch -> float images on the device in [-1, 1], each flipped with chance 1/2."""
    x = R.to_float(inputs.to(device, non_blocking=True))
    return torch.where((torch.rand(x.shape[0], device=device) < 0.5)[:, None, None, None],
                       x.flip(-1), x)


@torch.no_grad()
def latents(inputs):
    """The DiT's data: a posterior sample of each (flipped) image's latent, encoded on the fly."""
    with amp:
        return tok.encode(images(inputs), sample=True)[2].float()


# ----------------------------------------------------------------------------------------------
# optimizers, schedules, EMA

# fused AdamW (CUDA and CPU): fast, and it skips its whole update on the device when its found_inf
# is 1 (the mechanism GradScaler uses): a non-finite step changes nothing and costs no host sync
opt = torch.optim.AdamW(H.param_groups([raw] + ([vf] if vf else []), args.weight_decay),
                        lr=args.lr, fused=True,
                        betas=(0.9, 0.999) if job == "dit" else (0.9, 0.95))
optimizers = [opt]
if disc is not None:
    opt_d = torch.optim.AdamW(H.param_groups([disc], 0.05), lr=args.disc_lr, betas=(0.9, 0.95),
                              fused=True)
    optimizers.append(opt_d)
ema = copy.deepcopy(raw).requires_grad_(False) if args.ema > 0 else None


# ----------------------------------------------------------------------------------------------
# resume from the newest readable checkpoint in --out, or start (the DiT measures its latent
# statistics)


def resume(ck):
    """Every state the checkpoint holds (model, optimizers, EMA, discriminator, VF projection, RNG
    streams, data position) -> (step, data position)."""
    raw.load_state_dict(ck["model"])
    for name, obj in (("opt", opt), ("ema", ema), ("disc", disc), ("vf_proj", vf and vf.proj),
                      ("opt_d", disc and opt_d)):
        if obj is not None and ck.get(name) is not None:
            obj.load_state_dict(ck[name])
    opt.param_groups[0]["weight_decay"] = args.weight_decay   # the decay group: the flag's value
    if len(ck["rng"]) == world:                          # same rank count: every stream goes on
        torch.set_rng_state(ck["rng"][rank]["cpu"])
        if device.type == "cuda" and ck["rng"][rank].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"][rank]["cuda"])
    else:
        log(f"checkpoint written by {len(ck['rng'])} ranks, now {world}: the data position "
            f"carries over ({ck['data'][1]} images into epoch {ck['data'][0]}); the random "
            f"streams (flips, noise) restart from --seed")
        torch.manual_seed(args.seed + rank + 1000 * ck["step"])
    if (ema is None) != (ck.get("ema") is None):
        log("EMA off from here: the checkpoint's EMA weights are dropped" if ema is None else
            "EMA on from here: it starts from the resumed weights")
    log(f"resumed from {path} at step {ck['step']}")
    return ck["step"], list(ck["data"])


def measure_latent_stats():
    """The DiT's per-channel latent mean and std over --stats_batches batches per rank, stored in
    its buffers (and so in every checkpoint)."""
    s1 = s2 = n = 0
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed + 1)
    loader = torch.utils.data.DataLoader(data, batch, sampler=sampler, num_workers=args.workers,
                                         worker_init_fn=loader_worker)
    for _, (x, _) in zip(range(args.stats_batches), loader):
        z = latents(x)
        s1, s2 = s1 + z.sum((0, 2, 3)), s2 + z.square().sum((0, 2, 3))
        n += z.numel() / z.shape[1]
    stats = torch.stack([s1, s2, torch.full_like(s1, n)])
    if ddp:
        dist.all_reduce(stats)
    mean = stats[0] / stats[2]
    raw.set_latent_stats(mean, (stats[1] / stats[2] - mean.square()).clamp_min(0).sqrt())
    log(f"latent mean {[round(v, 3) for v in mean.tolist()]}, "
        f"std {[round(v, 3) for v in raw.latent_std.flatten().tolist()]}")


step, pos = resume(ck) if ck else (0, [0, 0])
if ck is None and job == "dit":
    measure_latent_stats()
if args.compile:                                         # after loading weights, before DDP
    if disc is not None or vf is not None:
        # the adaptive weights run a compiled backward twice (retain_graph): the VF weight the
        # model's, the GAN weight LPIPS's; compiled backward graphs allow it only without donation
        torch._functorch.config.donated_buffer = False
    model = torch.compile(raw)
    lpips = torch.compile(lpips) if lpips is not None else None
disc_net = disc
if ddp:                                                  # every rank starts from rank 0's weights
    ids = [device.index] if device.type == "cuda" else None
    model = DDP(model, device_ids=ids)
    disc_net = DDP(disc, device_ids=ids) if disc is not None else None
    for q in vf.proj.parameters() if vf else []:          # outside DDP: broadcast it by hand
        dist.broadcast(q.data, src=0)
if ema is not None and (ck is None or ck.get("ema") is None):    # after DDP's broadcast
    ema.load_state_dict(raw.state_dict())
if job == "dit":                                         # the pictures: fixed seeds and labels
    shown = dict(tokenizer=tok, dit=ema if ema is not None else raw,
                 labels=torch.arange(8, device=device) % cfg.num_classes)
else:                                                    # or a fixed batch
    fixed = torch.stack([data[i][0] for i in range(min(8, len(data)))])
    shown = dict(tokenizer=raw, x=R.to_float(fixed).to(device))

# ----------------------------------------------------------------------------------------------
# the loop's helpers: EMA, running log sums, the log line, the checkpoint and its picture


def ema_update(finite):
    """ema += w (model - ema), w = 1 - decay (--ema, or its warm-up) and 0 on a skipped step, on
    the device with no host sync."""
    decay = min(args.ema, (1 + step) / (10 + step)) if args.ema_warmup else args.ema
    w = (1.0 - decay) * finite.float()
    delta = torch._foreach_sub([q.detach() for q in raw.parameters()], list(ema.parameters()))
    torch._foreach_mul_(delta, w)
    torch._foreach_add_(list(ema.parameters()), delta)


def accumulate(sums, terms, finite):
    """Add a step's terms to the running sums, [sum over finite steps, finite steps] per term, on
    the device (no sync)."""
    for k, v in terms.items():
        sums[k] = sums.get(k, 0) + torch.stack([torch.where(finite, v.double(), 0),
                                                finite.double()])


def write_log(sums, interval, seconds):
    """The interval's means over ranks and finite steps, printed and appended to log.jsonl; and
    whether a signal asked any rank to stop, which rides on the same all-reduce. -> stop."""
    asked_here = torch.tensor([float(bool(asked)), 0.0], dtype=torch.float64, device=device)
    totals = torch.stack([*sums.values(), asked_here])   # (terms + 1, 2): sum, finite steps
    if ddp:
        dist.all_reduce(totals)
    *totals, (asked_anywhere, _) = totals.tolist()
    totals = dict(zip(sums, totals))
    record = {k: s / n for k, (s, n) in totals.items() if n > 0}
    record.update(step=step, lr=opt.param_groups[0]["lr"],
               img_per_s=interval * args.global_batch / seconds)
    skipped = interval - round(totals["loss"][1] / world)
    if skipped:
        record["skipped_steps"] = skipped
    if peak_flops:
        record["mfu"] = flops_per_image * record["img_per_s"] / world / peak_flops
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    keys = ["loss", *[k for k in record if k.startswith("rec_s")], "kl", "g_loss", "d_loss",
            "vf_loss", "lr", "img_per_s", "mfu", "peak_mem_gb", "skipped_steps"]
    log(f"step {step}/{steps} | " + " ".join(f"{k} {record[k]:.4g}" for k in keys if k in record))
    try:
        if master:
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
    except OSError as e:
        log(f"warning: cannot append to {log_file} ({e.strerror}); training goes on")
    return asked_anywhere > 0


def diverged():
    """The stop after --max_bad_steps non-finite steps in a row: what happened, where to resume."""
    found = R.checkpoints(out_dir)
    return (f"{int(worst.item())} steps in a row had a non-finite loss or gradient (by step "
            f"{step}); they were skipped and changed nothing, and no checkpoint was written while "
            f"they lasted. Lower --lr or check the data: rerunning "
            + (f"resumes from the newest checkpoint before them, {found[max(found)]}" if found
               else "starts the run over (no checkpoint came before them)")
            + (". Every step since resuming from it was non-finite, so it may hold diverged "
               "weights: remove it to resume from an older one, or use a new --out"
               if first_step > 0 and good_steps.item() == 0 else ""))


def write_checkpoint():
    """One dict with every rank's RNG state, written atomically by rank 0, older checkpoints
    pruned (milestones stay), and the picture; every rank stops if the write failed."""
    rngs = [{"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}] * world
    if ddp:
        dist.all_gather_object(rngs, rngs[rank])
    error = ""
    if master:
        state = {"job": job, "config": R.config_dict(cfg), "step": step, "steps": steps,
                 "model": raw.state_dict(), "opt": opt.state_dict(), "data": list(pos),
                 "rng": rngs, "args": vars(args), "ema": ema.state_dict() if ema else None,
                 "precision": R.precision_name(amp, device)}
        if disc is not None:
            state.update(disc=disc.state_dict(), opt_d=opt_d.state_dict())
        if vf is not None:
            state.update(vf_proj=vf.proj.state_dict())
        if job == "dit":
            state.update(tokenizer=tok_path, tokenizer_config=R.config_dict(tok.cfg))
        try:
            R.save_checkpoint(state, os.path.join(out_dir, f"ckpt_{step:07d}.pt"))
            every = args.milestone_every
            for old in [f for s, f in R.checkpoints(out_dir).items()
                        if not (every and s % every == 0)][:-args.keep]:
                os.remove(old)
            R.picture(os.path.join(out_dir, f"{'samples' if job == 'dit' else 'recon'}_"
                                            f"{step:07d}.png"), **shown)
        except OSError as e:
            error = (f"cannot write the checkpoint of step {step} to {out_dir} "
                     f"({e.strerror or e}; "
                     f"{shutil.disk_usage(out_dir).free / 2 ** 20:.0f} MiB free there). The "
                     f"newest checkpoint, step {max(R.checkpoints(out_dir), default=0)}, is "
                     f"intact: free some space, or mend the cause, and rerun this command to "
                     f"resume from it")
    ok = torch.tensor(0.0 if error else 1.0, device=device)
    if ddp:                              # also the barrier: no rank goes on before the file is in
        dist.broadcast(ok, 0)
    if not ok.item():
        fail(error)


log_file = os.path.join(out_dir, "log.jsonl")
if master:
    for f in os.listdir(out_dir):                        # half-written checkpoints of a killed run
        if f.endswith(".tmp"):
            os.remove(os.path.join(out_dir, f))
    if os.path.exists(log_file):      # a killed run's records past the checkpoint come again:
        with open(log_file) as f:     # drop them, and a last line cut short by the kill
            lines = [line for line in f if line.endswith("}\n")]
        with open(log_file + ".tmp", "w") as f:
            f.writelines(line for line in lines if json.loads(line)["step"] <= step)
        os.replace(log_file + ".tmp", log_file)
    log(f"job {job} | {sum(q.numel() for q in raw.parameters()) / 1e6:.2f}M params | {world} "
        f"rank(s) on {device.type} | batch {batch} x accum {accum} x {world} = {args.global_batch} "
        f"| {steps} steps | out {out_dir}")
    log(f"config {json.dumps(R.config_dict(cfg))}")
    if step >= steps:
        log(f"{out_dir} is at step {step} of {steps} already: nothing to train (a larger --steps "
            f"or --epochs goes on)")
flops_per_image = 3 * (H.dit_flops(cfg) if job == "dit" else H.tokenizer_flops(cfg))
peak_flops = R.peak_flops(device)                        # bf16 FLOP/s of the GPU, for MFU
stream = batches(pos)
# its workers ignore SIGTERM (loader_worker), so multiprocessing's SIGTERM at exit would not end
# them: however the run ends, the loader is shut down first (atexit runs last-in first-out)
atexit.register(stream.close)
# non-finite steps in a row, the longest such run, and this run's finite steps (device scalars)
bad_run = worst = good_steps = torch.zeros((), device=device)
first_step, stop = step, False                          # this run's first step, the stop asked
sums, interval, t0 = {}, 0, time.time()          # per term: [sum, finite steps] since the last log
bar = tqdm(total=steps, initial=step, disable=not master, dynamic_ncols=True, desc=job)

# Preemption: SIGTERM (SLURM, Kubernetes, torchrun's agent, which forwards it) or SIGUSR1 (SLURM's
# --signal) asks the run to stop. It is learned at the end of a step (with DDP at the next log
# step, on the log's all-reduce, so every rank stops at the same step): that step is checkpointed
# and every rank exits with STOPPED. A second signal ends the run at once; the atomic write leaves
# the previous checkpoint intact. The same signal within a second is one request: a signal sent to
# a process group reaches a worker both directly and through torchrun.
STOPPED = 75                             # sysexits' EX_TEMPFAIL: run the same command again
asked = []                               # [signal name, time, number] of the request


def on_signal(signum, frame):
    if not asked:
        asked.extend([signal.Signals(signum).name, time.time(), signum])
    elif signum != asked[2] or time.time() - asked[1] > 1.0:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, on_signal)

# ----------------------------------------------------------------------------------------------
# the loop

model.train()
while step < steps:
    # 1. forward and backward on each micro-batch; DDP all-reduces on the last one only
    for group in opt.param_groups:                       # the DiT's rate is constant, as DiT's
        group["lr"] = args.lr if job == "dit" else R.lr_at(step, steps, args.lr, args.warmup,
                                                           args.lr_end)
    gan_on = job == "gan" and step >= args.disc_start    # LDM's gate: D trains, its term reaches G
    adversary = dict(disc=disc, gan_weight=args.gan_weight * H.gan_ramp(
        step, args.disc_start, args.disc_ramp)) if gan_on else {}
    stepped = optimizers if gan_on else optimizers[:1]
    micro_terms, fakes = [], []
    for micro in range(accum):
        inputs, labels = next(stream)                    # uint8 images, class labels
        with model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext():
            if job == "dit":
                z = latents(inputs)
                with amp:
                    loss = H.dit_loss(model, cfg, raw.normalize(z), labels.to(device), args.t_dist)
                terms = {}
            else:
                x = images(inputs)
                with amp:
                    out = model(x)
                    loss, terms = H.generator_loss(
                        cfg, x, out, lpips=lpips, vf=vf, vf_weight=args.vf_weight,
                        vf_layer=raw.encoder.to_moments.weight, **adversary)
                if gan_on:
                    fakes.append((x, out.recons[-1].detach()))
            terms["loss"] = loss.detach()
            (loss / accum).backward()
        micro_terms.append(terms)
    # 2. the GAN stage's discriminator on this step's reconstructions (hinge loss), once gated in;
    #    its schedule (1% warm-up, cosine) runs over its own steps, from --disc_start
    if gan_on:
        for group in opt_d.param_groups:
            group["lr"] = R.lr_at(step - args.disc_start, steps - args.disc_start, args.disc_lr,
                                  0.01, args.disc_lr_end)
        for micro, (real, fake) in enumerate(fakes):
            with disc_net.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext(), amp:
                d_loss = H.hinge_d_loss(*disc_net(torch.cat([real, fake])).float().chunk(2))
            (d_loss / accum).backward()
            micro_terms[micro]["d_loss"] = d_loss.detach()
    # 3. clip each stepped optimizer's parameters; step them, unless a gradient is not finite
    step_terms = {k: sum(t[k].float() for t in micro_terms) / accum for k in micro_terms[0]}
    for q in vf.proj.parameters() if vf and ddp else []:  # outside DDP: average by hand
        dist.all_reduce(q.grad)
        q.grad /= world
    # gradients are all-reduced, so norms (non-finite whenever a loss was) agree on every rank
    norms = [torch.nn.utils.clip_grad_norm_([q for g in o.param_groups for q in g["params"]],
                                            args.clip or math.inf) for o in stepped]
    finite = torch.isfinite(sum(norms))
    for o in stepped:
        o.found_inf = (~finite).float()                  # 1: fused AdamW skips the whole update
        o.step()
        o.zero_grad(set_to_none=True)
    if ema is not None:
        ema_update(finite)
    bad_run = torch.where(finite, 0.0, bad_run + 1)
    worst, good_steps = torch.maximum(worst, bad_run), good_steps + finite
    accumulate(sums, {**step_terms, "grad_norm": norms[0]}, finite)
    step, interval = step + 1, interval + 1
    bar.update(1)
    # 4. log: a mean over ranks and the interval's finite steps, and a stop a signal asked for;
    #    stop a run that diverged
    at_ckpt = step % args.ckpt_every == 0 or step == steps or step == args.stop_at
    if step % args.log_every == 0 or at_ckpt or (asked and not ddp):  # one process: at once
        stop = write_log(sums, interval, time.time() - t0) and step < steps
        at_ckpt = at_ckpt or stop
        if worst.item() >= args.max_bad_steps:
            fail(diverged())
        sums, interval, t0 = {}, 0, time.time()
    # 5. checkpoint and picture; never from inside a run of non-finite steps, whose weights a
    #    rerun may not train from
    if at_ckpt and bad_run.item() > 0:
        log(f"no checkpoint at step {step}: the last {int(bad_run.item())} steps were non-finite")
    elif at_ckpt:
        write_checkpoint()
    if stop:
        found = R.checkpoints(out_dir)
        resume_from = (found.get(step) or found[max(found)]) if found else "the start"
        tqdm.write(f"{f'rank {rank}: ' if ddp else ''}stopped at step {step} by "
                   f"{asked[0] if asked else 'a signal to another rank'}: rerun the same command "
                   f"to resume from {resume_from} (exit code {STOPPED})")
        break
    if step == args.stop_at:
        log(f"stopping at step {step} (--stop_at); rerun the same command to continue")
        break
bar.close()
if ddp:                          # no rank tears its connections down while another still reads
    dist.barrier()
    dist.destroy_process_group()
if stop:
    raise SystemExit(STOPPED)
