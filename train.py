"""
Train a hierarchical VAE and checkpoint it so that a run can stop and resume exactly.

  python train.py --dataset cifar10 --depth 16                   # one GPU, or the CPU
  python train.py --preset cpu --data_root ../shared/data --max_minutes 12
  python train.py --preset cpu --out_dir runs/cpu --resume       # continue where it stopped

One plain config dict (a preset, then the flags over it) builds the model and drives training;
every checkpoint carries it, so sample.py and evaluate.py need nothing else.
Recipe of the very deep VAE (../shared/DESIGN.md 1.7): AdamW, linear warm-up, EMA of the weights,
gradient clipping, and updates skipped when the gradient norm is too large or not finite. The
attentive presets follow the official attentive VAE instead (../shared/ATTENTIVE.md 7: Keras
Adamax, cosine schedule, KL warm-up, the L2 penalty; non-finite updates are still skipped).
"""
import argparse
import ctypes
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import nvae
from model import (VAE, MODEL_KEYS, build, n_layers, model_inputs, load_checkpoint, scale_depth, get_device,
                   CHECKPOINT_FORMAT)

CIFAR10 = dict(enc_blocks='32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3',
               dec_blocks='1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21')
PRESETS = {
    # the reference very deep VAE presets (DESIGN.md 1.8); batch_size is per process
    'cifar10': dict(dataset='cifar10', image_size=32, width=384, zdim=16, **CIFAR10, num_mixtures=10,
                    lr=2e-4, batch_size=16, grad_clip=200, skip_threshold=400, ema_rate=0.9999),
    'imagenet32': dict(dataset='imagenet32', image_size=32, width=512, zdim=16, num_mixtures=10,
                       enc_blocks='32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6',
                       dec_blocks='1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40',
                       lr=1.5e-4, batch_size=8, grad_clip=200, skip_threshold=300, ema_rate=0.999),
    'imagenet64': dict(dataset='imagenet64', image_size=64, width=512, zdim=16, num_mixtures=10,
                       enc_blocks='64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5',
                       dec_blocks='1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12',
                       lr=1.5e-4, batch_size=4, grad_clip=220, skip_threshold=380, ema_rate=0.999),
    'ffhq256': dict(dataset='folder', image_size=256, bits=5, width=512, zdim=16, num_mixtures=10,
                    enc_blocks='256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4',
                    dec_blocks='1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128',
                    lr=1.5e-4, batch_size=1, grad_clip=130, skip_threshold=180, ema_rate=0.999,
                    folders='images1024x1024'),   # FFHQ's download: not its thumbnails128x128/ beside it
    # the reference's hps (70 stochastic layers): 16 channels at 1024, 32 at 512, 64 at 256, 512 below
    'ffhq1024': dict(dataset='folder', image_size=1024, width=16, zdim=16, num_mixtures=2,
                     custom_width='512:32,256:64,128:512,64:512,32:512,16:512,8:512,4:512,1:512',
                     enc_blocks='1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,'
                                '16x7,16d2,8x5,8d2,4x5,4d4,1x4',
                     dec_blocks='1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,'
                                '256m128,256x2,512m256,1024m512',
                     lr=7e-5, batch_size=1, grad_clip=360, skip_threshold=500, ema_rate=0.999,
                     folders='images1024x1024'),
    # binary MNIST, padded 28 -> 32, Bernoulli likelihood (as the attentive VAE paper)
    'mnist': dict(dataset='mnist', image_size=32, image_channels=1, likelihood='bernoulli', pad=2,
                  width=64, zdim=16, enc_blocks='32x1,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x1',
                  dec_blocks='1x1,4m1,4x2,8m4,8x3,16m8,16x3,32m16,32x1',
                  lr=2e-3, batch_size=32, warmup_steps=20, grad_clip=200, skip_threshold=1000, ema_rate=0.999),
    # a small CIFAR-10 model that learns visibly in minutes on 2 CPU cores
    'cpu': dict(dataset='cifar10', image_size=32, width=64, zdim=16, num_mixtures=10,
                enc_blocks='32x1,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x1',
                dec_blocks='1x1,4m1,4x2,8m4,8x3,16m8,16x3,32m16,32x1',
                lr=2e-3, batch_size=32, warmup_steps=20, grad_clip=200, skip_threshold=1000, ema_rate=0.999,
                eval_every=0, eval_batches=16),
}
# the official attentive VAE (nvae.py; ATTENTIVE.md 7 and 11): the official README's 16-layer
# CIFAR-10 command. Loss in nats per image plus the Keras L2 penalty, Keras Adamax (epsilon outside
# the max), per-epoch cosine schedule after a 5-epoch warm-up from 1e-4 with 312 schedule steps per
# epoch (official oddity: int(50000 / (4 x 40)), 8.13), KL weight 0.1 -> 1 per epoch over 16 epochs,
# horizontal and vertical flips, no clipping, no skipping, no EMA (ema_rate 0: the EMA model is a
# copy of the weights and their batch-norm statistics)
OFFICIAL = dict(dataset='cifar10', optimizer='keras_adamax', lr=1e-2, adam_beta1=0.9, adam_beta2=0.999,
                adam_eps=1e-3, weight_decay=0.0, lr_start=1e-4, warmup_epochs=5.0, lr_schedule='cosine_warmup',
                lr_min=1e-4, epochs=400.0, schedule_steps_per_epoch=312, kl_weight_start=0.1,
                kl_warmup_epochs=16.0, kl_per_epoch=True, loss_per_image=True, batch_size=40, grad_clip=0.0,
                skip_threshold=0.0, ema_rate=0.0, flip='hv')
