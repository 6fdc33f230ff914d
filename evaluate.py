"""
Test-set likelihood of a checkpoint with its standard error, and the KL of every layer.

  python evaluate.py out/ckpt-00001000.pt                  # negative ELBO, KL per layer (+ a bar chart PNG)
  python evaluate.py ckpt.pt --iw 100                      # + the importance-weighted bound, 100 samples
  python evaluate.py ckpt.pt --iw 1000 --iw_chunk 50       # 50 samples per image per forward pass
  python evaluate.py ckpt.pt --max_batches 10 --split valid --json result.json

Units: bits/dim (nats per image for binary data). The negative ELBO (distortion + rate) is an
upper bound on -log p(x); the distortion alone is not the likelihood (DESIGN.md 1.6). The
importance-weighted bound with K samples z_k ~ q(z|x) (DESIGN.md 2.5; Burda et al. 2016),
    log p(x) >= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),
is tighter for larger K and equals the one-sample ELBO at K = 1.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import data
import figures
from model import get_device, latent_shapes, load_checkpoint, model_from_checkpoint, model_inputs

ACTIVE_SHARE = 0.01   # a layer is active when its KL is at least 1% of the rate


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


def in_units(nats, dims, binary):
    """Per-image nats -> (values, unit): nats per image for binary data, else bits per dim."""
    return (nats, 'nats/image') if binary else (nats / (dims * math.log(2)), 'bits/dim')


def active_layers(kl, share=ACTIVE_SHARE):
    """kl: (L,) mean KL per layer -> indices of the layers holding at least `share` of the rate."""
    rate = kl.sum()
    return [i for i, k in enumerate(kl) if rate > 0 and k >= share * rate]


# -----------------------------------------------------------------------------
# the importance-weighted bound

def layer_noise(vae, n, generator):
    """One N(0, I) draw per layer for n images: list of (n, z, r, r)."""
    device = generator.device
    return [torch.randn(n, *shape, generator=generator, device=device) for shape in latent_shapes(vae)]


@torch.no_grad()
def log_weights(vae, x, target, eps):
    """log w = log p(x|z) + log p(z) - log q(z|x) in nats, (B,), for z = mean_q + sigma_q * eps."""
    out = vae(x, target, eps, sampled_kl=True)
    dims = vae.crop(target[:1]).numel()
    return -(out['distortion'].double() + out['rate'].double()) * dims


@torch.no_grad()
def iw_nll(vae, x, target, k, chunk, generator, progress=None):
    """The importance-weighted estimate of -log p(x), (B,) nats:
        -(logsumexp_k log w_k - log K),  z_k ~ q(z|x),
    drawn `chunk` samples per image per forward pass, with a running logsumexp so memory does
    not grow with K. Sample j's noise is drawn as the j-th draw of the generator whatever the
    chunk, so chunked and unchunked runs see the same z_k."""
    B = len(x)
    total = torch.full((B,), -math.inf, dtype=torch.float64, device=x.device)
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        draws = [layer_noise(vae, B, generator) for _ in range(c)]          # c x L x (B, z, r, r)
        eps = [torch.stack(per_layer, 1).flatten(0, 1) for per_layer in zip(*draws)]   # (B c, z, r, r), image-major
        log_w = log_weights(vae, x.repeat_interleave(c, 0), target.repeat_interleave(c, 0), eps).view(B, c)
        total = torch.logaddexp(total, log_w.logsumexp(1))
        if progress is not None:
            progress.add(B * c / k)
    return -(total - math.log(k))


def fmt_time(seconds):
    return f'{seconds / 3600:.1f}h' if seconds >= 3600 else f'{seconds / 60:.1f}m' if seconds >= 60 else f'{seconds:.0f}s'


class Progress:
    """A progress line with an ETA on stderr, counting images (fractions while an image's samples
    are drawn): rewritten in place on a terminal, else a line every 30 s."""

    def __init__(self, total, what, every=30.0):
        self.total, self.what, self.done, self.t0, self.last = total, what, 0.0, time.time(), time.time()
        self.tty = sys.stderr.isatty()
        self.every = 1.0 if self.tty else every

    def add(self, images):
        self.done += images
        now, finished = time.time(), self.done >= self.total - 1e-6
        if now - self.last < self.every and not finished:
            return
        self.last, elapsed = now, now - self.t0
        eta = elapsed * (self.total - self.done) / max(self.done, 1e-9)
        line = (f'{self.what}: {self.done:.1f}/{self.total} images, {fmt_time(elapsed)} elapsed, '
                f'eta {fmt_time(max(eta, 0))}')
        print(line, end='\n' if finished or not self.tty else '\r', file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(vae, split, info, config, device, max_batches=0, iw=0, iw_chunk=1):
    """Per image, in order: negative ELBO (N,) nats/dim and per-layer KL (N, L) nats, analytic,
    as train.py's evaluation (same seed, same posterior draws); with iw > 0 also the
    importance-weighted -log p(x) (N,) nats, from a generator of its own so the ELBO's draws
    do not depend on it, and the same whatever iw_chunk (a forward pass holds batch_size x
    iw_chunk images). fp32, the caller's RNG state untouched."""
    vae.eval()
    batch_size = config['batch_size']
    total = min(len(split), max_batches * batch_size) if max_batches else len(split)
    progress = Progress(total, f'importance-weighted bound, K = {iw}') if iw else None
    nelbo, kl, nll = [], [], []
    generator = torch.Generator(device=device).manual_seed(config['seed'] + 1)
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(config['seed'])
        for i, batch in enumerate(data.eval_batches(split, batch_size, device)):
            if max_batches and i >= max_batches:
                break
            x, target = model_inputs(*data.prepare(batch, info, config['bits'], config['pad']), config)
            out = vae(x, target)
            nelbo.append(out['distortion'] + out['rate'])
            kl.append(out['kl'])
            if iw:
                nll.append(iw_nll(vae, x, target, iw, iw_chunk, generator, progress))
    return torch.cat(nelbo).cpu(), torch.cat(kl).cpu(), torch.cat(nll).cpu() if iw else None


