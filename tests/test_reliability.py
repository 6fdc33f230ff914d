"""Nothing lost: a run stopped in any way (a signal, a hard kill in the middle of a checkpoint
write, a worker killed under torchrun, a full disk) resumes as if nothing happened, and bad
checkpoints or image files are refused or skipped with a clear message. Faults come from
tests/faults.py (train.py with faults switched on by the environment)."""
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, assert_close, assert_same_tree, error_line, latest, launch, run
import train  # noqa: E402
from model import load_checkpoint  # noqa: E402


def same_run(a, b):
    """Two checkpoints of the same step hold the same training state, bit for bit."""
    assert a['step'] == b['step']
    for key in ('model', 'ema', 'optimizer', 'data', 'rng'):
        assert_same_tree(a[key], b[key])
    assert a['counts']['updates'] == b['counts']['updates']


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_exits_0_then_resume_is_exact(fake_cifar, tmp_path, sig):
    out = tmp_path / 'stopped'
    cmd = [sys.executable, 'train.py', *TINY, '--data_root', fake_cifar, '--out_dir', str(out),
           '--max_steps', '100000', '--log_every', '1']
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / 'log.jsonl'
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    step = latest(out)['step']
    assert f'{sig.name}: stopped after step {step}, saved' in stdout.splitlines()[-1] and stderr == ''
    assert step >= 3 and len(train.checkpoint_paths(str(out))) == 1
    run('train.py', *TINY, '--data_root', fake_cifar, '--out_dir', out, '--max_steps', step + 2, '--resume',
        '--log_every', '1')
    run('train.py', *TINY, '--data_root', fake_cifar, '--out_dir', tmp_path / 'whole', '--max_steps', step + 2)
    same_run(latest(out), latest(tmp_path / 'whole'))
    assert [json.loads(l)['step'] for l in log.read_text().splitlines()] == list(range(1, step + 3))


def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(fake_cifar, tmp_path):
    out = tmp_path / 'killed'
    every = ['--save_every', '2', '--keep', '5']
    p = launch(out, 6, 4, faults='kill_in_save@2', extra=every, check=False, data_root=fake_cifar)
    assert p.returncode == -signal.SIGKILL
    assert sorted(f.name for f in out.glob('ckpt-*')) == ['ckpt-00000002.pt', 'ckpt-00000004.pt.tmp']
    assert latest(out)['step'] == 2                   # the half-written file is never taken for a checkpoint
    with pytest.raises(ValueError, match='not a readable hvae checkpoint'):
        load_checkpoint(out / 'ckpt-00000004.pt.tmp')
    launch(out, 6, 4, faults='', extra=[*every, '--resume'], data_root=fake_cifar)
    launch(tmp_path / 'whole', 6, 4, faults='', extra=every, data_root=fake_cifar)
    same_run(latest(out), latest(tmp_path / 'whole'))
    assert not list(out.glob('*.tmp'))


def test_keep_holds_the_last_k_checkpoints(fake_cifar, tmp_path):
    launch(tmp_path, 5, 4, faults='', extra=['--save_every', '1', '--keep', '2'], data_root=fake_cifar)
    assert [p.name for p in sorted(tmp_path.glob('ckpt-*'))] == ['ckpt-00000004.pt', 'ckpt-00000005.pt']


def test_save_every_minutes_0_is_off_and_writes_only_the_final_checkpoint(fake_cifar, tmp_path):
    launch(tmp_path, 4, 4, faults='', extra=['--save_every_minutes', '0', '--keep', '10'], data_root=fake_cifar)
    assert [p.name for p in tmp_path.glob('ckpt-*')] == ['ckpt-00000004.pt']


def test_full_disk_at_a_save_is_one_line_and_the_previous_checkpoint_survives(fake_cifar, tmp_path):
    p = launch(tmp_path, 6, 4, faults='enospc_save@2', extra=['--save_every', '2'], check=False, data_root=fake_cifar)
    line = error_line(p)
    assert 'ckpt-00000004.pt' in line and 'No space left on device' in line and 'ckpt-00000002.pt is intact' in line
    assert [f.name for f in tmp_path.glob('ckpt-*')] == ['ckpt-00000002.pt']
    assert latest(tmp_path)['step'] == 2


