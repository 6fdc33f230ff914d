"""The official attentive VAE's training recipe in train.py (ATTENTIVE.md 6 and 7): presets, Keras
Adamax, the per-epoch learning-rate and KL-weight schedules, the loss in nats per image with the
L2 penalty, an EMA that carries the batch-norm statistics, and exact resume."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nvae  # noqa: E402
import train  # noqa: E402
from conftest import assert_same_tree  # noqa: E402
from model import build, load_checkpoint  # noqa: E402


def config_of(*flags):
    return train.make_config(train.parse_args(list(flags)))


def meta_count(config):
    with torch.device('meta'):
        return sum(p.numel() for p in build(config).parameters())


def test_dataset_cifar10_depth_16_is_the_papers_model_and_nvae_cifar10_its_baseline():
    config = config_of('--dataset', 'cifar10', '--depth', '16')
    assert config['preset'] == 'attentive_cifar10' and config['model'] == 'nvae' and config['num_layers'] == 16
    assert meta_count(config) == 118_974_679
    assert meta_count(config_of('--preset', 'nvae_cifar10')) == 79_206_420
    assert config_of('--preset', 'attentive_cifar10', '--depth', '4')['num_layers'] == 4


def test_official_preset_is_the_official_recipe():
    c = config_of('--preset', 'attentive_cifar10')
    assert (c['optimizer'], c['lr'], c['adam_eps'], c['batch_size'], c['flip']) == ('keras_adamax', 1e-2, 1e-3, 40, 'hv')
    assert (c['grad_clip'], c['skip_threshold'], c['ema_rate'], c['weight_decay']) == (0.0, 0.0, 0.0, 0.0)
    assert c['loss_per_image'] and c['kl_per_epoch'] and c['epochs'] == 400 and c['lr_schedule'] == 'cosine_warmup'
    long = config_of('--preset', 'attentive_cifar10_900')
    assert long['epochs'] == 900 and long['lr_schedule'] == 'cosine_restart_warmup' and long['lr_first_decay_epochs'] == 300


def test_keras_adamax_steps_follow_the_update_formula_with_epsilon_outside_the_max():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = train.KerasAdamax([p], lr=0.1, betas=(0.9, 0.999), eps=1e-3)
    g1, g2 = torch.tensor([0.2, -1e-4, 0.0]), torch.tensor([-0.1, 3e-4, 0.0])
    theta, m, u = p.detach().clone(), torch.zeros(3), torch.zeros(3)
    for t, g in enumerate((g1, g2), 1):
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        u = torch.maximum(0.999 * u, g.abs())
        theta = theta - 0.1 / (1 - 0.9 ** t) * m / (u + 1e-3)
        torch.testing.assert_close(p.detach(), theta)
    # PyTorch's Adamax (epsilon inside the max) moves an entry whose gradient stops differently
    steps = (torch.tensor([0.2, 1e-4], dtype=torch.float64), torch.tensor([0.1, 0.0], dtype=torch.float64))
    ours, theirs = (torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(2))
    opts = train.KerasAdamax([ours], lr=0.1, eps=1e-3), torch.optim.Adamax([theirs], lr=0.1, eps=1e-3)
    for g in steps:
        for p, opt in zip((ours, theirs), opts):
            p.grad = g.clone()
            opt.step()
    assert abs(float((ours - theirs)[1].detach())) > 1e-6


def test_keras_adamax_keeps_each_tensors_step_count_when_one_misses_a_gradient():
    # the fused update groups tensors by step count: a tensor that had no gradient once is corrected
    # with its own 1 - beta1^t, as a loop over tensors would
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = train.KerasAdamax([a, b], lr=0.1, eps=1e-3)
    alone = [torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())]
    solo = [train.KerasAdamax([p], lr=0.1, eps=1e-3) for p in alone]
    grads = [(torch.randn(3), torch.randn(2)), (torch.randn(3), None), (torch.randn(3), torch.randn(2))]
    for ga, gb in grads:
        a.grad, b.grad = ga, gb
        opt.step()
        for p, o, g in zip(alone, solo, (ga, gb)):
            if g is not None:
                p.grad = g
                o.step()
    assert opt.state[a]['step'] == 3 and opt.state[b]['step'] == 2
    torch.testing.assert_close(a.detach(), alone[0].detach(), rtol=0, atol=0)
    torch.testing.assert_close(b.detach(), alone[1].detach(), rtol=0, atol=0)


def test_cosine_warmup_learning_rate_at_named_epochs():
    c = config_of('--preset', 'attentive_cifar10')          # hvae step s is the official global step s + 1
    assert train.get_lr(0, c) == pytest.approx(1e-4 + (1 / 1560) * (1e-2 - 1e-4))
    assert train.get_lr(779, c) == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4))
    assert train.get_lr(1559, c) == pytest.approx(1e-2)       # end of the 5 warm-up epochs of 312 steps
    for epoch in (5, 105, 205, 399):                         # constant within a schedule epoch
        lr = 1e-2 * (0.99 * 0.5 * (1 + math.cos(math.pi * (epoch - 5) / 395)) + 0.01)
        assert train.get_lr(312 * epoch + 10, c) == pytest.approx(lr)
        assert train.get_lr(312 * epoch + 310, c) == pytest.approx(lr)
    assert train.get_lr(312 * 400, c) == pytest.approx(1e-4) == train.get_lr(312 * 450, c)


def test_cosine_restart_warmup_restarts_after_300_then_600_epochs():
    c = config_of('--preset', 'attentive_cifar10_900')
    assert train.get_lr(1559, c) == pytest.approx(1e-2)
    at = lambda epoch: train.get_lr(312 * epoch + 5, c)
    assert at(155) == pytest.approx(1e-2 * (0.99 * 0.5 + 0.01))          # half of the first period
    assert at(304) == pytest.approx(1e-2 * (0.99 * 0.5 * (1 + math.cos(math.pi * 299 / 300)) + 0.01))
    assert at(305) == pytest.approx(1e-2)                                 # restart
    assert at(605) == pytest.approx(1e-2 * (0.99 * 0.5 + 0.01))          # half of the 600-epoch period
    assert at(904) == pytest.approx(1e-2 * (0.99 * 0.5 * (1 + math.cos(math.pi * 599 / 600)) + 0.01))


def test_kl_weight_rises_per_epoch_from_0_1_to_1_over_16_epochs():
    c = config_of('--preset', 'attentive_cifar10')
    spe = 313
    assert train.get_kl_weight(0, c, spe) == pytest.approx(0.1) == train.get_kl_weight(spe - 1, c, spe)
    assert train.get_kl_weight(8 * spe + 200, c, spe) == pytest.approx(0.55)
    assert train.get_kl_weight(15 * spe, c, spe) == pytest.approx(0.1 + 0.9 * 15 / 16)
    assert train.get_kl_weight(16 * spe, c, spe) == 1.0


def test_ema_carries_the_batchnorm_running_statistics():
    config = dict(config_of('--preset', 'attentive_cpu'))
    torch.manual_seed(0)
    model, ema = build(config), build(config)
    model.train()
    model(torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1)   # moves the running statistics
    train.update_ema(ema, model, 1, config)
    for (name, a), b in zip(ema.named_buffers(), model.buffers()):
        assert torch.equal(a, b), name
    for a, b in zip(ema.parameters(), model.parameters()):   # ema_rate 0: the raw weights
        assert torch.equal(a, b)


def test_train_step_loss_is_nats_per_image_plus_the_l2_penalty(monkeypatch):
    import copy
    config = dict(config_of('--preset', 'attentive_cpu'), flip='')
    torch.manual_seed(0)
    model = build(config)
    before = copy.deepcopy(model)
    seen = []
    real_backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, 'backward', lambda self, *a, **k: seen.append(self.detach()) or real_backward(self, *a, **k))
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    info = dict(binary=False, shift=0.0, scale=1.0)
    torch.manual_seed(1)
    train.train_step(model, train.make_optimizer(model, config), batch, info, config, kl_weight=0.3)
    target = batch.float() / 127.5 - 1
    torch.manual_seed(1)                                     # the same noise draws
    out = before(target, target)
    loss = 3072 * (out['distortion'] + 0.3 * out['rate']).mean() + before.l2_penalty()
    torch.testing.assert_close(seen[0], loss.detach())


def tiny_run(root, out, steps, *extra):
    train.main(['--preset', 'attentive_cpu', '--batch_size', '4', '--no_download', '--log_every', '2',
                '--data_root', root, '--out_dir', str(out), '--max_steps', str(steps), *extra])
    return load_checkpoint(train.checkpoint_paths(str(out))[-1])


def test_resume_of_the_official_model_is_exact_batchnorm_statistics_included(fake_cifar, tmp_path):
    whole = tiny_run(fake_cifar, tmp_path / 'whole', 4)
    tiny_run(fake_cifar, tmp_path / 'split', 2)
    split = tiny_run(fake_cifar, tmp_path / 'split', 4, '--resume')
    assert any(k.endswith('running_mean') for k in whole['model'])
    for key in ('model', 'ema', 'optimizer', 'data', 'rng'):
        assert_same_tree(whole[key], split[key])
    assert isinstance(build(whole['config']), nvae.NVAE)


def test_end_to_end_on_real_cifar10_train_sample_evaluate_the_official_model(tmp_path):
    from conftest import real_data, run
    root, out = real_data(), tmp_path / 'run'
    common = ['--preset', 'attentive_cpu', '--batch_size', '4', '--no_download', '--log_every', '1',
              '--data_root', root, '--out_dir', out]
    p = run('train.py', *common, '--max_steps', '2')
    assert 'model nvae (attentive_cpu preset): 4 stochastic layers, 373,923 parameters' in p.stdout
    assert 'step 2 |' in p.stdout
    ckpt = sorted(out.glob('ckpt-*.pt'))[-1]
    run('sample.py', ckpt, '--n', '2', '--rows', '1', '--out', tmp_path / 's.png', '--scale', '1')
    run('sample.py', ckpt, '--n', '2', '--recon_layers', '2', '--out', tmp_path / 'r.png')
    run('sample.py', ckpt, '--n', '2', '--layers_figure', '--layers', '0', '4', '--out', tmp_path / 'f.png')
    p = run('evaluate.py', ckpt, '--max_batches', '1', '--iw', '2', '--kl_png', '')
    assert 'test negative ELBO' in p.stdout and 'importance-weighted NLL, K = 2' in p.stdout
    bpd = float(p.stdout.split('negative ELBO: ')[1].split()[0])
    assert 3.0 < bpd < 30.0


def test_torchrun_two_processes_keep_one_set_of_batchnorm_statistics(fake_cifar, tmp_path):
    """Under torchrun each process normalises with its own batch and the moving statistics are the
    mean of the processes' updates (train.average_bn_statistics), as under the official
    MirroredStrategy; the checkpoint then loads and the statistics have moved from their init."""
    import os
    import subprocess
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py',
           '--preset', 'attentive_cpu', '--batch_size', '2', '--no_download', '--log_every', '1',
           '--data_root', fake_cifar, '--out_dir', str(out), '--max_steps', '2']
    p = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 0, p.stderr[-2000:]
    assert '2 processes x batch 2' in p.stdout
    ckpt = load_checkpoint(train.checkpoint_paths(str(out))[-1])
    means = [v for k, v in ckpt['model'].items() if k.endswith('running_mean')]
    assert means and all(torch.isfinite(m).all() for m in means) and any(m.abs().sum() > 0 for m in means)
    for k, v in ckpt['model'].items():
        if k.endswith(('running_mean', 'running_var')):
            assert torch.equal(ckpt['ema'][k], v)                 # the EMA copy carries them


def test_sync_bn_on_cpu_is_a_one_line_error(tmp_path):
    from conftest import error_line, run
    line = error_line(run('train.py', '--preset', 'attentive_cpu', '--sync_bn', '--device', 'cpu',
                          '--out_dir', tmp_path / 'o', check=False))
    assert '--sync_bn needs CUDA' in line
