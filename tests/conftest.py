"""Shared by the test modules: one thread per test module, the tiny training configuration, a fake
CIFAR-10 folder, and running the scripts as a user does."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import load_checkpoint  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Small tensors gain nothing from intra-op threads, and two threads on a busy 2-core machine
    run these tests ~10x slower; restore the setting for whatever runs next."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DATA = Path(os.environ.get('HVAE_DATA', ROOT.parent / 'shared' / 'data'))
TINY = ['--preset', 'cpu', '--width', '16', '--zdim', '4', '--num_mixtures', '2', '--batch_size', '4',
        '--enc_blocks', '32x1,32d2,16x1,16d4,4x1,4d4,1x1', '--dec_blocks', '1x1,4m1,16m4,32m16',
        '--log_every', '2', '--no_download']


def real_data():
    if not (DATA / 'cifar-10-batches-py').is_dir():
        pytest.fail(f'the offline CIFAR-10 copy is missing: looked in {DATA}/cifar-10-batches-py (set HVAE_DATA)')
    return str(DATA)


@pytest.fixture(scope='module')
def fake_cifar(tmp_path_factory):
    """A CIFAR-10 folder in the official pickle format with 40 images per batch."""
    root = tmp_path_factory.mktemp('cifar')
    folder = root / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        batch = {'data': rng.randint(0, 256, (40, 3072), dtype=np.uint8), 'labels': [0] * 40}
        with open(folder / name, 'wb') as f:
            pickle.dump(batch, f, protocol=2)
    return str(root)


def run(*args, check=True):
    """Run one of the scripts as a user would; returns the completed process."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f'{args[0]} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}')
    return p


def error_line(p):
    """A clean failure: non-zero exit, one line on stderr, no traceback."""
    assert p.returncode != 0
    assert 'Traceback' not in p.stderr, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


def assert_same_tree(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def launch(out, steps, batch, nproc=1, faults='mean_z', extra=(), check=True, data_root=None, torchrun=(), env=()):
    """train.py through tests/faults.py (see there), in 1 process or under torchrun with nproc processes;
    env: more environment variables (HVAE_CIFAR_TARBALL turns downloads on)."""
    env = dict(os.environ, HVAE_FAULTS=faults, HVAE_DUMP=str(out / 'final'), OMP_NUM_THREADS='1', **dict(env))
    tiny = [a for a in TINY if a != '--no_download' or 'HVAE_CIFAR_TARBALL' not in env]
    i = tiny.index('--batch_size')
    args = ['tests/faults.py', *tiny[:i], *tiny[i + 2:], '--batch_size', str(batch), '--data_root', data_root, '--out_dir', str(out),
            '--max_steps', str(steps), *extra]
    if nproc > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), *torchrun, *args]
    else:
        cmd = [sys.executable, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f'{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}')
    return p


def latest(out):
    return load_checkpoint(sorted(out.glob('ckpt-*.pt'))[-1])


def assert_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU; skipped with that reason elsewhere (gpu_check.sh runs them)')
