"""
sample.py: see and measure what the trained models do.

  recon     input beside its reconstruction at every scale (PNG); PSNR / SSIM / LPIPS per scale
            (table + JSON); ADM-format ref.npz and recon.npz for rFID with the ADM evaluator
  generate  DiT samples (CFG scale, steps, sampler, guidance interval), a PNG grid, the generated
            latents decoded at every scale (the paper's Appendix D view), and samples.npz for gFID
  latent    latent-space analysis (the paper's Table 5, Sec. 5.2): 2-D projection, KDE, density CV,
            Gini, normalised entropy; and the per-scale equivariance error |D(D_s z) - D_s(D z)|

  python sample.py --mode recon --ckpt runs/tokenizer-tiny
  python sample.py --mode generate --ckpt runs/dit-tiny --num_samples 16 --cfg_scale 4
  torchrun --nproc_per_node=8 sample.py --mode generate --ckpt runs/dit-XL --num_samples 50000 --steps 250
  python sample.py --mode latent --ckpt runs/tokenizer-tiny --num_images 1000

Checkpoints load through hieratok.model_from_checkpoint (EMA weights when present). Sample i's noise
and label derive from i alone, so a .npz is the same on 1 or 8 GPUs.
"""

import argparse
import json
import math
import os
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import hieratok as H

PSNR_CAP = 100.0   # dB reported for identical images (an MSE of 1e-10 on [0, 1] pixels)

# ----------------------------------------------------------------------------------------------
# metrics (images as float tensors (B, 3, H, W) in [0, 1])


def psnr(a, b):
    """Per-image PSNR in dB, capped at PSNR_CAP for identical images."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).float()


def ssim(a, b, window=11, sigma=1.5):
    """Per-image SSIM of Wang et al. (2004): Gaussian window (11, sigma 1.5; shrunk to the image
    for small scales), K1 = 0.01, K2 = 0.03, data range 1, valid region, averaged over channels."""
    a, b = a.double(), b.double()
    w = min(window, a.shape[-1], a.shape[-2])
    g = torch.exp(-((torch.arange(w, dtype=torch.float64, device=a.device) - (w - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    k = (g[:, None] * g[None, :]).expand(a.shape[1], 1, w, w)            # (C, 1, w, w)
    f = lambda x: F.conv2d(x, k, groups=a.shape[1])
    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def gini(p):
    """Gini coefficient of a non-negative distribution: 0 when uniform, (n-1)/n for one spike."""
    v = np.sort(np.asarray(p, dtype=np.float64).ravel())
    n = len(v)
    return float(2 * np.sum(np.arange(1, n + 1) * v) / (n * v.sum()) - (n + 1) / n)


def normalized_entropy(p):
    """Shannon entropy of p / sum(p) over log(n): 1 when uniform, 0 for one spike."""
    q = np.asarray(p, dtype=np.float64).ravel()
    q = q / q.sum()
    nz = q[q > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(len(q)))


def kde_grid(points, bins=64):
    """Gaussian KDE (Scott's bandwidth) of 2-D points evaluated on a bins x bins grid over their
    bounding box: returns (density (bins, bins), extent)."""
    pts = (points - points.mean(0)) / (points.std(0) + 1e-12)             # standardise each axis
    h = len(pts) ** (-1 / 6)                                             # Scott's rule in 2-D
    lo, hi = pts.min(0), pts.max(0)
    gx, gy = np.linspace(lo[0], hi[0], bins), np.linspace(lo[1], hi[1], bins)
    dens = np.zeros((bins, bins))
    for chunk in np.array_split(pts, max(1, len(pts) // 2048)):
        kx = np.exp(-0.5 * ((gx[None, :] - chunk[:, :1]) / h) ** 2)      # (n, bins)
        ky = np.exp(-0.5 * ((gy[None, :] - chunk[:, 1:]) / h) ** 2)
        dens += ky.T @ kx                                               # (bins, bins), rows = y
    return dens / (dens.sum() + 1e-300), pts


# ----------------------------------------------------------------------------------------------
# images


def quantize(x):
    """[-1, 1] float -> the 8-bit values it would be saved as (0..255, still a float tensor)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def to_uint8(x):
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, H, W, 3) numpy, as the ADM evaluator reads it."""
    return quantize(x).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_png(rows, path):
    """rows: list of lists of uint8 (h, w, 3) arrays, each upsampled (nearest) to the largest size."""
    n = max(a.shape[0] for r in rows for a in r)
    up = lambda a: np.asarray(Image.fromarray(a).resize((n, n), Image.NEAREST))
    Image.fromarray(np.concatenate([np.concatenate([up(a) for a in r], 1) for r in rows], 0)).save(path)


def writable_dir(path):
    """Create `path` and prove it can be written, with a clear error otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()            # unique per process: safe with several ranks
    except OSError as e:
        raise SystemExit(f"error: cannot write to output directory {path} ({e.strerror}); pass a writable --out")