def summary(nelbo, kl, nll, dims, binary):
    """Everything as plain numbers (for --json and the depth study); units as printed."""
    value, unit = in_units(nelbo.double() * dims, dims, binary)
    n = len(value)
    se = lambda v: v.std().item() / math.sqrt(n) if n > 1 else float('nan')
    rate = kl.double().mean(0)
    out = dict(unit=unit, images=n, nelbo=value.mean().item(), nelbo_se=se(value),
               rate_bits=rate.sum().item() / math.log(2), kl_bits=(rate / math.log(2)).tolist(),
               active_layers=active_layers(rate), active_share=ACTIVE_SHARE)
    if nll is not None:
        iw, _ = in_units(nll, dims, binary)
        out.update(iw_nll=iw.mean().item(), iw_nll_se=se(iw), iw_gap=(value - iw).mean().item(),
                   iw_gap_se=se(value - iw))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint')
    p.add_argument('--split', choices=('test', 'valid'), default='test')
    p.add_argument('--weights', choices=('ema', 'model'), default='ema')
    p.add_argument('--max_batches', type=int, default=0, help='0: the whole split')
    p.add_argument('--batch_size', type=int, help='default: the training batch size')
    p.add_argument('--iw', type=int, default=0, help='importance samples per image (0: the ELBO only)')
    p.add_argument('--iw_chunk', type=int, help='importance samples per image per forward pass; a pass '
                   'holds batch_size x iw_chunk images (default: passes of about 128 images)')
    p.add_argument('--kl_png', help='bar chart of the KL per layer (default: next to the checkpoint, '
                   '<checkpoint>-kl-<split>.png; "" for none)')
    p.add_argument('--json', help='also write the results to this JSON file')
    p.add_argument('--data_root', help='default: the training run\'s')
    p.add_argument('--device', help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    args = p.parse_args(argv)
    if args.iw < 0 or (args.iw_chunk is not None and args.iw_chunk < 1) or args.max_batches < 0:
        raise ValueError(f'need --iw >= 0, --iw_chunk >= 1 and --max_batches >= 0 '
                         f'(got {args.iw}, {args.iw_chunk}, {args.max_batches})')
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f'--batch_size must be at least 1, not {args.batch_size}')
    args.device = get_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, map_location=args.device)
    png = args.kl_png if args.kl_png is not None else f'{os.path.splitext(args.checkpoint)[0]}-kl-{args.split}.png'
    for path, flag, image in ((png, '--kl_png', True), (args.json, '--json', False)):   # before the work
        if path:
            figures.check_out(path, flag, image, source=args.checkpoint)
    config = dict(ckpt['config'])
    config.update({k: v for k, v in (('data_root', args.data_root), ('batch_size', args.batch_size)) if v})
    chunk = args.iw_chunk or max(1, min(args.iw, 128 // config['batch_size']))
    vae = model_from_checkpoint(ckpt, args.weights).to(args.device).float()
    info = data.load_run_dataset(config, ckpt.get('dataset'))   # the run's split and normalisation
    data.check_fits(info, config, config['dataset'])
    nelbo, kl, nll = evaluate(vae, info[args.split], info, config, torch.device(args.device),
                              args.max_batches, args.iw, chunk)
    dims = config['image_channels'] * (config['image_size'] - 2 * config['pad']) ** 2
    result = summary(nelbo, kl, nll, dims, info['binary'])
    lines = report(nelbo, kl, dims, info['binary'], args.weights, ckpt['step'], args.split)
    active = result['active_layers']
    lines.append(f"active layers (KL >= {100 * ACTIVE_SHARE:g}% of the rate): {len(active)} of {len(kl[0])}: "
                 f"{', '.join(map(str, active)) or 'none'}")
    if nll is not None:
        lines.append(f"{args.split} importance-weighted NLL, K = {args.iw}: {result['iw_nll']:.4f} +- "
                     f"{result['iw_nll_se']:.4f} {result['unit']} (tighter than the ELBO by "
                     f"{result['iw_gap']:.4f} +- {result['iw_gap_se']:.4f})")
    print('\n'.join(lines), flush=True)   # the numbers first: a failed write below does not lose them
    if png:
        figures.write_atomic(png, lambda tmp: figures.bar_chart(
            result['kl_bits'], tmp, f"KL per layer, {args.split} set: {args.checkpoint}",
            f"{len(nelbo)} images, {args.weights} weights, step {ckpt['step']}; "
            f"rate {result['rate_bits']:.1f} bits/image; ELBO {result['nelbo']:.3f} {result['unit']}"))
        print(f'wrote {png}')
    if args.json:
        result.update(checkpoint=args.checkpoint, step=ckpt['step'], split=args.split, weights=args.weights,
                      iw=args.iw, layers=len(kl[0]), params=sum(t.numel() for t in vae.parameters()))
        text = json.dumps(result, indent=1)
        figures.write_atomic(args.json, lambda tmp: Path(tmp).write_text(text))
        print(f'wrote {args.json}')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:   # bad input, an unwritable output: one line
        sys.exit(f'error: {e}')
