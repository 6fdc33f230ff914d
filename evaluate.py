"""
Test-set negative ELBO of a checkpoint, with its standard error, and the KL of every layer.

  python evaluate.py out/ckpt-00001000.pt                  # bits/dim (nats per image for binary data)
  python evaluate.py ckpt.pt --max_batches 10 --split valid

The headline number is the negative ELBO (distortion + rate), an upper bound on -log p(x);
the distortion alone is not the likelihood (DESIGN.md 1.6).
"""
import argparse
import math
import sys

import torch

import data
from model import load_checkpoint, model_from_checkpoint
from train import evaluate


def report(nelbo, kl, dims, binary, weights, step, split):
    """nelbo: (N,) nats/dim per image; kl: (N, L) nats per image -> the printed summary lines."""
    n = len(nelbo)
    if binary:  # nats per image, the unit of the binary-data papers
        value, unit = nelbo * dims, 'nats/image'
    else:
        value, unit = nelbo / math.log(2), 'bits/dim'
    stderr = value.std().item() / math.sqrt(n) if n > 1 else float('nan')
    rate = kl.mean(0)                                                   # (L,) nats per image
    lines = [f'{split} negative ELBO: {value.mean():.4f} +- {stderr:.4f} {unit} '
             f'({n} images, {weights} weights, step {step})',
             f'rate {rate.sum() / math.log(2):.2f} bits/image; KL per layer (bits/image, share of rate):']
    for i, k in enumerate(rate):
        lines.append(f'  layer {i:3d}: {k / math.log(2):9.3f}  {100 * k / rate.sum():5.1f}%')
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint')
    p.add_argument('--split', choices=('test', 'valid'), default='test')
    p.add_argument('--weights', choices=('ema', 'model'), default='ema')
    p.add_argument('--max_batches', type=int, default=0, help='0: the whole split')
    p.add_argument('--batch_size', type=int, help='default: the training batch size')
    p.add_argument('--data_root', help='default: the training run\'s')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint, map_location=args.device)
    config = dict(ckpt['config'])
    config.update({k: v for k, v in (('data_root', args.data_root), ('batch_size', args.batch_size)) if v})
    vae = model_from_checkpoint(ckpt, args.weights).to(args.device)
    info = data.load_dataset(config['dataset'], config['data_root'], config['image_size'], False)
    nelbo, kl = evaluate(vae, info[args.split], info, config, torch.device(args.device), args.max_batches)
    dims = config['image_channels'] * (config['image_size'] - 2 * config['pad']) ** 2
    print('\n'.join(report(nelbo, kl, dims, info['binary'], args.weights, ckpt['step'], args.split)))


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f'error: {e}')
