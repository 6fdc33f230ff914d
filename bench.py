"""
Training and sampling throughput of presets x modes, as a markdown table for the README.

  python bench.py                                              # the default matrix, < 3 minutes on 2 CPU cores
  python bench.py --presets cifar10 attentive_cifar10 --batch_size 4 --modes fp32 compile   # ~20 min on CPU
  python bench.py --presets cifar10 --batch_size 32 --modes fp32 bf16+compile+cl    # on a GPU
  python bench.py --against ../hvae-old                        # each row also with another checkout's code
  python bench.py --activations --presets cifar10 ffhq1024 --batch_size 1   # activation memory, meta device

A mode joins a dtype (fp32, bf16, fp16: autocast as in train.py) with `compile` (torch.compile, as
--compile), `cl` (channels_last), `ckpt` (--grad_checkpoint) and `notf32` (full fp32 convolutions, as
--no_tf32; plain fp32 runs them as TF32 on Ampere and later GPUs, and MFU is then against the TF32
peak); the first mode of each preset is the baseline of the ratio
column, measured in the same run. Every row runs in its own process so that peak memory (CUDA:
peak allocated; CPU: peak RSS of the process) does not leak between rows. Training images/s is the
median over timed steps of a synthetic batch (throughput does not depend on pixel values); warm-up
(and so compile time) is excluded and reported apart. The loss column is the training loss of the
last step (same seed, same batch, same initial weights in every mode): bf16 against fp32. Model FLOPs are counted once per step with
torch's FlopCounterMode; utilisation is against the device's dense peak where it is known.
The default matrix leaves compile out: inductor's CPU code generation alone takes 3 to 8 minutes
per preset on 2 cores.

Honest figures: every row reports the share of its wall time that runnable threads waited for a
core (the `some` line of /proc/pressure/cpu, read before and after the row). Anything else running
on the machine shows there; a row above 5% is marked as not to be trusted. `--against DIR` runs
each row also with the bench.py of another checkout (say, the commit before a change), alternating
the two, so that a before/after comparison is taken in one run under the same conditions.
This machine's speed also drifts by 20-40% between processes and minutes in ways that pressure does
not show (other tenants of the host); `--interleave` builds every mode of a preset in one process
and times their steps in turns, so that the ratio column (the median over rounds) holds anyway:

  python bench.py --interleave --presets cpu --batch_size 32 --modes fp32 compile --steps 20 --warmup 3
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import train
from layers import Tower
from model import build, get_device, model_inputs

# dense peak FLOP/s per dtype (vendor datasheets, SXM parts); fp32 means tensor-core-free fp32, tf32
# is fp32 on the tensor cores: PyTorch's default for fp32 convolutions on these GPUs
PEAK = {'H100': {'bf16': 989e12, 'fp16': 989e12, 'tf32': 494.5e12, 'fp32': 67e12},
        'H200': {'bf16': 989e12, 'fp16': 989e12, 'tf32': 494.5e12, 'fp32': 67e12},
        'A100': {'bf16': 312e12, 'fp16': 312e12, 'tf32': 156e12, 'fp32': 19.5e12}}


def parse_mode(mode):
    parts = mode.split('+')
    dtype = next((p for p in parts if p in ('fp32', 'bf16', 'fp16')), 'fp32')
    unknown = set(parts) - {'fp32', 'bf16', 'fp16', 'compile', 'cl', 'ckpt', 'notf32', 'eager'}
    if unknown:
        raise ValueError(f'unknown mode part(s) {sorted(unknown)} in {mode!r}: use fp32|bf16|fp16, compile, cl, ckpt, notf32 joined by +')
    return dtype, 'compile' in parts, 'cl' in parts, 'ckpt' in parts


def peak_flops(device, dtype, tf32=False):
    # fp32 with TF32 on (train.set_precision) runs at the tf32 peak: against the fp32 one MFU tops 100%
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    dtype = 'tf32' if dtype == 'fp32' and tf32 else dtype
    return next((p[dtype] for key, p in PEAK.items() if key in name), None)


def cpu_pressure():
    """Total microseconds that some runnable thread waited for a CPU (Linux PSI), or None."""
    try:
        with open('/proc/pressure/cpu') as f:
            return int(f.readline().split('total=')[1])
    except (OSError, IndexError, ValueError):
        return None


def busy(wait):
    """The CPU-wait cell: a row that waited for a core over 5% of its time is not a figure."""
    return '-' if wait is None else f'{100 * wait:.1f}%' + (' (busy: not a figure)' if wait > 0.05 else '')


def run_row(code_dir, preset, mode, args):
    """One row in its own process, with `code_dir`'s bench.py -> (figures or None, error, CPU wait share)."""
    cmd = [sys.executable, os.path.join(code_dir, 'bench.py'), '--row', f'{preset}:{mode}',
           '--batch_size', str(args.batch_size), '--steps', str(args.steps), '--warmup', str(args.warmup),
           '--device', args.device]
    p0, t0 = cpu_pressure(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=code_dir)
    p1, wall = cpu_pressure(), time.perf_counter() - t0
    wait = (p1 - p0) / 1e6 / wall if p0 is not None and p1 is not None else None
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ['no output'])[-1][:120], wait
    return json.loads(done.stdout.splitlines()[-1]), '', wait