PRESETS['attentive_cifar10'] = {**OFFICIAL, **nvae.DEFAULTS}
# the 900-epoch run: warm-up, then cosine periods of 300 and 600 epochs (CosineRestartWarmup)
PRESETS['attentive_cifar10_900'] = dict(PRESETS['attentive_cifar10'], lr_schedule='cosine_restart_warmup',
                                        lr_first_decay_epochs=300.0, epochs=900.0)
PRESETS['nvae_cifar10'] = {**OFFICIAL, **nvae.BASELINE}
# the official architecture at CPU size (4 layers of 8 channels, towers of one block, 16/12 filters)
# and its baseline twin: the official loss and optimiser, a step-based warm-up, constant lr; they
# learn visibly in minutes on 2 CPU cores
SMALL_NVAE = dict(num_layers=4, zdim=8, preproc_filters=16, dec_filters=12, enc_tower_blocks=1, dec_tower_blocks=1,
                  nonlocal_width=8, enc_key=8, dec_key=8)
SMALL_RECIPE = dict(OFFICIAL, lr=2e-3, lr_start=0.0, warmup_epochs=0.0, warmup_steps=20, lr_schedule='constant',
                    kl_weight_start=1.0, kl_warmup_epochs=0.0, batch_size=16, eval_every=0, eval_batches=16)
PRESETS['attentive_cpu'] = {**SMALL_RECIPE, **nvae.DEFAULTS, **SMALL_NVAE}
PRESETS['nvae_cpu'] = {**SMALL_RECIPE, **nvae.BASELINE, **SMALL_NVAE, 'enc_key': 0, 'dec_key': 0}
DATASET_PRESET = {'cifar10': 'attentive_cifar10', 'mnist': 'mnist', 'imagenet32': 'imagenet32',
                  'imagenet64': 'imagenet64', 'folder': 'ffhq256'}
# what every preset shares unless it says otherwise
BASE = dict(model='vdvae', bottleneck_multiple=0.25, num_mixtures=10, image_channels=3, no_bias_above=64, bits=8,
            likelihood='dmol', pad=0, data_root='data', folders='', download=True, warmup_steps=100,
            nonlocal_width=32, custom_width='',
            optimizer='adamw', weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.9, adam_eps=1e-8,
            lr_start=0.0, warmup_epochs=0.0, lr_schedule='constant', lr_min=0.0, epochs=0.0,
            kl_weight_start=1.0, kl_warmup_epochs=0.0, flip='', ema_warmup=True,
            max_steps=10**9, max_minutes=0.0, max_skips_in_row=100, seed=0, log_every=50,
            eval_every=5000, eval_batches=0, save_every=0, save_every_minutes=30.0, keep=2, out_dir='out',
            dtype='fp32', compile=False, channels_last=False, grad_checkpoint=False, tf32=True, deterministic=False,
            schedule_steps_per_epoch=0, lr_first_decay_epochs=0.0, kl_per_epoch=False, loss_per_image=False,
            sync_bn=False, init_from='')
# flags that only steer this run: a resumed run may change them, the rest must match
# (batch_size is per process: a run resumed on another number of processes may change it)
RUN_KEYS = ('data_root', 'download', 'max_steps', 'max_minutes', 'max_skips_in_row', 'log_every',
            'eval_every', 'eval_batches', 'save_every', 'save_every_minutes', 'keep', 'out_dir',
            'batch_size', 'dtype', 'compile', 'channels_last', 'grad_checkpoint', 'tf32', 'deterministic')