def test_unwritable_out_dir_fails_in_one_line_before_training(fake_cifar, tmp_path):
    (tmp_path / 'file').write_text('not a folder')
    p = run('train.py', *TINY, '--data_root', fake_cifar, '--out_dir', tmp_path / 'file' / 'run', check=False)
    assert 'file/run' in error_line(p) and 'step' not in p.stdout
    p = run('train.py', *TINY, '--data_root', fake_cifar, '--out_dir', tmp_path / 'file', check=False)
    assert 'is a file, not a folder' in error_line(p) and 'step' not in p.stdout


def test_too_little_disk_space_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train.shutil, 'disk_usage', lambda path: type('Usage', (), {'free': 10 * 2**20})())
    with pytest.raises(OSError, match='10 MiB free'):
        train.check_out_dir(str(tmp_path), 10**6, resume=False)


def test_a_fresh_run_refuses_an_out_dir_holding_checkpoints(fake_cifar, tmp_path):
    run('train.py', *TINY, '--data_root', fake_cifar, '--out_dir', tmp_path, '--max_steps', '1')
    line = error_line(run('train.py', *TINY, '--data_root', fake_cifar, '--out_dir', tmp_path, check=False))
    assert 'ckpt-00000001.pt' in line and '--resume' in line
    assert latest(tmp_path)['step'] == 1


def test_torchrun_restarts_a_killed_worker_and_training_resumes_exactly(fake_cifar, tmp_path):
    """Rank 1 is SIGKILLed at step 5; torchrun (--max-restarts 1) restarts both workers, which
    resume from the step-4 checkpoint: the run ends as one that was never killed."""
    every = ['--save_every', '2', '--log_every', '2']
    p = launch(tmp_path / 'killed', 6, 4, nproc=2, faults='kill@5:1', extra=every, torchrun=['--max-restarts', '1'],
               data_root=fake_cifar)
    assert 'resumed from step 4' in p.stdout
    launch(tmp_path / 'whole', 6, 4, nproc=2, faults='', extra=every, data_root=fake_cifar)
    killed, whole = latest(tmp_path / 'killed'), latest(tmp_path / 'whole')
    same_run(killed, whole)
    assert [json.loads(l)['step'] for l in (tmp_path / 'killed' / 'log.jsonl').read_text().splitlines()] == [2, 4, 6]


def test_nan_loss_and_inf_gradient_are_skipped_and_counted_in_one_process(fake_cifar, tmp_path):
    launch(tmp_path / 'ref', 1, 4, data_root=fake_cifar)
    launch(tmp_path / 'bad', 3, 4, faults='mean_z,nan_loss@2,inf_grad@3', data_root=fake_cifar)
    ref, bad = latest(tmp_path / 'ref'), latest(tmp_path / 'bad')
    assert bad['counts']['skipped'] == 2 and bad['counts']['updates'] == 1
    assert_close(ref['model'], bad['model'], atol=0)
    # the log stays strict JSON, and a window's means leave the NaN step out
    def strict(constant):
        raise ValueError(f'{constant} is not JSON')
    records = [json.loads(l, parse_constant=strict) for l in (tmp_path / 'bad' / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [2, 3] and all(math.isfinite(r['elbo_bpd']) for r in records)


def test_checkpoint_whose_weights_do_not_match_its_config_is_refused(fake_cifar, tmp_path):
    ckpt = launch(tmp_path, 1, 4, faults='', data_root=fake_cifar) and latest(tmp_path)
    bad = tmp_path / 'other.pt'
    torch.save(dict(ckpt, config=dict(ckpt['config'], width=32)), bad)
    for script in ('evaluate.py', 'sample.py'):
        line = error_line(run(script, bad, check=False))
        assert str(bad) in line and 'do not match its config' in line
    torch.save(dict(ckpt, format=99), bad)
    line = error_line(run('evaluate.py', bad, check=False))
    assert str(bad) in line and 'format 99' in line


def image_folder(root, good=30, seed=0):
    """good random RGB and greyscale PNGs plus one truncated, one garbage and one empty file."""
    root.mkdir()
    rng = np.random.RandomState(seed)
    for i in range(good):
        mode, shape = ('L', (40, 40)) if i % 3 == 0 else ('RGB', (40, 48, 3))
        Image.fromarray(rng.randint(0, 256, shape).astype(np.uint8), mode).save(root / f'{i:03d}.png')
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)).save(buf, 'PNG')
    (root / 'bad_truncated.png').write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (root / 'bad_garbage.jpg').write_bytes(b'not an image at all')
    (root / 'bad_empty.png').write_bytes(b'')
    return root


