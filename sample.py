"""
Draw samples from a trained model into a PNG grid.

  python sample.py out/ckpt-00001000.pt                       # 8 x 8 samples at temperature 1
  python sample.py ckpt.pt --temperature 1.0 0.9 0.8 0.6     # one row per temperature
  python sample.py ckpt.pt --recon_layers 4                  # test images, first 4 layers from the posterior

The checkpoint carries its config; EMA weights by default (--weights model for the raw ones).
A checkpoint written on a GPU samples on a CPU.
"""
import argparse
import sys

import numpy as np
import torch
from PIL import Image

import data
from model import load_checkpoint, model_from_checkpoint


def grid(rows, pad=2):
    """rows: list of uint8 (n, C, H, W) tensors -> one uint8 (H', W', 3) image, white gaps."""
    n, C, H, W = rows[0].shape
    out = np.full((len(rows) * (H + pad) + pad, n * (W + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row.cpu()):
            img = img.expand(3, -1, -1) if C == 1 else img
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            out[y:y + H, x:x + W] = img.permute(1, 2, 0).numpy()
    return out


def save_png(rows, path, scale=1):
    image = Image.fromarray(grid(rows))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)


def reconstructions(vae, config, k, n, device, temperature):
    """Row 1: test images; row 2: first k layers from their posterior, the rest from the prior."""
    info = data.load_dataset(config['dataset'], config['data_root'], config['image_size'], False)
    images = next(iter(data.eval_batches(info['test'], n, device)))
    x, _ = data.prepare(images, info, config['bits'], config['pad'])
    latents = vae.posterior_latents(x)[:k]
    return [images, vae.sample(len(images), temperature, latents=latents)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint')
    p.add_argument('--n', type=int, default=8, help='images per row')
    p.add_argument('--rows', type=int, default=8, help='rows when a single temperature is given')
    p.add_argument('--temperature', type=float, nargs='+', default=[1.0])
    p.add_argument('--recon_layers', type=int, help='reconstruct test images from the first k layers')
    p.add_argument('--weights', choices=('ema', 'model'), default='ema')
    p.add_argument('--data_root', help='where the test images are (default: the training run\'s)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--scale', type=int, default=2, help='upscale the grid for viewing')
    p.add_argument('--out', default='samples.png')
    args = p.parse_args(argv)
    if args.n < 1 or args.rows < 1:
        raise ValueError('--n and --rows must be at least 1')
    ckpt = load_checkpoint(args.checkpoint, map_location=args.device)
    config = {**ckpt['config'], **({'data_root': args.data_root} if args.data_root else {})}
    vae = model_from_checkpoint(ckpt, args.weights).to(args.device).eval()
    torch.manual_seed(args.seed)
    if args.recon_layers is not None:
        if not 0 <= args.recon_layers <= len(vae.decoder.layers):
            raise ValueError(f'--recon_layers must be in 0..{len(vae.decoder.layers)}')
        rows = reconstructions(vae, config, args.recon_layers, args.n, args.device, args.temperature[0])
    else:
        temps = args.temperature if len(args.temperature) > 1 else args.temperature * args.rows
        rows = [vae.sample(args.n, t) for t in temps]
    save_png(rows, args.out, args.scale)
    print(f"wrote {args.out}: {len(rows)} rows of {args.n}, {args.weights} weights of step {ckpt['step']}")


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f'error: {e}')