# the recipe's knobs that do not shape the network: a resumed run may change them too (the way out
# of a run that stopped on skipped updates), and says what changed
RECIPE_KEYS = ('lr', 'lr_start', 'warmup_steps', 'warmup_epochs', 'grad_clip', 'skip_threshold', 'ema_rate',
               'kl_weight_start', 'kl_warmup_epochs')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', choices=sorted(PRESETS), help='default: the dataset\'s preset, else cifar10')
    p.add_argument('--depth', type=int, help='number of stochastic layers (rebuilds dec_blocks)')
    p.add_argument('--resume', action='store_true', help='continue from the latest checkpoint in --out_dir')
    p.add_argument('--dry_run', action='store_true', help='build the model, print config and size, exit')
    p.add_argument('--device', help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    p.add_argument('--no_download', dest='download', action='store_const', const=False)
    p.add_argument('--no_ema_warmup', dest='ema_warmup', action='store_const', const=False)
    p.add_argument('--dataset', choices=data.DATASETS)
    p.add_argument('--model', choices=('vdvae', 'nvae'), help='overrides the preset\'s model')
    p.add_argument('--optimizer', choices=('adamw', 'adamax', 'keras_adamax'))
    p.add_argument('--lr_schedule', choices=('constant', 'cosine', 'cosine_warmup', 'cosine_restart_warmup'))
    p.add_argument('--sync_bn', action='store_const', const=True, help='SyncBatchNorm under torchrun (default: per-process statistics, as the official per-replica ones)')
    p.add_argument('--flip', choices=('', 'h', 'hv'), help='random flips of training images')
    p.add_argument('--dtype', choices=('fp32', 'bf16', 'fp16'),
                   help='autocast dtype of the network (default fp32: TF32 convolutions on Ampere and later GPUs)')
    p.add_argument('--no_tf32', dest='tf32', action='store_const', const=False,
                   help='full fp32 convolutions and matmuls on GPUs that would use TF32')
    p.add_argument('--deterministic', action='store_const', const=True,
                   help='deterministic CUDA kernels, for bit-for-bit resume on GPUs (slower)')
    p.add_argument('--compile', action='store_const', const=True, help='torch.compile the model')
    p.add_argument('--channels_last', action='store_const', const=True, help='channels-last memory format')
    p.add_argument('--grad_checkpoint', action='store_const', const=True,
                   help='recompute each layer in the backward pass instead of keeping its activations')
    p.add_argument('--init_from', help="fine-tune: start a new run from a checkpoint's EMA weights (train.py's or "
                   "convert.py's); optimiser, schedule and step start afresh")
    # every other hyperparameter of the presets, typed by its default
    for key, value in BASE.items():
        if key not in ('download', 'ema_warmup', 'model', 'optimizer', 'lr_schedule', 'flip', 'dtype', 'compile',
                       'channels_last', 'grad_checkpoint', 'tf32', 'deterministic', 'sync_bn', 'kl_per_epoch',
                       'loss_per_image', 'init_from'):
            p.add_argument(f'--{key}', type=type(value))
    for key in ('width', 'zdim', 'enc_blocks', 'dec_blocks', 'image_size', 'lr',
                'batch_size', 'grad_clip', 'skip_threshold', 'ema_rate'):
        p.add_argument(f'--{key}', type=str if key.endswith('blocks') else float if key in
                       ('lr', 'grad_clip', 'skip_threshold', 'ema_rate') else int)
    return p.parse_args(argv)


def make_config(args):
    """Preset, then the flags given on the command line; checked for impossible values."""
    flags = {k: v for k, v in vars(args).items()
             if v is not None and k not in ('preset', 'depth', 'resume', 'dry_run', 'device')}
    preset = args.preset or DATASET_PRESET.get(flags.get('dataset'), 'cifar10')
    config = {**BASE, **PRESETS[preset], **flags, 'preset': preset}
    if args.depth is not None:
        if args.depth < 1:
            raise ValueError(f'--depth must be at least 1, not {args.depth}')
        if config['model'] == 'nvae':
            config['num_layers'] = args.depth
            return check_config(config)
        config['dec_blocks'] = scale_depth(config['dec_blocks'], args.depth)
    return check_config(config)


def check_config(config):
    for key in ('batch_size', 'width', 'zdim', 'num_mixtures', 'image_size', 'num_layers', 'log_every', 'max_steps',
                'max_skips_in_row'):
        if config.get(key, 1) < 1:
            raise ValueError(f'--{key} must be at least 1, not {config[key]}')
    for key in ('save_every', 'save_every_minutes', 'keep', 'eval_every', 'eval_batches', 'max_minutes'):
        if config[key] < 0:   # 0 turns it off (keep: all checkpoints, eval_batches: the whole split)
            raise ValueError(f'--{key} must be 0 (off) or more, not {config[key]}')
    if config['model'] == 'vdvae' and int(config['width'] * config['bottleneck_multiple']) < 1:
        raise ValueError(f"--width {config['width']} x --bottleneck_multiple {config['bottleneck_multiple']} leaves the "
                         "residual blocks no channels: need at least 1")
    if config['lr'] <= 0 or not 0 <= config['ema_rate'] < 1:
        raise ValueError(f"need lr > 0 and 0 <= ema_rate < 1 (got lr {config['lr']}, ema_rate {config['ema_rate']})")
    return config


# -----------------------------------------------------------------------------
# the optimisation recipe

def get_lr(step, config, steps_per_epoch=1):
    """Linear warm-up from lr_start over the warm-up (the first step already moves), then constant
    or cosine down to lr_min at the end of `epochs`, or the official attentive VAE's per-epoch
    schedules. Stateless: nothing to save."""
    if config['lr_schedule'] in ('cosine_warmup', 'cosine_restart_warmup'):
        return official_lr(step + 1, config, config['schedule_steps_per_epoch'] or steps_per_epoch)
    warmup = config['warmup_epochs'] * steps_per_epoch or config['warmup_steps']
    lr, start = config['lr'], config['lr_start']
    if step < warmup:
        return start + (lr - start) * (step + 1) / warmup
    if config['lr_schedule'] == 'cosine':
        progress = min(1.0, (step - warmup) / max(1.0, config['epochs'] * steps_per_epoch - warmup))
        return config['lr_min'] + (lr - config['lr_min']) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def official_lr(step, config, spe):
    """official: util/learning_rate_schedule.py CosineWarmup and CosineRestartWarmup. The step
    counts from 1 (on_train_batch_begin); linear warm-up from lr_min to lr over warmup_epochs * spe
    steps, then per schedule epoch e = step // spe (constant within it) a cosine from lr to lr_min:
    over epochs - warmup_epochs epochs, or in periods of lr_first_decay_epochs, twice that, ..."""
    lr, low, warm = config['lr'], config['lr_min'], config['warmup_epochs']
    if step <= warm * spe:
        return low + step / (warm * spe) * (lr - low)
    e = step // spe - warm
    if config['lr_schedule'] == 'cosine_warmup':
        frac = min(1.0, e / (config['epochs'] - warm))
    else:                                           # t_mul 2, m_mul 1
        c = e / config['lr_first_decay_epochs']
        i = math.floor(math.log2(1 + c))
        frac = (c - (2 ** i - 1)) / 2 ** i
    alpha = low / lr
    return lr * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * frac)) + alpha)


def get_kl_weight(step, config, steps_per_epoch=1):
    """The training loss's weight on the rate: kl_weight_start rising linearly to 1 (1 throughout
    by default). The reported ELBO never uses it."""
    ramp = config['kl_warmup_epochs'] * steps_per_epoch
    start = config['kl_weight_start']
    if config.get('kl_per_epoch'):   # official KLRegularizerSchedule.on_epoch_begin: constant within an epoch
        step = step // steps_per_epoch * steps_per_epoch
    return 1.0 if ramp <= 0 or step >= ramp else start + (1 - start) * step / ramp


