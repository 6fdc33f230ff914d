"""Run train.py with faults switched on by the environment, for the reliability and scale-out tests:

  HVAE_FAULTS='nan_loss@3:1,kill@5:1' python tests/faults.py --preset cpu ...
  HVAE_FAULTS=mean_z torchrun --nproc_per_node 2 tests/faults.py --preset cpu ...

Faults (comma-separated; @S = at training step S, counted from 1 in this process; :R = on rank R only):
  mean_z          posterior draws z = mean: a run without noise, to compare runs that split a batch
                  differently (the noise of B images is not the noise of B/2 + B/2)
  nan_loss@S:R    the loss is NaN
  inf_grad@S:R    one gradient entry is inf after the backward pass (after DDP's all-reduce)
  kill@S:R        SIGKILL at the start of step S, in the first attempt only (not after a torchrun restart)
  kill_in_save@N  SIGKILL in the middle of writing the N-th checkpoint (half the bytes on disk)
  enospc_save@N   the N-th checkpoint write fails with "No space left on device" half-way
  slow_save@N     the N-th checkpoint write starts 3 s late (a big checkpoint on a slow disk)
  own_out_dir@0:R rank R reads and writes <out_dir>-rank<R> instead: a node-local --out_dir
HVAE_CIFAR_TARBALL=path: CIFAR-10 downloads fetch that file (its md5 taken as the official one), one
second after they start, so that ranks downloading at once overlap
HVAE_DUMP=prefix: each rank writes its final weights to prefix-rank<R>.pt, or when it exits early
(sys.exit) the listing of its out_dir at that moment to prefix-rank<R>-exit.txt
"""
import errno
import io
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import layers  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

RANK = int(os.environ.get('RANK', 0))
FIRST_ATTEMPT = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)) == 0
FAULTS = {}   # name -> set of steps for this rank
for item in filter(None, os.environ.get('HVAE_FAULTS', '').split(',')):
    name, _, where = item.partition('@')
    at, _, rank = where.partition(':')
    if not rank or int(rank) == RANK:
        FAULTS.setdefault(name, set()).add(int(at) if at else 0)
state = dict(step=0, saves=0)


def train_step(*args, **kwargs):
    state['step'] += 1
    if state['step'] in FAULTS.get('kill', ()) and FIRST_ATTEMPT:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_train_step(*args, **kwargs)


def forward(self, x, target, eps=None):
    out = original_forward(self, x, target, eps)
    if self.training and state['step'] in FAULTS.get('nan_loss', ()):
        out = dict(out, distortion=out['distortion'] * float('nan'))
    return out


def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
    parameters = list(parameters)
    if state['step'] in FAULTS.get('inf_grad', ()):
        parameters[0].grad.view(-1)[0] = float('inf')
    return original_clip(parameters, max_norm, *args, **kwargs)


def save(obj, path, *args, **kwargs):
    state['saves'] += 1
    n = state['saves']
    if n in FAULTS.get('slow_save', ()):
        time.sleep(3)
    if n in FAULTS.get('kill_in_save', set()) | FAULTS.get('enospc_save', set()):
        buffer = io.BytesIO()
        original_save(obj, buffer)
        with open(path, 'wb') as f:
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            if n in FAULTS.get('kill_in_save', ()):
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return original_save(obj, path, *args, **kwargs)


original_train_step, train.train_step = train.train_step, train_step
original_forward, model.VAE.forward = model.VAE.forward, forward
original_clip, torch.nn.utils.clip_grad_norm_ = torch.nn.utils.clip_grad_norm_, clip_grad_norm_
original_save, torch.save = torch.save, save
if os.environ.get('HVAE_CIFAR_TARBALL'):
    data.CIFAR_URL, data.CIFAR_MD5 = Path(os.environ['HVAE_CIFAR_TARBALL']).as_uri(), data.md5(os.environ['HVAE_CIFAR_TARBALL'])
    original_fetch = data.fetch
    data.fetch = lambda url, path: time.sleep(1) or original_fetch(url, path)
if 'mean_z' in FAULTS:
    model.gaussian_sample = lambda mean, logsigma, eps=None: mean if eps is None else layers.gaussian_sample(mean, logsigma, eps)

if __name__ == '__main__':
    try:
        argv = sys.argv[1:]
        if 'own_out_dir' in FAULTS:
            i = argv.index('--out_dir') + 1
            argv[i] = f'{argv[i]}-rank{RANK}'
        trained = train.main(argv)
        if os.environ.get('HVAE_DUMP') and trained is not None:   # every rank's final weights
            original_save(trained.state_dict(), f"{os.environ['HVAE_DUMP']}-rank{RANK}.pt")
    except SystemExit:   # the stop on skipped updates: what this rank sees in out_dir as it leaves
        if os.environ.get('HVAE_DUMP'):
            with open(f"{os.environ['HVAE_DUMP']}-rank{RANK}-exit.txt", 'w') as f:
                f.write(' '.join(sorted(os.listdir(argv[argv.index('--out_dir') + 1]))))
        raise
    except (ValueError, OSError) as e:
        sys.exit(f'error: {e}')
