"""
Training and sampling throughput of presets x modes, as a markdown table for the README.

  python bench.py                                              # the default matrix, < 3 minutes on 2 CPU cores
  python bench.py --presets cifar10 attentive_cifar10 --batch_size 4 --modes fp32 compile   # ~20 min on CPU
  python bench.py --presets cifar10 --batch_size 32 --modes fp32 bf16+compile+cl    # on a GPU

A mode joins a dtype (fp32, bf16, fp16: autocast as in train.py) with `compile` (torch.compile, as
--compile) and `cl` (channels_last); the first mode of each preset is the baseline of the ratio
column, measured in the same run. Every row runs in its own process so that peak memory (CUDA:
peak allocated; CPU: peak RSS of the process) does not leak between rows. Training images/s is the
median over timed steps of a synthetic batch (throughput does not depend on pixel values); warm-up
(and so compile time) is excluded and reported apart. Model FLOPs are counted once per step with
torch's FlopCounterMode; utilisation is against the device's dense peak where it is known.
The default matrix leaves compile out: inductor's CPU code generation alone takes 3 to 8 minutes
per preset on 2 cores.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import train
from model import build, model_inputs

# dense peak FLOP/s per dtype (vendor datasheets, SXM parts); fp32 means tensor-core-free fp32
PEAK = {'H100': {'bf16': 989e12, 'fp16': 989e12, 'fp32': 67e12},
        'H200': {'bf16': 989e12, 'fp16': 989e12, 'fp32': 67e12},
        'A100': {'bf16': 312e12, 'fp16': 312e12, 'fp32': 19.5e12}}


def parse_mode(mode):
    parts = mode.split('+')
    dtype = next((p for p in parts if p in ('fp32', 'bf16', 'fp16')), 'fp32')
    unknown = set(parts) - {'fp32', 'bf16', 'fp16', 'compile', 'cl', 'eager'}
    if unknown:
        raise ValueError(f'unknown mode part(s) {sorted(unknown)} in {mode!r}: use fp32|bf16|fp16, compile, cl joined by +')
    return dtype, 'compile' in parts, 'cl' in parts


def peak_flops(device, dtype):
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[dtype] for key, p in PEAK.items() if key in name), None)


def measure(preset, batch_size, mode, steps, warmup, device):
    """One row, in this process -> dict of figures."""
    dtype, compile, channels_last = parse_mode(mode)
    flags = ['--preset', preset, '--batch_size', str(batch_size), '--dtype', dtype]
    config = train.make_config(train.parse_args(flags + ['--compile'] * compile + ['--channels_last'] * channels_last))
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build(config).to(dev)
    optimizer = train.make_optimizer(model, config)
    scaler = torch.amp.GradScaler(dev.type) if dtype == 'fp16' else None
    C, S = config['image_channels'], config['image_size']
    batch = torch.randint(0, 256, (batch_size, C, S, S), dtype=torch.uint8, device=dev)
    info = dict(binary=config['likelihood'] == 'bernoulli', shift=-127.5, scale=1 / 64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    flops = count_flops(model, batch, info, config, dev)
    if compile:
        model.compile()
    step = lambda: train.train_step(model, optimizer, batch, info, config, scaler=scaler)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    model.eval()
    sample_times = []
    with train.autocast(config, dev):
        for _ in range(3):   # the first draw warms up
            t0 = time.perf_counter()
            model.sample(batch_size)
            sync()
            sample_times.append(time.perf_counter() - t0)
    if dev.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB
    step_s = statistics.median(times)
    peak_f = peak_flops(device, dtype)
    return dict(preset=preset, mode=mode, batch=batch_size, step_s=step_s, train_ips=batch_size / step_s,
                sample_ips=batch_size / statistics.median(sample_times[1:]), warmup_s=warmup_s, peak_gib=peak,
                tflops=flops / step_s / 1e12, mfu=flops / step_s / peak_f if peak_f else None,
                params=sum(p.numel() for p in model.parameters()))


def count_flops(model, batch, info, config, device):
    """Model FLOPs of one training step (forward and backward), counted on a copy of the batch."""
    x, target = model_inputs(*train.data.prepare(batch, info, config['bits'], config['pad']), config)
    with FlopCounterMode(display=False) as counter:
        out = model(x, target)
        (out['distortion'] + out['rate']).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--presets', nargs='+', default=['cpu', 'attentive_cpu'], choices=sorted(train.PRESETS))
    p.add_argument('--modes', nargs='+', default=['fp32', 'bf16'])
    p.add_argument('--batch_size', type=int, default=8)
    p.add_argument('--steps', type=int, default=5, help='timed steps (the median is reported)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps first (compilation happens here)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--row', help=argparse.SUPPRESS)   # internal: run one row and print it as JSON
    args = p.parse_args()
    for mode in args.modes:
        parse_mode(mode)
    if args.row:
        preset, mode = args.row.split(':')
        print(json.dumps(measure(preset, args.batch_size, mode, args.steps, args.warmup, args.device)))
        return
    where = torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else f'CPU, {torch.get_num_threads()} threads'
    print(f'torch {torch.__version__}, {where}, batch {args.batch_size}, median of {args.steps} steps '
          f'after {args.warmup} warm-up steps')
    print('| preset | mode | params | train img/s | vs first mode | sample img/s | peak GiB | TFLOP/s | MFU | warm-up s |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for preset in args.presets:
        base = None
        for mode in args.modes:
            cmd = [sys.executable, __file__, '--row', f'{preset}:{mode}', '--batch_size', str(args.batch_size),
                   '--steps', str(args.steps), '--warmup', str(args.warmup), '--device', args.device]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f'| {preset} | {mode} | failed: {done.stderr.strip().splitlines()[-1][:120]} |||||||||', flush=True)
                continue
            r = json.loads(done.stdout.splitlines()[-1])
            base = base or r['train_ips']
            mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] else '-'
            print(f"| {preset} | {mode} | {r['params']:,} | {r['train_ips']:.2f} | {r['train_ips'] / base:.2f}x | "
                  f"{r['sample_ips']:.1f} | {r['peak_gib']:.2f} | {r['tflops']:.3f} | {mfu} | {r['warmup_s']:.1f} |",
                  flush=True)


if __name__ == '__main__':
    main()
