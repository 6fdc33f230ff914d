"""
An official very deep VAE state dict (openai/vdvae's released *-model-ema.th files) -> an hvae
checkpoint, so that sample.py, evaluate.py and compress.py run on the official models.

  python convert.py cifar10-seed0-iter-900000-model-ema.th --preset cifar10 -o vdvae-cifar10.pt
  python convert.py imagenet32-iter-1700000-model-ema.th --preset imagenet32 -o vdvae-imagenet32.pt

Any train.py flag may follow the preset (e.g. --data_root, or the widths of a smaller model). The
weights go into both the model and the EMA slots; the config is the preset's with the flags over it.
"""
import argparse
import os
import sys

import torch

import figures
import train
from model import VAE, CHECKPOINT_FORMAT, load_official_vdvae, nonfinite


def convert(path, config):
    """-> an hvae checkpoint dict holding the official weights at `path` under `config`."""
    if config['model'] != 'vdvae':
        raise ValueError(f"the official weights are very deep VAE weights; the config's model is {config['model']!r}")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'{path}: no such file') from None
    except Exception as e:
        raise ValueError(f'{path} is not a readable PyTorch state dict ({type(e).__name__}: {str(e)[:100]})') from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f'{path} is not a state dict (a dict of tensors)')
    bad = nonfinite(state)
    if bad:
        raise ValueError(f'{path}: {len(bad)} tensors hold NaN or inf, e.g. {bad[0]}')
    vae = VAE(config)
    try:
        load_official_vdvae(vae, state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the {config['preset']} preset: {str(e).splitlines()[1].strip()[:160]}") from None
    weights = vae.state_dict()
    return dict(format=CHECKPOINT_FORMAT, config=config, step=0, model=weights, ema=weights,
                counts=dict(images=0, elapsed=0.0), source=os.path.basename(str(path)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('state_dict', help='the official .th file')
    p.add_argument('-o', '--out', required=True, help='the hvae checkpoint to write')
    args, rest = p.parse_known_args(argv)
    config = train.make_config(train.parse_args(rest))
    figures.check_out(args.out, '-o')   # before the work; and never over a file, the input included
    if os.path.lexists(args.out):
        raise ValueError(f'{args.out} already exists: remove it or choose another -o')
    ckpt = convert(args.state_dict, config)
    figures.write_atomic(args.out, lambda tmp: torch.save(ckpt, tmp))
    n = sum(t.numel() for t in ckpt['model'].values())
    print(f"wrote {args.out}: {config['preset']} preset, {n:,} parameters from {args.state_dict}")


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f'error: {e}')