class KerasAdamax(torch.optim.Optimizer):
    """Adamax as Keras/TF updates it (ATTENTIVE.md 7): m = beta1 m + (1 - beta1) g,
    u = max(beta2 u, |g|), theta -= lr / (1 - beta1^t) * m / (u + eps). Epsilon sits outside the
    max; PyTorch's Adamax puts it inside, max(beta2 u, |g| + eps). No weight decay (the official
    L2 penalty is part of the loss)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-7):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            by_step = {}   # a tensor that once had no gradient keeps its own step count
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), u=torch.zeros_like(p))
                state['step'] += 1
                by_step.setdefault(state['step'], []).append(p)
            for step, params in by_step.items():
                self.update(params, step, group)

    def update(self, params, step, group):
        """One fused call per operation over all tensors: the same numbers as a loop per tensor."""
        beta1, beta2 = group['betas']
        grads = [p.grad for p in params]
        m, u = [self.state[p]['m'] for p in params], [self.state[p]['u'] for p in params]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(u, beta2)
        torch._foreach_maximum_(u, torch._foreach_abs(grads))
        torch._foreach_addcdiv_(params, m, torch._foreach_add(u, group['eps']), value=-group['lr'] / (1 - beta1 ** step))


def make_optimizer(model, config):
    if config['optimizer'] == 'keras_adamax':
        return KerasAdamax(model.parameters(), config['lr'], (config['adam_beta1'], config['adam_beta2']), config['adam_eps'])
    kw = dict(lr=config['lr'], weight_decay=config['weight_decay'], eps=config['adam_eps'],
              betas=(config['adam_beta1'], config['adam_beta2']))
    if config['optimizer'] == 'adamax':   # PyTorch's Adamax (epsilon inside the max; weight decay as an L2 term)
        return torch.optim.Adamax(model.parameters(), foreach=True, **kw)
    # fused: one kernel per tensor instead of about ten small ops (on CPU the default is a Python loop
    # over every tensor); the same update to float rounding (1e-7)
    return torch.optim.AdamW(model.parameters(), fused=True, **kw)


def flip(batch, mode):
    """Random horizontal (and vertical) flips, one coin per image, on the batch's device."""
    for dim, axis in (('h', 3), ('v', 2)):
        if dim in mode:
            coin = torch.rand(len(batch), device=batch.device) < 0.5
            batch = torch.where(coin[:, None, None, None], batch.flip(axis), batch)
    return batch


@torch.no_grad()
def update_ema(ema, model, updates, config):
    """EMA of the weights; with ema_warmup the decay is min(rate, (1 + n) / (10 + n)) after n
    updates, so that short runs are not dominated by the random init."""
    rate = config['ema_rate']
    if config['ema_warmup']:
        rate = min(rate, (1 + updates) / (10 + updates))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - rate)   # one fused call for all
    buffers = list(ema.buffers())
    if buffers:                                   # batch-norm running statistics: the model's own
        torch._foreach_copy_(buffers, list(model.buffers()))


# -----------------------------------------------------------------------------
# one process per device under torchrun: DDP averages the gradients; small all-reduces keep every
# rank's decisions (skip, stop, save) identical

def setup_distributed(device=None):
    """-> (rank, world_size, device). Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set) join the
    process group, NCCL on CUDA and gloo on CPU; otherwise a single process."""
    device = get_device(device)
    if 'RANK' not in os.environ:
        return 0, 1, device
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
    # the store with a prefix per torchrun attempt: after a restart, the killed attempt's keys (its
    # workers' addresses) must not be read by the new workers
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    agent_store = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
    store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world,
                          is_master=rank == 0 and not agent_store, multi_tenant=not agent_store)
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', rank=rank, world_size=world,
                            store=dist.PrefixStore(f'hvae/attempt{attempt}', store))
    return rank, world, device


def all_mean(t):
    """Mean over ranks, in place; nothing to do in one process."""
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


@torch.no_grad()
def average_bn_statistics(model):
    """Batch norm normalises with each process's own batch (the official per-replica statistics);
    the moving statistics become the mean of the processes' updates, as TF's MirroredStrategy
    aggregates them (the update is linear, so averaging the updated buffers is the same)."""
    stats = [b for name, b in model.named_buffers() if name.endswith(('running_mean', 'running_var'))]
    if stats and dist.is_initialized():
        flat = all_mean(torch.cat([b.flatten() for b in stats]))
        for b, v in zip(stats, flat.split([b.numel() for b in stats])):
            b.copy_(v.view_as(b))


def agree(device, *flags):
    """Every flag becomes true on all ranks if it is true on any (a signal that reached one rank,
    a clock that ran out on one node)."""
    return [f > 0 for f in all_mean(torch.tensor(flags, dtype=torch.float32, device=device)).tolist()]


def broadcast(obj):
    """Rank 0's obj on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fetch_data_once(config, rank):
    """Under torchrun, rank 0 downloads and extracts CIFAR-10 / MNIST while the others wait, then
    the first rank of every other node, whose data_root may be node-local (on a shared one it finds
    the files there): ranks writing one file at once leave it truncated or failing its md5."""
    if not dist.is_initialized() or not config['download']:
        return
    node_first = int(os.environ.get('LOCAL_RANK', rank)) == 0
    for turn in (rank == 0, node_first and rank != 0):
        if turn:
            data.fetch_dataset(config['dataset'], config['data_root'])
        dist.barrier()


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...]"""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def keep_freed_memory():
    """On Linux CPU, let glibc's malloc keep freed blocks for reuse instead of handing each large one
    back to the OS (mmap/munmap): otherwise every activation of a step is a fresh mapping whose
    pages fault in, zeroed, one by one, and a 1x1 conv's backward at 32x32 spends most of its time
    there (the reason PyTorch's CPU tuning guide suggests jemalloc or tcmalloc). The peak memory is
    the same; the process just does not shrink between steps."""
    if sys.platform != 'linux':
        return
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return
    libc.mallopt(-3, 2**30)        # M_MMAP_THRESHOLD: blocks up to 1 GiB from the heap
    libc.mallopt(-1, 2**31 - 1)    # M_TRIM_THRESHOLD: do not give the heap's top back
    libc.mallopt(-2, 2**28)        # M_TOP_PAD: grow the heap 256 MiB at a time