def synchronize(device):
    if device.type == 'cuda':   # CUDA runs asynchronously: wait for the step before reading the clock
        torch.cuda.synchronize(device)


def prepare(preset, batch_size, mode, device):
    """Model, optimizer and synthetic batch of one row -> (step function, model, config, batch, info, device)."""
    dtype, compile, channels_last, grad_checkpoint = parse_mode(mode)
    flags = ['--preset', preset, '--batch_size', str(batch_size), '--dtype', dtype]
    flags += ['--no_tf32'] * ('notf32' in mode.split('+'))
    config = train.make_config(train.parse_args(flags + ['--compile'] * compile + ['--channels_last'] * channels_last))
    dev = torch.device(device)
    train.set_precision(config)   # TF32 and cuDNN's autotuner as train.py sets them
    torch.manual_seed(0)
    model = build(config).to(dev)
    if grad_checkpoint:
        model.set_grad_checkpoint(True)
    optimizer = train.make_optimizer(model, config)
    scaler = torch.amp.GradScaler(dev.type) if dtype == 'fp16' else None
    C, S = config['image_channels'], config['image_size'] - 2 * config['pad']   # as stored: data.prepare pads
    batch = torch.randint(0, 256, (batch_size, C, S, S), dtype=torch.uint8, device=dev)
    info = dict(binary=config['likelihood'] == 'bernoulli', shift=-127.5, scale=1 / 64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()

    def step():
        """One training step, synchronised -> its training loss (nats/dim)."""
        loss = train.train_step(model, optimizer, batch, info, config, scaler=scaler)[0]['elbo']
        synchronize(dev)
        return loss
    return step, model, config, batch, info, dev


def measure(preset, batch_size, mode, steps, warmup, device):
    """One row, in this process -> dict of figures."""
    step, model, config, batch, info, dev = prepare(preset, batch_size, mode, device)
    losses = []
    t0 = time.perf_counter()
    for _ in range(warmup):
        losses.append(step())
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    model.eval()
    sample_times = []
    with train.autocast(config, dev):
        for _ in range(3):   # the first draw warms up
            t0 = time.perf_counter()
            model.sample(batch_size)
            synchronize(dev)
            sample_times.append(time.perf_counter() - t0)
    if dev.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB
    model.train()
    flops = count_flops(model, batch, info, config, dev)   # after the peak: its own pass must not set it
    step_s = statistics.median(times)
    peak_f = peak_flops(device, config['dtype'], config['tf32'] and torch.backends.cudnn.allow_tf32)
    return dict(preset=preset, mode=mode, batch=batch_size, step_s=step_s, loss=losses[-1], train_ips=batch_size / step_s,
                sample_ips=batch_size / statistics.median(sample_times[1:]), warmup_s=warmup_s, peak_gib=peak,
                tflops=flops / step_s / 1e12, mfu=flops / step_s / peak_f if peak_f else None,
                params=sum(p.numel() for p in model.parameters()))


def interleave(preset, batch_size, modes, steps, warmup, device):
    """Every mode's model in this one process, their timed steps taken in turns (the order rotated
    each round): a slow stretch of the machine then slows every mode alike. -> per mode: median
    images/s, the median over rounds of its speed against the first mode's, and its warm-up s."""
    runs = [prepare(preset, batch_size, mode, device)[0] for mode in modes]
    warmup_s = []
    for step in runs:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        warmup_s.append(time.perf_counter() - t0)
    times = [[] for _ in modes]
    for k in range(steps):
        for i in (list(range(len(modes)))[k % len(modes):] + list(range(len(modes)))[:k % len(modes)]):
            t0 = time.perf_counter()
            runs[i]()
            times[i].append(time.perf_counter() - t0)
    return [dict(mode=mode, train_ips=batch_size / statistics.median(t), warmup_s=w,
                 ratio=statistics.median(b / a for a, b in zip(t, times[0])))
            for mode, t, w in zip(modes, times, warmup_s)]


def activation_gib(preset, batch_size=1):
    """Tensors saved for the backward pass of one training forward at `batch_size`, fp32, counted on
    the meta device (no memory, no data) -> (GiB plain, GiB with --grad_checkpoint). The second is
    the plain count less what the checkpointed modules save, plus what they keep instead (their
    inputs) and one module's activations at a time (recomputed in the backward pass)."""
    config = train.make_config(train.parse_args(['--preset', preset]))
    with torch.device('meta'):
        model = build(config)
        S, C = config['image_size'], config['image_channels']
        x = torch.zeros(batch_size, C, S, S)
    total, inside, inputs = [0], {}, [0]
    if config['model'] == 'nvae':   # what --grad_checkpoint recomputes
        modules = [m for m in model.modules() if isinstance(m, Tower)]
    else:
        modules = list(model.encoder.blocks) + list(model.decoder.layers)
    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    def enter(module, args):
        inside[module] = total[0]
        inputs[0] += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    def leave(module, args, out):
        inside[module] = total[0] - inside[module]
    hooks = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    for h in hooks:
        h.remove()
    plain = total[0]
    ckpt = plain - sum(inside.values()) + inputs[0] + max(inside.values())
    return plain / 2**30, ckpt / 2**30


def count_flops(model, batch, info, config, device):
    """Model FLOPs of one training step (forward and backward), counted on a copy of the batch."""
    x, target = model_inputs(*train.data.prepare(batch, info, config['bits'], config['pad']), config)
    with FlopCounterMode(display=False) as counter:
        out = model(x, target)
        (out['distortion'] + out['rate']).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def check_args(args):
    """Impossible flags: one line before any row is built."""
    for mode in args.modes:
        parse_mode(mode)
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        raise ValueError('--steps and --batch_size must be at least 1, --warmup at least 0')
    args.device = str(get_device(args.device))
    if 'fp16' in '+'.join(args.modes) and not args.device.startswith('cuda'):
        raise ValueError('fp16 needs a CUDA device (as train.py --dtype fp16); use bf16 or fp32 on CPU')
    for d in args.against:
        if not os.path.isfile(os.path.join(d, 'bench.py')):
            raise ValueError(f'--against {d}: no bench.py there (a checkout of hvae?)')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--presets', nargs='+', default=['cpu', 'attentive_cpu'], choices=sorted(train.PRESETS))
    p.add_argument('--modes', nargs='+', default=['fp32', 'bf16'])
    p.add_argument('--batch_size', type=int, default=8)
    p.add_argument('--steps', type=int, default=5, help='timed steps (the median is reported)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps first (compilation happens here)')
    p.add_argument('--device', help='default: cuda if available, else cpu')
    p.add_argument('--against', nargs='*', default=[], metavar='DIR',
                   help='other checkouts whose bench.py also runs every row (before/after in one run)')
    p.add_argument('--interleave', action='store_true',
                   help="each preset's modes in one process, steps in turns: ratios that hold on a noisy machine")
    p.add_argument('--activations', action='store_true',
                   help='only count each preset\'s activation memory per batch on the meta device (instant)')
    p.add_argument('--row', help=argparse.SUPPRESS)   # internal: run one row and print it as JSON
    args = p.parse_args()
    check_args(args)
    if args.activations:
        print(f'| preset | params | activations at batch {args.batch_size}, fp32 | with --grad_checkpoint |')
        print('|---|---|---|---|')
        for preset in args.presets:
            with torch.device('meta'):
                params = sum(p.numel() for p in build(train.make_config(train.parse_args(['--preset', preset]))).parameters())
            plain, ckpt = activation_gib(preset, args.batch_size)
            print(f'| {preset} | {params:,} | {plain:.2f} GiB | {ckpt:.2f} GiB |', flush=True)
        return
    if args.interleave:
        print_interleaved(args)
        return
    if args.row:
        preset, mode = args.row.split(':')
        print(json.dumps(measure(preset, args.batch_size, mode, args.steps, args.warmup, args.device)))
        return
    where = torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else f'CPU, {torch.get_num_threads()} threads'
    print(f'torch {torch.__version__}, {where}, batch {args.batch_size}, median of {args.steps} steps '
          f'after {args.warmup} warm-up steps')
    print('| preset | mode | code | params | train img/s | vs first row | sample img/s | peak GiB | TFLOP/s | MFU '
          '| warm-up s | loss (nats/dim) | CPU wait |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    failures = 0
    codes = [('this', os.path.dirname(os.path.abspath(__file__)))]
    codes += [(os.path.basename(os.path.normpath(d)), os.path.abspath(d)) for d in args.against]
    for preset in args.presets:
        base = None
        for mode in args.modes:
            for name, code_dir in (codes if len(codes) == 1 else codes[::-1] + codes):   # A B B A when comparing
                r, error, wait = run_row(code_dir, preset, mode, args)
                if r is None:
                    print(f'| {preset} | {mode} | {name} | failed: {error} ||||||||| {busy(wait)} |', flush=True)
                    failures += 1
                    continue
                base = base or r['train_ips']
                mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] else '-'
                print(f"| {preset} | {mode} | {name} | {r['params']:,} | {r['train_ips']:.2f} | {r['train_ips'] / base:.2f}x | "
                      f"{r['sample_ips']:.1f} | {r['peak_gib']:.2f} | {r['tflops']:.3f} | {mfu} | {r['warmup_s']:.1f} "
                      f"| {r.get('loss', float('nan')):.4f} | {busy(wait)} |", flush=True)
    if failures:
        sys.exit(f'{failures} row(s) failed (the table says why)')


def print_interleaved(args):
    if args.against or any('notf32' in m.split('+') for m in args.modes):
        raise SystemExit('--interleave compares modes of this checkout in one process: not with --against (a '
                         'process per checkout) nor notf32 (a setting of the whole process)')
    print(f'torch {torch.__version__}, {args.device}, batch {args.batch_size}, {args.steps} rounds of one step '
          f'per mode, after {args.warmup} warm-up steps each; ratio: median over rounds')
    print('| preset | mode | train img/s | vs first mode | warm-up s | CPU wait |')
    print('|---|---|---|---|---|---|')
    for preset in args.presets:
        p0, t0 = cpu_pressure(), time.perf_counter()
        rows = interleave(preset, args.batch_size, args.modes, args.steps, args.warmup, args.device)
        p1, wall = cpu_pressure(), time.perf_counter() - t0
        wait = (p1 - p0) / 1e6 / wall if p0 is not None and p1 is not None else None
        for r in rows:
            print(f"| {preset} | {r['mode']} | {r['train_ips']:.2f} | {r['ratio']:.3f}x | {r['warmup_s']:.1f} | {busy(wait)} |",
                  flush=True)


if __name__ == '__main__':
    try:
        main()
    except ValueError as e:
        sys.exit(f'error: {e}')
