"""
Draw samples from a trained model into a PNG grid.

  python sample.py out/ckpt-00001000.pt                       # 8 x 8 samples at temperature 1
  python sample.py ckpt.pt --temperature 1.0 0.9 0.8 0.6     # one row per temperature
  python sample.py ckpt.pt --recon_layers 4                  # test images, first 4 layers from the posterior
  python sample.py ckpt.pt --layers_figure --n 8             # VDVAE figure 4: rows fixing the first k layers

The checkpoint carries its config; EMA weights by default (--weights model for the raw ones).
A checkpoint written on a GPU samples on a CPU.
"""
import argparse
import sys

import numpy as np
import torch
from PIL import Image

import data
import figures
from model import get_device, load_checkpoint, model_from_checkpoint, model_inputs, n_layers


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
    figures.write_atomic(path, image.save)


def reconstructions(vae, info, config, k, n, device, temperature):
    """Row 1: test images; row 2: first k layers from their posterior, the rest from the prior."""
    images = next(iter(data.eval_batches(info['test'], n, device)))
    x, _ = model_inputs(*data.prepare(images, info, config['bits'], config['pad']), config)
    latents = vae.posterior_latents(x)[:k]
    return [images, vae.sample(len(images), temperature, latents=latents)]


def test_image(info, i, device):
    """Test image i as uint8 (1, C, H, W), from a tensor split or an image folder."""
    if not 0 <= i < len(info['test']):
        raise ValueError(f"--image_index must be in 0..{len(info['test']) - 1}")
    image = info['test'][i]
    if image is None:
        raise ValueError(f"test image {i} ({info['test'].files[i]}) is unreadable: choose another --image_index")
    return image[None].to(device)


def layers_figure(vae, info, config, image, ks, n, temperature):
    """The very deep VAE's figure 4: for each k, a row of the test image (uint8 (1, C, H, W)) then
    n samples that share the latents of its posterior in the first k layers (one posterior draw,
    the same in every row) and draw the rest from the prior at `temperature`.
    -> rows of uint8 (1 + n, C, H, W), row labels."""
    x, _ = model_inputs(*data.prepare(image, info, config['bits'], config['pad']), config)
    latents = vae.posterior_latents(x)                                  # list of (1, z, r, r)
    rows = []
    for k in ks:
        fixed = [z.repeat(n, 1, 1, 1) for z in latents[:k]]
        rows.append(torch.cat([image, vae.sample(n, temperature, latents=fixed).to(image.device)]))
    return rows, [f'k = {k}' for k in ks]


def default_ks(n_layers):
    """0, 1, 2, 4, 8, ... and all the layers."""
    ks = [0] + [2 ** i for i in range(n_layers.bit_length()) if 2 ** i < n_layers]
    return ks + [n_layers]


def save_layers_figure(rows, labels, path, scale, title, subtitle):
    """The grid with a row label on the left and the columns named above."""
    g = grid(rows)
    g = g.repeat(scale, 0).repeat(scale, 1) if scale > 1 else g
    cell = (rows[0].shape[-1] + 2) * scale
    room = g.shape[1] - cell - 16   # the samples' header: the longest that fits above them
    header = next((t for t in ('samples: first k layers fixed, the rest from the prior', 'samples: first k layers fixed')
                   if figures.font(14).getlength(t) <= room), 'samples')
    columns = {cell // 2 + scale: 'test image', cell + (g.shape[1] - cell) // 2: header}
    figures.write_atomic(path, figures.labelled_grid(g, labels, title, subtitle, columns).save)


def check_args(args):
    """Flags that would be ignored or make no figure: one line before any work."""
    if args.n < 1 or args.rows < 1 or args.scale < 1:
        raise ValueError('--n, --rows and --scale must be at least 1')
    if any(t < 0 for t in args.temperature or []):
        raise ValueError(f'--temperature must be 0 or more, not {min(args.temperature)}')
    if args.recon_layers is not None and args.layers_figure:
        raise ValueError('--recon_layers and --layers_figure make two different figures: give one')
    if args.layers and not args.layers_figure:
        raise ValueError('--layers picks the rows of --layers_figure: add it')
    if (args.recon_layers is not None or args.layers_figure) and len(args.temperature or []) > 1:
        raise ValueError('--recon_layers and --layers_figure draw at one --temperature')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint')
    p.add_argument('--n', type=int, default=8, help='images per row')
    p.add_argument('--rows', type=int, default=8, help='rows when a single temperature is given')
    p.add_argument('--temperature', type=float, nargs='+', help='default 1.0 (0.6 for --layers_figure)')
    p.add_argument('--recon_layers', type=int, help='reconstruct test images from the first k layers')
    p.add_argument('--layers_figure', action='store_true',
                   help='rows that fix the first k layers to one test image\'s posterior latents')
    p.add_argument('--layers', type=int, nargs='+', help='the k of each row (default 0, 1, 2, 4, ..., L)')
    p.add_argument('--image_index', type=int, default=0, help='which test image --layers_figure uses')
    p.add_argument('--weights', choices=('ema', 'model'), default='ema')
    p.add_argument('--data_root', help='where the test images are (default: the training run\'s)')
    p.add_argument('--device', help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--scale', type=int, default=2, help='upscale the grid for viewing')
    p.add_argument('--out', default='samples.png')
    args = p.parse_args(argv)
    check_args(args)
    figures.check_out(args.out, image=True, source=args.checkpoint)
    args.device = get_device(args.device)
    temperature = args.temperature or [0.6 if args.layers_figure else 1.0]
    ckpt = load_checkpoint(args.checkpoint, map_location=args.device)
    config = {**ckpt['config'], **({'data_root': args.data_root} if args.data_root else {})}
    vae = model_from_checkpoint(ckpt, args.weights).to(args.device).eval()
    if args.recon_layers is not None or args.layers_figure:   # the run's split and normalisation
        info = data.load_run_dataset(config, ckpt.get('dataset'))
        data.check_fits(info, config, config['dataset'])
    torch.manual_seed(args.seed)
    if args.recon_layers is not None:
        if not 0 <= args.recon_layers <= n_layers(vae):
            raise ValueError(f'--recon_layers must be in 0..{n_layers(vae)}')
        rows = reconstructions(vae, info, config, args.recon_layers, args.n, args.device, temperature[0])
    elif args.layers_figure:
        L = n_layers(vae)
        ks = args.layers or default_ks(L)
        if not all(0 <= k <= L for k in ks):
            raise ValueError(f'--layers must be in 0..{L}, got {ks}')
        image = test_image(info, args.image_index, args.device)
        rows, labels = layers_figure(vae, info, config, image, ks, args.n, temperature[0])
        title = f'Each row: the first k of {L} layers from the test image\'s posterior'
        subtitle = (f"the rest from the prior at temperature {temperature[0]:g}; {args.checkpoint}, "
                    f"{args.weights} weights, step {ckpt['step']}, test image {args.image_index}")
        save_layers_figure(rows, labels, args.out, args.scale, title, subtitle)
    else:
        temps = temperature if len(temperature) > 1 else temperature * args.rows
        rows = [vae.sample(args.n, t) for t in temps]
    if not args.layers_figure:
        save_png(rows, args.out, args.scale)
    print(f"wrote {args.out}: {len(rows)} rows of {args.n}, {args.weights} weights of step {ckpt['step']}")


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:   # bad input, an unwritable output: one line
        sys.exit(f'error: {e}')