def set_precision(config):
    """Kernel choices of this process. PyTorch runs fp32 convolutions as TF32 (a 10-bit mantissa) on
    Ampere and later GPUs; tf32=False asks for full fp32 there, convolutions and matmuls. cuDNN's
    autotuner picks the fastest kernel once per shape (training batches are always full), unless
    deterministic kernels are asked for: without them a CUDA run is not bit-for-bit on resume."""
    keep_freed_memory()
    torch.backends.cudnn.allow_tf32 = config['tf32']
    if not config['tf32']:
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = not config['deterministic']
    torch.backends.cudnn.deterministic = config['deterministic']
    if config['deterministic']:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')   # cuBLAS's condition for determinism
    torch.use_deterministic_algorithms(config['deterministic'], warn_only=True)   # a warning names any op without one


def autocast(config, device):
    """Mixed precision for the network; the likelihood and the KL stay fp32 (model.py)."""
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[config.get('dtype', 'fp32')]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def train_step(model, optimizer, batch, info, config, kl_weight=1.0, scaler=None):
    """One step -> (stats, skipped). The update is skipped on every rank when the loss or the
    gradient norm is not finite on any rank, or the norm reaches skip_threshold (0 turns clipping
    or skipping off). The stats are means over ranks."""
    x, target = model_inputs(*data.prepare(flip(batch, config['flip']), info, config['bits'], config['pad']), config)
    running = [b for b in model.buffers() if b.is_floating_point()]   # batch-norm statistics (attentive VAE)
    before = torch._foreach_mul(running, 1.0) if running else []       # a copy, in one call
    if config['channels_last']:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(config, x.device):
        out = model(x, target)
    elbo = (out['distortion'] + out['rate']).mean()
    loss = elbo if kl_weight == 1.0 else (out['distortion'] + kl_weight * out['rate']).mean()
    if config['loss_per_image']:   # official: nats per image plus the Keras L2 penalty (ATTENTIVE.md 6)
        dims = target.shape[1] * (target.shape[2] - 2 * config['pad']) * (target.shape[3] - 2 * config['pad'])
        loss = loss * dims + getattr(model, 'module', model).l2_penalty()
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()   # DDP: gradients averaged over ranks here
    if scaler:
        scaler.unscale_(optimizer)
    clip = config['grad_clip'] if config['grad_clip'] > 0 else float('inf')
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if config['skip_threshold'] > 0:
        bad |= grad_norm >= config['skip_threshold']
    # (5 + L,): one all-reduce carries the stats and whether any rank wants to skip
    values = all_mean(torch.cat([torch.stack([elbo, out['distortion'].mean(), out['rate'].mean(), grad_norm,
                                              bad.float()]).detach().float(), out['kl'].detach().mean(0)])).tolist()
    skipped = values[4] > 0
    if not skipped:
        scaler.step(optimizer) if scaler else optimizer.step()
    elif running:   # a skipped step changes nothing: a NaN forward would poison the statistics for good
        torch._foreach_copy_(running, before)
    if scaler:
        scaler.update()
    stats = dict(elbo=values[0], kl_weight=kl_weight, distortion=values[1], rate=values[2],
                 grad_norm=values[3], kl=values[5:])
    return stats, skipped


@torch.no_grad()
def evaluate(model, split, info, config, device, max_batches=0):
    """Per-image negative ELBO (nats/dim) and per-layer KL (N, L) over a split; under torchrun each
    rank takes every world_size-th image and the results are gathered. Fresh posterior draws, with
    the caller's RNG state left untouched."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    nelbo, kl = [], []
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(config['seed'] + rank)
        for i, batch in enumerate(data.eval_batches(split, config['batch_size'], device, rank, world)):
            if max_batches and i >= -(-max_batches // world):
                break
            with autocast(config, device):
                out = model(*model_inputs(*data.prepare(batch, info, config['bits'], config['pad']), config))
            nelbo.append(out['distortion'] + out['rate'])
            kl.append(out['kl'])
    model.train()
    parts = gather((torch.cat(nelbo).cpu(), torch.cat(kl).cpu()))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# -----------------------------------------------------------------------------
# checkpoints: atomic (temp file + rename), plain data, exact resume

def checkpoint_paths(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, 'ckpt-*.pt')))


def save_checkpoint(state, out_dir, keep):
    """Write ckpt-<step>.pt through a temp file, fsync and rename, so that a crash or a full disk
    at any moment leaves the earlier checkpoints whole; then drop all but the last `keep`."""
    path = os.path.join(out_dir, f"ckpt-{state['step']:08d}.pt")
    tmp = path + '.tmp'
    try:
        torch.save(state, tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        last = checkpoint_paths(out_dir)
        raise OSError(f"could not write {path} ({str(e).splitlines()[0][:160]}); "
                      f"{'the latest checkpoint ' + last[-1] + ' is intact' if last else 'no earlier checkpoint'}") from None
    os.replace(tmp, path)
    fd = os.open(out_dir, os.O_RDONLY)
    os.fsync(fd)   # the rename itself survives a power cut
    os.close(fd)
    for old in checkpoint_paths(out_dir)[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


def check_out_dir(out_dir, n_params, resume):
    """Fail before training, in one line: an out_dir we cannot write, too little disk for two
    checkpoints, or earlier checkpoints that a fresh run would overwrite."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f'--out_dir {out_dir} is a file, not a folder')
    os.makedirs(out_dir, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=out_dir) as f:
            f.write(b'0')
    except OSError as e:
        raise PermissionError(f'--out_dir {out_dir} is not writable ({e.strerror})') from None
    need = 2 * 16 * n_params   # weights, EMA and two Adam moments in fp32, twice during a write
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise OSError(f'--out_dir {out_dir} has {free / 2**20:.0f} MiB free, a checkpoint needs about {need / 2**21:.0f} MiB (x2 while writing)')
    if not resume and checkpoint_paths(out_dir):
        raise ValueError(f'{out_dir} already holds checkpoints (latest {checkpoint_paths(out_dir)[-1]}): '
                         'add --resume to continue that run, or choose another --out_dir')
    for tmp in glob.glob(os.path.join(out_dir, 'ckpt-*.pt.tmp')):   # a write cut short by a crash
        os.remove(tmp)