def lpips_model(args, device):
    if args.lpips == "off":
        return None
    try:
        return H.build_lpips(args.lpips_weights, random_backbone=args.lpips == "random").to(device)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e} (or pass --lpips off)")


# ----------------------------------------------------------------------------------------------
# modes


def tokenizer_and_images(args, device):
    """The tokenizer of --ckpt (EMA weights when present) and a loader over the first --num_images
    images of --data (all by default): (tokenizer, loader, image count)."""
    tok, _ = H.model_from_checkpoint(H.resolve_checkpoint(args.ckpt), kinds=("tokenizer", "gan"))
    data = H.dataset(args.data, tok.cfg.image_size)
    n = min(args.num_images or len(data), len(data))
    dl = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(n)), args.batch, num_workers=args.workers)
    return tok.to(device), dl, n


@torch.no_grad()
def reconstruct(args, device, amp):
    tok, dl, n = tokenizer_and_images(args, device)
    cfg = tok.cfg
    lp = lpips_model(args, device)
    sums = {s: {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0} for s in cfg.scales}
    size = cfg.image_size                                     # filled in place: no copy at the end (50k images: 9.8 GB each)
    refs, recs, grid, k = np.empty((n, size, size, 3), np.uint8), np.empty((n, size, size, 3), np.uint8), [], 0
    for x, _ in tqdm(dl, desc="reconstruct"):
        x = H.to_float(x.to(device))
        with amp:
            _, _, z = tok.encode(x, sample=False)
            outs = tok.decode(z)
        for s, r in zip(cfg.scales, outs):
            # metrics on the images as they would be saved (8 bits), in [0, 1], on the device
            rq, tq = quantize(r) / 255, quantize(H.area_pool(x, r.shape[-1])) / 255
            sums[s]["psnr"] += psnr(rq, tq).sum().item()
            sums[s]["ssim"] += ssim(rq, tq).sum().item()
            if lp is not None and r.shape[-1] >= H.LPIPS_MIN_SIZE:
                sums[s]["lpips"] += lp(rq * 2 - 1, tq * 2 - 1).sum().item()
        refs[k:k + len(x)], recs[k:k + len(x)] = to_uint8(x), to_uint8(outs[-1])
        k += len(x)
        if len(grid) < 8:
            grid += [[a] + [to_uint8(o[i:i + 1])[0] for o in outs] for i, a in enumerate(to_uint8(x)[:8 - len(grid)])]
    metrics = {f"scale_{s}": {"size_px": s * cfg.patch_size, "psnr": v["psnr"] / n, "ssim": v["ssim"] / n,
                              "lpips": v["lpips"] / n if lp is not None and s * cfg.patch_size >= H.LPIPS_MIN_SIZE else None}
               for s, v in sums.items()}
    metrics["num_images"] = n
    np.savez(os.path.join(args.out, "ref.npz"), arr_0=refs)
    np.savez(os.path.join(args.out, "recon.npz"), arr_0=recs)
    grid_png(grid, os.path.join(args.out, "recon.png"))
    with open(os.path.join(args.out, "recon_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"{'scale':>6} {'px':>5} {'PSNR':>7} {'SSIM':>6} {'LPIPS':>6}   ({n} images; PSNR capped at {PSNR_CAP:.0f} dB)")
    for s in cfg.scales:
        m = metrics[f"scale_{s}"]
        lpv = f"{m['lpips']:6.4f}" if m["lpips"] is not None else "     -"
        print(f"{s:>6} {m['size_px']:>5} {m['psnr']:7.2f} {m['ssim']:6.4f} {lpv}")
    print(f"wrote {args.out}/recon.png, recon_metrics.json, ref.npz, recon.npz")


@torch.no_grad()
def generate(args, device, amp, rank, world):
    dit, ck = H.model_from_checkpoint(H.resolve_checkpoint(args.ckpt), kinds=("dit",))
    tok_path = H.resolve_checkpoint(args.tokenizer) if args.tokenizer else ck["tokenizer"]
    tok, _ = H.model_from_checkpoint(tok_path, kinds=("tokenizer", "gan"))
    dit, tok = dit.to(device), tok.to(device)
    nc = dit.cfg.num_classes
    classes = args.classes or list(range(nc))
    if max(classes) >= nc:
        raise SystemExit(f"error: class {max(classes)} out of range; the DiT knows {nc} classes")
    # whole batches go to ranks (batch b -> rank b % world), so every sample is made in the same batch
    # for any number of processes: the same matmul shapes, hence bit-identical images.
    batches = [np.arange(k, min(k + args.batch, args.num_samples)) for k in range(0, args.num_samples, args.batch)]
    mine = batches[rank::world]
    images, scales_view = [], []
    for b, idx in enumerate(tqdm(mine, desc="generate", disable=rank != 0)):
        y = torch.tensor([classes[i % len(classes)] for i in idx], device=device)
        with amp:
            z = H.sample_latents(dit, y, [args.seed * 1_000_003 + int(i) for i in idx], args.steps, args.sampler,
                                 args.cfg_scale, tuple(args.interval))
            outs = tok.decode(z)
        images.append(to_uint8(outs[-1]))
        if b == 0:
            scales_view = [[to_uint8(o[i:i + 1])[0] for o in outs] for i in range(min(8, len(idx)))]
    size = tok.cfg.image_size
    part = np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)
    if world > 1:                                                       # ranks write parts, rank 0 puts them in order
        np.savez(os.path.join(args.out, f".part{rank}.npz"), idx=np.concatenate(mine) if mine else np.zeros(0, int), img=part)
        dist.barrier()
        if rank == 0:
            part = np.zeros((args.num_samples, size, size, 3), np.uint8)
            for r in range(world):
                path = os.path.join(args.out, f".part{r}.npz")
                with np.load(path) as d:
                    part[d["idx"]] = d["img"]
                os.remove(path)
        dist.barrier()
    if rank == 0:
        np.savez(os.path.join(args.out, "samples.npz"), arr_0=part)
        side = max(1, int(math.sqrt(min(len(part), 64))))
        grid_png([list(part[r * side:(r + 1) * side]) for r in range(side)], os.path.join(args.out, "samples.png"))
        grid_png(scales_view, os.path.join(args.out, "samples_scales.png"))
        print(f"wrote {args.out}/samples.npz {part.shape} uint8, samples.png, samples_scales.png")


@torch.no_grad()
def analyse(args, device, amp):
    tok, dl, n = tokenizer_and_images(args, device)
    feats, err = [], {s: 0.0 for s in tok.cfg.scales[:-1]}
    for x, _ in tqdm(dl, desc="latents"):
        x = H.to_float(x.to(device))
        with amp:
            _, _, z = tok.encode(x, sample=False)
            outs = [o.float() for o in tok.decode(z)]
        feats.append(z.float().flatten(1).cpu().numpy())               # one point per image: (B, d*S*S)
        for s, o in zip(tok.cfg.scales[:-1], outs[:-1]):               # D(D_s z) vs D_s(D z), on [0, 1] pixels
            down = H.area_pool(outs[-1], o.shape[-1])
            err[s] += ((o - down).abs().flatten(1).mean(1) / 2).sum().item()
    feats = np.concatenate(feats)
    feats = feats - feats.mean(0)
    _, _, vt = np.linalg.svd(feats, full_matrices=False)               # PCA to 2-D
    dens, pts = kde_grid(feats @ vt[:2].T, args.bins)
    cells = dens.ravel()
    res = {"num_images": n, "projection": "PCA", "kde_bins": args.bins,
           "density_cv": float(cells.std() / cells.mean()), "gini": gini(cells), "normalized_entropy": normalized_entropy(cells),
           "equivariance_error": {f"scale_{s}": v / n for s, v in err.items()}}
    with open(os.path.join(args.out, "latent_metrics.json"), "w") as f:
        json.dump(res, f, indent=1)
    # picture: scatter (left) and density (right), plain numpy + PIL
    size = 256
    sc = np.full((size, size), 255, np.uint8)
    lo, hi = pts.min(0), pts.max(0)
    ij = ((pts - lo) / (hi - lo + 1e-12) * (size - 1)).astype(int)
    sc[size - 1 - ij[:, 1], ij[:, 0]] = 0
    heat = np.asarray(Image.fromarray((255 * dens / dens.max()).astype(np.uint8)[::-1]).resize((size, size), Image.BILINEAR))
    Image.fromarray(np.concatenate([sc, heat], 1)).save(os.path.join(args.out, "latent_density.png"))
    print(f"density CV {res['density_cv']:.4f} | Gini {res['gini']:.4f} | normalised entropy {res['normalized_entropy']:.4f}")
    print("equivariance error |D(D_s z) - D_s(D z)| per scale: " +
          ", ".join(f"{k} {v:.4f}" for k, v in res["equivariance_error"].items()))
    print(f"wrote {args.out}/latent_metrics.json, latent_density.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", required=True, choices=["recon", "generate", "latent"], help="what to do")
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory (tokenizer for recon/latent, DiT for generate)")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--data", default=None, help="ImageFolder root (recon, latent); default: the built-in data")
    p.add_argument("--num_images", type=int, default=None, help="images to use (recon, latent); default all")
    p.add_argument("--batch", type=int, default=32, help="batch size per process")
    p.add_argument("--workers", type=int, default=2, help="data-loader processes")
    p.add_argument("--lpips", default="vgg", choices=["vgg", "random", "off"], help="LPIPS backbone (random: for tests, meaningless values)")
    p.add_argument("--lpips_weights", default=None, help=f"path to {H.VGG16_FILE} (else the torch hub cache)")
    p.add_argument("--tokenizer", default=None, help="generate: tokenizer checkpoint (default: the one the DiT was trained on)")
    p.add_argument("--num_samples", type=int, default=16, help="generate: samples in total over all processes")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="generate: labels, cycled over samples (default: all classes in turn)")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="generate: classifier-free guidance scale (1 = none, the paper's gFID protocol)")
    p.add_argument("--interval", type=float, nargs=2, default=[0.0, 1.0], help="generate: t range where guidance applies (t = 1 is noise)")
    p.add_argument("--steps", type=int, default=50, help="generate: ODE steps")
    p.add_argument("--sampler", default="heun", choices=["euler", "heun"], help="generate: ODE integrator")
    p.add_argument("--seed", type=int, default=0, help="generate: sample i uses seed * 1000003 + i")
    p.add_argument("--bins", type=int, default=64, help="latent: KDE grid side")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast on CUDA")
    args = p.parse_args(argv)

    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" and args.precision == "bf16")
    if ddp and args.mode != "generate":
        raise SystemExit("error: only --mode generate runs under torchrun; run recon and latent as one process")
    writable_dir(args.out)
    try:
        if args.mode == "recon":
            reconstruct(args, device, amp)
        elif args.mode == "generate":
            generate(args, device, amp, rank, world)
        else:
            analyse(args, device, amp)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
