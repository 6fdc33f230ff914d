"""Scale-out and mixed precision: torchrun DDP on CPU (gloo) against one process, checkpoints that
move between process counts, autocast dtypes, channels_last, compile. The runs go through
tests/faults.py, which is train.py with optional faults; `mean_z` removes the posterior noise, so
that two runs that split the same images over processes differently can be compared exactly."""
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from model import VAE, load_checkpoint  # noqa: E402

from conftest import TINY, error_line, run, launch, latest, assert_close  # noqa: E402

def test_two_processes_equal_one_process_with_the_doubled_batch(fake_cifar, tmp_path):
    one, two = tmp_path / 'one', tmp_path / 'two'
    launch(one, 4, 8, data_root=fake_cifar)
    p = launch(two, 4, 4, nproc=2, data_root=fake_cifar)
    assert '2 processes x batch 4' in p.stdout
    a, b = latest(one), latest(two)
    assert_close(a['model'], b['model'])
    assert_close(a['ema'], b['ema'])
    assert a['data'] == b['data'] == {'epoch': 0, 'index': 4, 'global_batch': 8}
    assert len(b['rng']) == 2                                         # every rank's noise stream is saved
    ranks = [torch.load(two / f'final-rank{r}.pt', weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])   # both ranks hold the same weights
    # one checkpoint and one log, written by rank 0: one record per logged step
    assert sorted(f.name for f in two.iterdir() if not f.name.startswith('final')) == ['ckpt-00000004.pt', 'log.jsonl']
    assert [json.loads(l)['step'] for l in (two / 'log.jsonl').read_text().splitlines()] == [2, 4]


def test_checkpoint_of_two_processes_resumes_in_one_and_the_reverse(fake_cifar, tmp_path):
    launch(tmp_path / 'ref', 6, 4, nproc=2, data_root=fake_cifar)             # never interrupted
    launch(tmp_path / 'a', 3, 4, nproc=2, data_root=fake_cifar)               # 2 x 4, then 1 x 8
    p = launch(tmp_path / 'a', 6, 8, extra=['--resume'], data_root=fake_cifar)
    assert 'resumed from step 3' in p.stdout
    launch(tmp_path / 'b', 3, 8, data_root=fake_cifar)                        # 1 x 8, then 2 x 4
    launch(tmp_path / 'b', 6, 4, nproc=2, extra=['--resume'], data_root=fake_cifar)
    ref = latest(tmp_path / 'ref')
    for run_dir in ('a', 'b'):
        ckpt = latest(tmp_path / run_dir)
        assert ckpt['step'] == 6 and ckpt['data'] == ref['data']
        assert_close(ref['model'], ckpt['model'])
        assert_close(ref['ema'], ckpt['ema'])