def rng_state(device):
    state = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state['cpu'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def agreed_checkpoint(out_dir, required):
    """The checkpoint every rank resumes from: rank 0's latest, looked up by name in each rank's own
    out_dir (one shared folder, or per-node folders at the same path). Ranks resuming from
    different checkpoints, or some not at all, would diverge and hang on mismatched collectives,
    so a rank that cannot see it stops the run. -> its path, or None when there is none."""
    paths = checkpoint_paths(out_dir)
    name = broadcast(os.path.basename(paths[-1]) if paths else None)
    if name is None:
        if required:
            raise FileNotFoundError(f'--resume: no checkpoint ckpt-*.pt in {out_dir}')
        return None
    path = os.path.join(out_dir, name)
    blind = [str(r) for r, seen in enumerate(gather(os.path.exists(path))) if not seen]
    if blind:
        raise FileNotFoundError(f"rank {', '.join(blind)} cannot see {path}, rank 0's latest checkpoint: share "
                                f"--out_dir between nodes, or copy the checkpoint into every node's --out_dir")
    return path


def resume_config(config, args, path):
    """The checkpoint at path and its config; flags may change run and recipe keys only."""
    ckpt = load_checkpoint(path)
    if not {'optimizer', 'data', 'rng', 'counts'} <= set(ckpt):
        raise ValueError(f'{path} holds weights only (convert.py writes such files), not a training state that '
                         '--resume can continue: start a new run from it with --init_from')
    saved = {**{k: BASE[k] for k in RUN_KEYS if k in BASE}, **ckpt['config']}
    given = {k for k, v in vars(args).items() if v is not None} | ({'dec_blocks', 'num_layers'} if args.depth else set())
    clash = [f'{k}={saved.get(k)!r} (flag: {config[k]!r})' for k in sorted(given & set(config))
             if k not in RUN_KEYS + RECIPE_KEYS and saved.get(k) != config[k]]
    if clash:
        raise ValueError(f"{path} was written by another configuration: {', '.join(clash)}")
    return ckpt, path, {**saved, **{k: config[k] for k in RUN_KEYS + RECIPE_KEYS if k in given}}


class StopSignal:
    """SIGTERM or SIGINT: remember it, let the step finish, checkpoint, exit 0 (a second SIGINT
    interrupts at once)."""

    def __init__(self):
        self.name = None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


# -----------------------------------------------------------------------------

def log(record, path):
    """One JSON line; NaN and inf (not JSON) are written as null."""
    finite = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None
    record = {k: [finite(x) for x in v] if isinstance(v, list) else finite(v) for k, v in record.items()}
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def trim_log(path, step):
    """A resumed run rewrites the records past its checkpoint (they will be logged again)."""
    if os.path.exists(path):
        with open(path) as f:
            keep = [l for l in f if l.strip() and json.loads(l)['step'] <= step]
        with open(path + '.tmp', 'w') as f:
            f.writelines(keep)
        os.replace(path + '.tmp', path)


def fmt_time(seconds):
    return f'{seconds / 3600:.1f}h' if seconds >= 3600 else f'{seconds / 60:.1f}m'


def setup(args):
    """Config, process group, model, data, optimiser and, when resuming, their saved state -> the
    run (a namespace of all of them), or None after --dry_run."""
    config = make_config(args)
    rank, world, device = setup_distributed(args.device)
    print0 = print if rank == 0 else (lambda *a, **k: None)
    restarted = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)) > 0   # torchrun restarted the group
    ckpt = ckpt_path = None
    if args.resume or restarted:   # rank 0 chooses the checkpoint, for every rank
        ckpt_path = agreed_checkpoint(config['out_dir'], required=args.resume)
    if ckpt_path:
        ckpt, ckpt_path, config = resume_config(config, args, ckpt_path)
    if config['dtype'] == 'fp16' and device.type != 'cuda':
        raise ValueError('--dtype fp16 needs a CUDA device (autocast with a gradient scaler); use bf16 or fp32 on CPU')
    if config['sync_bn'] and device.type != 'cuda':
        raise ValueError('--sync_bn needs CUDA devices (torch.nn.SyncBatchNorm); on CPU each process keeps its own batch statistics')
    if config['dtype'] == 'bf16' and device.type == 'cpu' and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print0('note: this CPU has no bf16 instructions (AVX-512 BF16 or AMX): --dtype bf16 runs 3-5x slower '
               'than fp32 here (README, Performance)')
    set_precision(config)
    torch.manual_seed(config['seed'])
    model = build(config).to(device)
    if config.get('init_from') and ckpt is None:   # on resume the checkpoint holds the weights
        init_weights(model, config, print0)
    if config['grad_checkpoint']:
        model.set_grad_checkpoint(True)
    n_params = sum(p.numel() for p in model.parameters())
    if args.dry_run:
        print0(json.dumps({k: config[k] for k in sorted(config)}, indent=1))
        print0(f"model {config['model']}: {n_layers(model)} stochastic layers, {n_params:,} parameters")
        return None
    if rank == 0:
        check_out_dir(config['out_dir'], n_params, ckpt is not None or restarted)
    fetch_data_once(config, rank)
    # a checkpoint's split and normalisation, not recomputed from a folder that may have changed since
    info = data.load_run_dataset(config, ckpt.get('dataset') if ckpt is not None else None, config['download'])
    data.check_fits(info, config, config['dataset'])
    run = argparse.Namespace(config=config, rank=rank, world=world, device=device, print0=print0, model=model,
                             info=info, data_record=data.dataset_record(info, config['data_root']),
                             batches=data.make_batches(info['train'], config['batch_size'], config['seed'], rank, world, device),
                             ema=build(config).to(device).requires_grad_(False), optimizer=make_optimizer(model, config),
                             scaler=torch.amp.GradScaler(device.type) if config['dtype'] == 'fp16' else None,
                             step=0, counts=dict(updates=0, skipped=0, skips_in_row=0, elapsed=0.0),
                             log_path=os.path.join(config['out_dir'], 'log.jsonl'), t_start=time.time())
    run.ema.load_state_dict(model.state_dict())
    torch.manual_seed(config['seed'] + rank)   # each rank its own noise (posterior draws, flips)
    if ckpt is not None:
        restore(run, ckpt, ckpt_path)
        ckpt = None   # the loaded dict is a second copy of the weights and optimiser (~2 GB at ImageNet-64 size)
    wrap_model(run)
    print0(f"model {config['model']} ({config['preset']} preset): {n_layers(run.model)} stochastic layers, "
           f"{n_params:,} parameters, {len(info['train']):,} training images, device {device}"
           + (f", {world} processes x batch {config['batch_size']}" if world > 1 else ''))
    if rank == 0:
        trim_log(run.log_path, run.step)
    return run