def test_image_folder_with_bad_files_trains_and_counts_them_in_the_log(tmp_path):
    import data
    root = image_folder(tmp_path / 'images')
    info = data.load_dataset('folder', root, 32)
    epoch = data.make_batches(info['train'], 4, seed=0, num_workers=0).shard(0)   # the files of the first epoch
    bad_in_train = sum(os.path.basename(info['train'].files[i]).startswith('bad_') for i in epoch)
    steps = len(info['train']) // 4
    p = run('train.py', *TINY, '--dataset', 'folder', '--image_size', '32', '--data_root', root,
            '--out_dir', tmp_path / 'run', '--max_steps', steps, '--log_every', steps)
    record = json.loads((tmp_path / 'run' / 'log.jsonl').read_text().splitlines()[-1])
    assert bad_in_train >= 1 and record.get('unreadable_images') == bad_in_train
    assert f'{bad_in_train} unreadable images replaced' in p.stdout and 'unreadable image' in p.stdout


def folder_run(tmp_path, steps, *extra):
    """A tiny run on image_folder(tmp_path / 'images'), in this process -> (image root, its latest checkpoint)."""
    root, out = tmp_path / 'images', tmp_path / 'run'
    if not root.exists():
        image_folder(root, good=40)
    train.main([*TINY, '--dataset', 'folder', '--image_size', '32', '--data_root', str(root), '--out_dir', str(out),
                '--max_steps', str(steps), *extra])
    return root, latest(out)


def test_a_folder_that_grew_after_a_checkpoint_keeps_the_run_s_split_and_normalisation(tmp_path, monkeypatch):
    import data
    import evaluate
    root, first = folder_run(tmp_path, 1)
    for i in range(40):   # white images: a split and moments recomputed from the listing would change
        Image.new('RGB', (40, 40), 'white').save(root / f'new{i:03d}.png')
    fresh = data.load_dataset('folder', root, 32)
    assert [os.path.relpath(f, root) for f in fresh['test'].files] != first['dataset']['files']['test']
    assert fresh['shift'] != first['dataset']['shift']
    monkeypatch.setattr(data, 'folder_moments', lambda train: pytest.fail('normalisation recomputed from the folder'))
    _, resumed = folder_run(tmp_path, 2, '--resume')
    assert resumed['step'] == 2 and resumed['dataset'] == first['dataset']
    evaluate.main([str(tmp_path / 'run' / 'ckpt-00000002.pt'), '--json', str(tmp_path / 'eval.json')])
    readable = [f for f in first['dataset']['files']['test'] if not f.startswith('bad_')]
    assert json.loads((tmp_path / 'eval.json').read_text())['images'] == len(readable)


def test_a_checkpoint_without_a_stored_split_resumes_and_evaluates_as_before(fake_cifar, tmp_path):
    """Checkpoints written before the split and normalisation were stored still work."""
    import evaluate
    launch(tmp_path, 1, 4, faults='', data_root=fake_cifar)
    path = tmp_path / 'ckpt-00000001.pt'
    old = {k: v for k, v in torch.load(path, weights_only=True).items() if k != 'dataset'}
    torch.save(old, path)
    evaluate.main([str(path), '--max_batches', '1', '--json', str(tmp_path / 'eval.json')])
    launch(tmp_path, 2, 4, faults='', extra=['--resume'], data_root=fake_cifar)
    assert latest(tmp_path)['dataset'] == dict(shift=-120.63838, scale=1 / 64.16736)


def test_layers_figure_and_reconstructions_work_on_a_folder_dataset(tmp_path):
    import sample
    _, ckpt = folder_run(tmp_path, 1)
    path = tmp_path / 'run' / 'ckpt-00000001.pt'
    sample.main([str(path), '--layers_figure', '--n', '2', '--layers', '0', '4', '--out', str(tmp_path / 'layers.png')])
    sample.main([str(path), '--recon_layers', '2', '--n', '2', '--out', str(tmp_path / 'recon.png')])
    assert Image.open(tmp_path / 'layers.png').size[0] > 0
    assert Image.open(tmp_path / 'recon.png').size == (2 * (2 * 34 + 2),) * 2   # 2 x 2 images of 32 + 2, scale 2
