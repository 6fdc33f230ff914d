"""
Training and sampling throughput of the presets: images/s (median of timed steps, warm-up and
compile time excluded and reported apart) and peak memory (CUDA) or peak RSS (CPU). Each
configuration runs in its own process so peak figures do not leak between rows. The first mode
of each preset (fp32 eager by default) is the baseline of the ratio column. Prints a markdown table.

  python bench.py                                          # cpu and attentive_cpu, eager vs compile
  python bench.py --presets cifar10 --batch_size 16 --steps 3 --modes eager
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import train
from model import VAE


def measure(preset, batch_size, mode, steps, warmup, device):
    """One row, in this process: a synthetic batch (throughput does not depend on pixel values)."""
    config = train.make_config(train.parse_args(['--preset', preset, '--batch_size', str(batch_size)]))
    torch.manual_seed(0)
    model = VAE(config).to(device)
    optimizer = train.make_optimizer(model, config)
    C, S = config['image_channels'], config['image_size']
    x = torch.randn(batch_size, C, S, S, device=device)
    target = (torch.rand_like(x) * 2 - 1) if config['likelihood'] == 'dmol' else (torch.rand_like(x) < 0.5).float()
    if mode == 'compile':
        model.compile()
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)

    def step():
        out = model(x, target)
        optimizer.zero_grad(set_to_none=True)
        (out['distortion'] + out['rate']).mean().backward()
        optimizer.step()

    t0 = time.time()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.time() - t0
    times = []
    for _ in range(steps):
        t0 = time.time()
        step()
        sync()
        times.append(time.time() - t0)
    model.eval()
    t0 = time.time()
    model.sample(batch_size)
    sync()
    sample_s = time.time() - t0
    if device.startswith('cuda'):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB
    step_s = statistics.median(times)
    return dict(preset=preset, mode=mode, batch=batch_size, step_s=step_s, train_ips=batch_size / step_s,
                sample_ips=batch_size / sample_s, warmup_s=warm_s, peak_gib=peak,
                params=sum(p.numel() for p in model.parameters()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--presets', nargs='+', default=['cpu', 'attentive_cpu'])
    p.add_argument('--modes', nargs='+', default=['eager', 'compile'], choices=['eager', 'compile'])
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--row', help=argparse.SUPPRESS)   # internal: run one row and print it as JSON
    args = p.parse_args()
    if args.row:
        preset, mode = args.row.split(':')
        print(json.dumps(measure(preset, args.batch_size, mode, args.steps, args.warmup, args.device)))
        return
    print(f'torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, '
          f'batch {args.batch_size}, median of {args.steps} steps after {args.warmup} warm-up steps')
    print('| preset | mode | params | train img/s | vs baseline | sample img/s | peak GiB | warm-up s |')
    print('|---|---|---|---|---|---|---|---|')
    for preset in args.presets:
        base = None
        for mode in args.modes:
            cmd = [sys.executable, __file__, '--row', f'{preset}:{mode}', '--batch_size', str(args.batch_size),
                   '--steps', str(args.steps), '--warmup', str(args.warmup), '--device', args.device]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            base = base or r['train_ips']
            print(f"| {preset} | {mode} | {r['params']:,} | {r['train_ips']:.2f} | {r['train_ips'] / base:.2f}x | "
                  f"{r['sample_ips']:.1f} | {r['peak_gib']:.2f} | {r['warmup_s']:.1f} |", flush=True)


if __name__ == '__main__':
    main()