def init_weights(model, config, print0):
    """--init_from: the checkpoint's EMA weights (a converted official file holds only those) go
    into the model, and from it into the EMA; the network must be this config's."""
    path = config['init_from']
    ckpt = load_checkpoint(path)
    weights = ckpt.get('ema') or ckpt['model']
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in model.state_dict().items()}:
        keys = sorted(set(MODEL_KEYS) | set(nvae.DEFAULTS))
        differ = [f"{k} {ckpt['config'].get(k)!r} (here {config.get(k)!r})" for k in keys
                  if ckpt['config'].get(k) != config.get(k)]
        raise ValueError(f"--init_from {path}: its network is not this run's: {', '.join(differ) or 'other shapes'}; "
                         f"give its preset ({ckpt['config'].get('preset')}) and model flags")
    model.load_state_dict(weights)
    print0(f"weights from {path} (step {ckpt['step']} of a {ckpt['config'].get('preset')} run); "
           "optimiser and schedule start afresh")


def restore(run, ckpt, path):
    """Weights, EMA, optimiser, data position, scaler, counters and this rank's RNG of a checkpoint."""
    run.model.load_state_dict(ckpt['model'])
    run.ema.load_state_dict(ckpt['ema'])
    run.optimizer.load_state_dict(ckpt['optimizer'])
    run.batches.load_state_dict(ckpt['data'])
    if run.scaler and ckpt.get('scaler'):
        run.scaler.load_state_dict(ckpt['scaler'])
    run.step, run.counts = ckpt['step'], ckpt['counts']
    if run.rank < len(ckpt['rng']):
        set_rng_state(ckpt['rng'][run.rank], run.device)
    else:   # more ranks than the run that wrote it
        torch.manual_seed(run.config['seed'] + run.rank + 7919 * run.step)
    run.print0(f'resumed from step {run.step} of {path}')
    changed = [f"{k} {ckpt['config'].get(k)!r} -> {run.config[k]!r}" for k in RECIPE_KEYS
               if ckpt['config'].get(k) != run.config[k]]
    if changed:
        run.print0(f"recipe changed on resume: {', '.join(changed)}")


def wrap_model(run):
    """Memory format, synchronised batch norm, compile, DDP: run.model stays the plain module."""
    config = run.config
    if config['channels_last']:
        run.model = run.model.to(memory_format=torch.channels_last)
    if config['sync_bn'] and run.world > 1:   # one set of batch statistics over all processes
        run.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
    if config['compile']:
        run.model.compile()   # in place: the state dict keeps its names
    run.ddp = run.model
    if run.world > 1:
        run.ddp = DDP(run.model, device_ids=[run.device.index] if run.device.type == 'cuda' else None)


def save(run):
    """Rank 0 writes the checkpoint (every rank gathers its RNG state) -> its path."""
    state = dict(format=CHECKPOINT_FORMAT, config=run.config, step=run.step, model=run.model.state_dict(),
                 ema=run.ema.state_dict(), optimizer=run.optimizer.state_dict(), rng=gather(rng_state(run.device)),
                 data=run.batches.state_dict(), scaler=run.scaler.state_dict() if run.scaler else None,
                 counts=dict(run.counts, elapsed=run.counts['elapsed'] + time.time() - run.t_start),
                 dataset=run.data_record)
    return save_checkpoint(state, run.config['out_dir'], run.config['keep']) if run.rank == 0 else None


def count_update(run, stats, skipped):
    """Count the step's update or skip and move the EMA; stop (checkpoint first) after too many
    skips in a row."""
    counts = run.counts
    if not skipped:
        counts['updates'] += 1
        counts['skips_in_row'] = 0
        update_ema(run.ema, run.model, counts['updates'], run.config)
        return
    counts['skipped'] += 1
    counts['skips_in_row'] += 1
    if counts['skips_in_row'] >= run.config['max_skips_in_row']:
        path = save(run)
        if dist.is_initialized():
            dist.barrier()   # rank 0's write is done: torchrun kills the group when one rank exits
        run.print0(f"stopping at step {run.step}: {counts['skips_in_row']} updates in a row skipped "
                   f"(grad norm {stats['grad_norm']:.1f}, skip_threshold {run.config['skip_threshold']}, "
                   f"loss {stats['elbo']:.4g}); raise --skip_threshold or lower --lr; saved {path}", file=sys.stderr)
        sys.exit(1)