def test_ranks_resume_from_rank_0_s_checkpoint_or_stop_naming_the_rank_that_cannot_see_it(fake_cifar, tmp_path):
    """Node-local out_dirs (rank 1 reads <out>-rank1): while rank 1's is empty, --resume stops in
    one line naming rank 1 and rank 0's checkpoint; with the checkpoint copied there, both ranks
    resume from it and stay identical."""
    out, local = tmp_path / 'out', tmp_path / 'out-rank1'
    launch(out, 2, 8, data_root=fake_cifar)                     # one process, the same global batch
    p = launch(out, 4, 4, nproc=2, faults='mean_z,own_out_dir@0:1', extra=['--resume'], check=False, data_root=fake_cifar)
    assert p.returncode != 0 and 'step 3' not in p.stdout
    assert f"error: rank 1 cannot see {out}/ckpt-00000002.pt, rank 0's latest checkpoint" in p.stderr
    local.mkdir()
    shutil.copy(out / 'ckpt-00000002.pt', local)
    p = launch(out, 4, 4, nproc=2, faults='mean_z,own_out_dir@0:1', extra=['--resume'], data_root=fake_cifar)
    assert 'resumed from step 2' in p.stdout and latest(out)['step'] == 4 and latest(local)['step'] == 2
    ranks = [torch.load(out / f'final-rank{r}.pt', weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


def test_sticky_skip_stop_saves_before_any_rank_exits_and_resume_may_raise_skip_threshold(fake_cifar, tmp_path):
    """Every update skipped: the run stops after 2 in a row on both ranks, with rank 0's (slow)
    checkpoint written; resumed with a higher --skip_threshold and another --lr, it trains on."""
    stuck = ['--skip_threshold', '1e-9', '--max_skips_in_row', '2']
    p = launch(tmp_path, 6, 4, nproc=2, faults='mean_z,slow_save@1:0', extra=stuck, check=False, data_root=fake_cifar)
    assert p.returncode != 0 and '2 updates in a row skipped' in p.stderr
    stopped = latest(tmp_path)
    assert stopped['step'] == 2 and stopped['counts']['updates'] == 0
    for r in (0, 1):   # no rank left before the checkpoint was on disk (torchrun kills the rest when one exits)
        assert 'ckpt-00000002.pt' in (tmp_path / f'final-rank{r}-exit.txt').read_text().split()
    p = launch(tmp_path, 4, 8, extra=['--resume', '--skip_threshold', '1e9', '--lr', '1e-3'], data_root=fake_cifar)
    assert 'recipe changed on resume: lr 0.002 -> 0.001, skip_threshold 1e-09 -> 1000000000.0' in p.stdout
    resumed = latest(tmp_path)
    assert resumed['step'] == 4 and resumed['counts']['updates'] == 2
    assert resumed['config']['skip_threshold'] == 1e9 and resumed['config']['lr'] == 1e-3


def test_two_ranks_on_a_fresh_data_root_download_once_and_end_with_one_intact_copy(fake_cifar, tmp_path):
    """Under torchrun with nothing in data_root, rank 0 downloads (a local file URL, each download
    starting 1 s late so that ranks fetching at once would overlap) and extracts; rank 1 waits,
    then finds the files."""
    tarball = tmp_path / 'mirror.tar.gz'
    with tarfile.open(tarball, 'w:gz') as tar:
        tar.add(Path(fake_cifar) / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    root = tmp_path / 'data'
    p = launch(tmp_path / 'out', 1, 4, nproc=2, data_root=root, env={'HVAE_CIFAR_TARBALL': str(tarball)})
    assert p.stdout.count('downloading') == 1
    assert sorted(f.name for f in root.iterdir()) == ['cifar-10-batches-py', 'cifar-10-python.tar.gz']
    assert (root / 'cifar-10-python.tar.gz').read_bytes() == tarball.read_bytes()
    for f in (Path(fake_cifar) / 'cifar-10-batches-py').iterdir():
        assert (root / 'cifar-10-batches-py' / f.name).read_bytes() == f.read_bytes()


def test_one_rank_s_nan_loss_and_another_rank_s_inf_gradient_skip_on_every_rank(fake_cifar, tmp_path):
    """Step 2: rank 1's loss is NaN; step 3: rank 0's gradient gets an inf after the all-reduce,
    which only rank 0 sees. Both steps are skipped everywhere: the weights equal those of a run
    stopped after step 1, on both ranks."""
    launch(tmp_path / 'ref', 1, 4, nproc=2, data_root=fake_cifar)
    launch(tmp_path / 'bad', 3, 4, nproc=2, faults='mean_z,nan_loss@2:1,inf_grad@3:0', extra=['--log_every', '1'],
           data_root=fake_cifar)
    ref, bad = latest(tmp_path / 'ref'), latest(tmp_path / 'bad')
    assert bad['counts']['skipped'] == 2 and bad['counts']['updates'] == 1
    assert_close(ref['model'], bad['model'], atol=0)
    ranks = [torch.load(tmp_path / 'bad' / f'final-rank{r}.pt', weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    log = [json.loads(l) for l in (tmp_path / 'bad' / 'log.jsonl').read_text().splitlines()]
    assert [r['skipped'] for r in log] == [0, 1, 2] and log[1]['elbo_bpd'] is None   # its NaN, as JSON's null


@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
def test_injected_inf_is_skipped_not_written_into_the_weights(fake_cifar, tmp_path, dtype):
    p = launch(tmp_path / 'ref', 1, 4, extra=['--dtype', dtype], data_root=fake_cifar)
    slow_bf16 = dtype == 'bf16' and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert ('note: this CPU has no bf16 instructions' in p.stdout) == slow_bf16   # a CPU without them says so
    launch(tmp_path / 'inf', 2, 4, faults='mean_z,inf_grad@2', extra=['--dtype', dtype], data_root=fake_cifar)
    ref, inf = latest(tmp_path / 'ref'), latest(tmp_path / 'inf')
    assert inf['counts']['skipped'] == 1
    assert_close(ref['model'], inf['model'], atol=0)
    assert_close(ref['ema'], inf['ema'], atol=0)


def test_fp16_on_cpu_is_refused_in_one_line(fake_cifar, tmp_path):
    p = run('train.py', *TINY, '--dtype', 'fp16', '--data_root', fake_cifar, '--out_dir', tmp_path, check=False)
    assert 'fp16 needs a CUDA device' in error_line(p)


def tiny_model():
    config = train.make_config(train.parse_args(TINY))
    torch.manual_seed(0)
    return VAE(config), torch.randn(2, 3, 32, 32), torch.rand(2, 3, 32, 32) * 2 - 1


def test_bf16_autocast_keeps_likelihood_and_kl_in_fp32_and_close_to_fp32():
    vae, x, target = tiny_model()
    eps = [torch.randn(2, 4, l.res, l.res) for l in vae.decoder.layers]
    full = vae(x, target, eps)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        half = vae(x, target, eps)
    assert all(half[k].dtype == torch.float32 for k in ('distortion', 'rate', 'kl'))
    elbo = lambda out: (out['distortion'] + out['rate']).mean().item()
    assert elbo(half) == pytest.approx(elbo(full), rel=2e-2)     # bf16 has 8 bits of mantissa
    assert elbo(half) != elbo(full)                               # autocast did act


def test_channels_last_gives_the_same_outputs_and_gradients():
    vae, x, target = tiny_model()
    eps = [torch.randn(2, 4, l.res, l.res) for l in vae.decoder.layers]
    out = vae(x, target, eps)
    out['distortion'].sum().backward()
    grads = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad()
    vae = vae.to(memory_format=torch.channels_last)
    out_cl = vae(x.contiguous(memory_format=torch.channels_last), target, eps)
    out_cl['distortion'].sum().backward()
    assert torch.allclose(out['distortion'], out_cl['distortion'], atol=1e-5)
    assert all(torch.allclose(g, p.grad.contiguous(), atol=1e-5) for g, p in zip(grads, vae.parameters()))


def test_compiled_model_keeps_plain_state_dict_names():
    vae, x, target = tiny_model()
    names = list(vae.state_dict())
    vae.compile(backend='eager')        # what --compile does, minus inductor's code generation
    out = vae(x, target)
    assert list(vae.state_dict()) == names and not any('_orig_mod' in n for n in names)
    assert torch.isfinite(out['distortion']).all()


@pytest.fixture
def kernel_settings():
    """set_precision changes process-wide settings: put them back for the tests that follow."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = flags
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def test_no_tf32_asks_for_full_fp32_and_bench_mfu_uses_the_tf32_peak_when_tf32_is_on(monkeypatch, kernel_settings):
    import bench
    train.set_precision(train.make_config(train.parse_args(TINY)))
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark   # PyTorch's default; the autotuner on
    train.set_precision(train.make_config(train.parse_args([*TINY, '--no_tf32'])))
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'NVIDIA H100 80GB HBM3')
    assert bench.peak_flops('cuda', 'fp32', tf32=True) == 494.5e12    # the fp32 peak (67e12) gave MFU over 100%
    assert bench.peak_flops('cuda', 'fp32', tf32=False) == 67e12
    assert bench.peak_flops('cuda', 'bf16', tf32=True) == 989e12


def test_deterministic_turns_on_deterministic_kernels_for_the_run(fake_cifar, tmp_path, monkeypatch, kernel_settings):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    seen, original_step = [], train.train_step

    def step(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     torch.backends.cudnn.benchmark, os.environ.get('CUBLAS_WORKSPACE_CONFIG')))
        return original_step(*args, **kwargs)

    monkeypatch.setattr(train, 'train_step', step)
    train.main([*TINY, '--data_root', fake_cifar, '--out_dir', str(tmp_path), '--max_steps', '1', '--deterministic'])
    assert seen == [(True, True, False, ':4096:8')]