def per_image(run, nats_per_dim):
    """Binary images are scored in nats per image in the papers (and evaluate.py): say it too."""
    if not run.info['binary']:
        return ''
    c = run.config
    return f" ({float(nats_per_dim) * c['image_channels'] * (c['image_size'] - 2 * c['pad']) ** 2:.2f} nats/image)"


def log_window(run, window, seconds, minutes):
    """One log line and one log.jsonl record: the means of the steps since the last one (a step
    whose loss was not finite, skipped and counted, is left out of them)."""
    config, spe, step = run.config, run.batches.steps_per_epoch, run.step
    good = [s for s in window if math.isfinite(s['elbo'])] or window
    mean = {k: sum(s[k] for s in good) / len(good) for k in ('elbo', 'distortion', 'rate', 'grad_norm')}
    bad_images = all_mean(torch.tensor([float(getattr(run.batches, 'skipped', 0))], device=run.device)).item() * run.world
    rec = dict(step=step, elbo_bpd=mean['elbo'] / math.log(2), distortion_bpd=mean['distortion'] / math.log(2),
               rate_bpd=mean['rate'] / math.log(2), grad_norm=mean['grad_norm'], skipped=run.counts['skipped'],
               lr=get_lr(step - 1, config, spe), kl_weight=window[-1]['kl_weight'],
               images_per_s=len(window) * config['batch_size'] * run.world / seconds, minutes=minutes,
               kl_per_layer=[sum(s['kl'][i] for s in good) / len(good) for i in range(len(good[0]['kl']))])
    if bad_images:
        rec['unreadable_images'] = round(bad_images)
    eta = (config['max_steps'] - step) * seconds / len(window)
    if config['max_minutes']:
        eta = min(eta, max(0.0, 60 * (config['max_minutes'] - minutes)))
    run.print0(f"step {step} | elbo {rec['elbo_bpd']:.4f} bpd{per_image(run, mean['elbo'])} | distortion {rec['distortion_bpd']:.4f} | "
               f"rate {rec['rate_bpd']:.4f} | grad {rec['grad_norm']:.1f} | skipped {run.counts['skipped']} | "
               f"lr {rec['lr']:.2e} | {rec['images_per_s']:.1f} img/s | eta {fmt_time(eta)}"
               + (f" | {rec['unreadable_images']} unreadable images replaced" if bad_images else ''), flush=True)
    if run.rank == 0:
        log(rec, run.log_path)


def log_eval(run):
    """The EMA model's negative ELBO on the validation split (the test split if there is none)."""
    name = 'valid' if len(run.info['valid']) else 'test'
    nelbo, _ = evaluate(run.ema, run.info[name], run.info, run.config, run.device, run.config['eval_batches'])
    run.print0(f"step {run.step} | eval (EMA) elbo {nelbo.mean() / math.log(2):.4f} bpd{per_image(run, nelbo.mean())} "
               f"on {len(nelbo)} {name} images")
    if run.rank == 0:
        log(dict(step=run.step, eval_elbo_bpd=nelbo.mean().item() / math.log(2), eval_images=len(nelbo),
                 eval_split=name), run.log_path)


def main(argv=None):
    run = setup(parse_args(argv))
    if run is None:
        return None
    config, spe, stop = run.config, run.batches.steps_per_epoch, StopSignal()
    run.t_start = t_log = t_save = time.time()
    window = []
    spent = config['max_minutes'] and run.counts['elapsed'] / 60 >= config['max_minutes']   # --max_minutes is the job's
    if run.step >= config['max_steps'] or spent:
        run.print0(f"nothing to train: the run is at step {run.step} and --max_steps is {config['max_steps']}" if not spent
                   else f"nothing to train: the run has used its --max_minutes {config['max_minutes']:g} "
                        f"({run.counts['elapsed'] / 60:.1f} minutes); give --max_minutes 0 (no limit) or more to go on")
    while run.step < config['max_steps'] and not spent:
        for group in run.optimizer.param_groups:
            group['lr'] = get_lr(run.step, config, spe)
        stats, skipped = train_step(run.ddp, run.optimizer, run.batches.next(), run.info, config,
                                    get_kl_weight(run.step, config, spe), run.scaler)
        if run.world > 1 and not config['sync_bn']:
            average_bn_statistics(run.model)
        run.step += 1
        count_update(run, stats, skipped)
        window.append(stats)
        minutes = (run.counts['elapsed'] + time.time() - run.t_start) / 60
        signalled, out_of_time, save_due = agree(
            run.device, stop.name is not None, config['max_minutes'] and minutes >= config['max_minutes'],
            (config['save_every'] and run.step % config['save_every'] == 0)
            or (config['save_every_minutes'] > 0 and time.time() - t_save >= 60 * config['save_every_minutes']))
        finished = run.step >= config['max_steps'] or (config['epochs'] and run.step >= config['epochs'] * spe)
        done = finished or out_of_time or signalled
        if run.step % config['log_every'] == 0 or done:
            log_window(run, window, time.time() - t_log, minutes)
            window, t_log = [], time.time()
        if done or save_due:
            path = save(run)
            run.print0(f'saved {path}' if not signalled else f'{stop.name or "a signal to another rank"}: stopped '
                       f'after step {run.step}, saved {path}; continue with --resume', flush=True)
            t_save = time.time()
        # every eval_every steps and at the end of training; not when out of time or signalled
        if config['eval_every'] and (run.step % config['eval_every'] == 0 or finished) and not (out_of_time or signalled):
            log_eval(run)
            t_log = time.time()
        if done:
            break
    if dist.is_initialized():
        dist.barrier()       # rank 0's checkpoint is written, no collective in flight: tear down together
        run.ddp = None       # DDP holds the group: let it go with it, not at interpreter exit
        dist.destroy_process_group()
    return run.model


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f'error: {e}')
