"""train.py, sample.py and evaluate.py as a user runs them: end to end on the real CIFAR-10 files,
exact resume, and a one-line error for every kind of bad input."""
import gc
import json
import math
import sys
import weakref
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
import evaluate  # noqa: E402
from model import VAE, build, load_checkpoint, n_layers  # noqa: E402

from conftest import TINY, real_data, run, error_line, assert_same_tree  # noqa: E402


def test_end_to_end_on_real_cifar10_train_resume_sample_evaluate(tmp_path):
    root, out = real_data(), tmp_path / 'run'
    p = run('train.py', *TINY, '--data_root', root, '--out_dir', out, '--max_steps', '4')
    assert 'step 4 |' in p.stdout and 'bpd' in p.stdout
    p = run('train.py', *TINY, '--data_root', root, '--out_dir', out, '--max_steps', '6', '--resume')
    assert 'resumed from step 4' in p.stdout and 'step 6 |' in p.stdout
    ckpts = sorted(out.glob('ckpt-*.pt'))
    assert [c.name for c in ckpts] == ['ckpt-00000004.pt', 'ckpt-00000006.pt']
    ckpt = torch.load(ckpts[-1], weights_only=True)              # plain data only
    assert ckpt['step'] == 6 and ckpt['config']['width'] == 16
    records = [eval(l.replace('null', 'None')) for l in (out / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [2, 4, 6]
    assert all(math.isfinite(r['elbo_bpd']) and len(r['kl_per_layer']) == 4 for r in records)
    png = tmp_path / 's.png'
    run('sample.py', ckpts[-1], '--n', '3', '--temperature', '1.0', '0.5', '--out', png, '--scale', '1')
    from PIL import Image
    assert Image.open(png).size == (3 * 34 + 2, 2 * 34 + 2)    # 3 columns, 2 rows, 2-pixel gaps
    run('sample.py', ckpts[-1], '--n', '2', '--recon_layers', '2', '--out', tmp_path / 'r.png')
    p = run('evaluate.py', ckpts[-1], '--max_batches', '2')
    assert 'test negative ELBO' in p.stdout and '(8 images, ema weights, step 6)' in p.stdout
    bpd = float(p.stdout.split('negative ELBO: ')[1].split()[0])
    assert 3.0 < bpd < 12.0


def tiny_run(fake_cifar, out, steps, *extra):
    train.main([*TINY, '--data_root', fake_cifar, '--out_dir', str(out), '--max_steps', str(steps), *extra])
    return load_checkpoint(train.checkpoint_paths(str(out))[-1])


def test_eval_every_evaluates_on_its_steps_and_at_the_end_of_training(fake_cifar, tmp_path):
    tiny_run(fake_cifar, tmp_path, 5, '--eval_every', '2', '--eval_batches', '1')
    evals = [r for r in map(json.loads, (tmp_path / 'log.jsonl').read_text().splitlines()) if 'eval_elbo_bpd' in r]
    assert [r['step'] for r in evals] == [2, 4, 5]
    assert all(3.0 < r['eval_elbo_bpd'] < 12.0 and r['eval_images'] == 4 and r['eval_split'] == 'valid' for r in evals)


def test_resume_is_exact_2n_steps_equal_n_plus_n(fake_cifar, tmp_path):
    n = 5
    whole = tiny_run(fake_cifar, tmp_path / 'whole', 2 * n)
    tiny_run(fake_cifar, tmp_path / 'split', n)
    split = tiny_run(fake_cifar, tmp_path / 'split', 2 * n, '--resume')
    assert whole['step'] == split['step'] == 2 * n
    for key in ('model', 'ema', 'optimizer', 'data', 'rng'):
        assert_same_tree(whole[key], split[key])
    assert whole['counts']['updates'] == split['counts']['updates'] == 2 * n


def test_init_from_starts_a_new_run_from_a_checkpoints_ema_weights(fake_cifar, tmp_path):
    source = tiny_run(fake_cifar, tmp_path / 'a', 3)
    assert not torch.equal(source['model']['encoder.stem.weight'], source['ema']['encoder.stem.weight'])
    weights_only = tmp_path / 'converted.pt'   # what convert.py writes
    torch.save({k: source[k] for k in ('format', 'config', 'step', 'model', 'ema')}, weights_only)
    for i, path in enumerate((train.checkpoint_paths(str(tmp_path / 'a'))[-1], weights_only)):
        run = train.setup(train.parse_args([*TINY, '--data_root', fake_cifar, '--out_dir', str(tmp_path / f'b{i}'),
                                            '--init_from', str(path)]))
        assert run.step == 0 and run.counts['updates'] == 0 and not run.optimizer.state
        assert_same_tree(run.model.state_dict(), source['ema'])
        assert_same_tree(run.ema.state_dict(), source['ema'])


def test_a_fine_tuning_run_resumes_exactly_and_from_its_own_checkpoint(fake_cifar, tmp_path):
    tiny_run(fake_cifar, tmp_path / 'a', 2)
    source = train.checkpoint_paths(str(tmp_path / 'a'))[-1]
    whole = tiny_run(fake_cifar, tmp_path / 'whole', 4, '--init_from', source)
    tiny_run(fake_cifar, tmp_path / 'split', 2, '--init_from', source)
    split = tiny_run(fake_cifar, tmp_path / 'split', 4, '--init_from', source, '--resume')
    for key in ('model', 'ema', 'optimizer', 'data', 'rng'):
        assert_same_tree(whole[key], split[key])
    assert whole['config']['init_from'] == source


def test_init_from_another_network_names_what_differs(fake_cifar, tmp_path):
    tiny_run(fake_cifar, tmp_path / 'a', 1)
    source = train.checkpoint_paths(str(tmp_path / 'a'))[-1]
    line = error_line(run('train.py', *TINY, '--width', '32', '--init_from', source, '--out_dir', tmp_path / 'b',
                          '--dry_run', check=False))
    assert f'--init_from {source}' in line and 'width 16 (here 32)' in line and 'preset (cpu)' in line


def test_a_resumed_run_drops_the_loaded_checkpoint_before_training(fake_cifar, tmp_path, monkeypatch):
    """The checkpoint dict is a second copy of the weights and the optimiser (about 2 GB per rank at
    ImageNet-64 size): no reference to it may outlive the loading."""
    tiny_run(fake_cifar, tmp_path, 1)
    loaded, alive = [], []

    def load(path, *args, **kwargs):
        ckpt = load_checkpoint(path, *args, **kwargs)
        loaded.append(weakref.ref(next(iter(ckpt['model'].values()))))
        return ckpt

    def step(*args, **kwargs):
        gc.collect()
        alive.append(loaded[0]() is not None)
        return original_step(*args, **kwargs)

    original_step = train.train_step
    monkeypatch.setattr(train, 'load_checkpoint', load)
    monkeypatch.setattr(train, 'train_step', step)
    tiny_run(fake_cifar, tmp_path, 2, '--resume')
    assert len(loaded) == 1 and alive == [False]


def test_missing_data_folder_names_the_path_and_how_to_download(tmp_path):
    p = run('train.py', *TINY, '--data_root', tmp_path / 'nowhere', '--out_dir', tmp_path / 'o', check=False)
    line = error_line(p)
    assert str(tmp_path / 'nowhere') in line and 'download' in line


def test_corrupt_batch_file_is_a_one_line_error(fake_cifar, tmp_path):
    root = tmp_path / 'bad'
    (root / 'cifar-10-batches-py').mkdir(parents=True)
    for f in Path(fake_cifar, 'cifar-10-batches-py').iterdir():
        (root / 'cifar-10-batches-py' / f.name).write_bytes(f.read_bytes())
    (root / 'cifar-10-batches-py' / 'data_batch_3').write_bytes(b'not a pickle')
    line = error_line(run('train.py', *TINY, '--data_root', root, '--out_dir', tmp_path / 'o', check=False))
    assert 'data_batch_3' in line


@pytest.mark.parametrize('flags, words', [
    (['--depth', '0'], '--depth'),
    (['--depth', '2'], 'resolutions'),                   # the layout has 4 resolutions
    (['--batch_size', '0'], 'batch_size'),
    (['--dec_blocks', '1x1,4m1,16m4'], 'image size'),    # never reaches 32x32
    (['--enc_blocks', '32x1,32y2'], "'32y2'"),
    (['--log_every', '0'], '--log_every must be at least 1'),
    (['--max_steps', '0'], '--max_steps must be at least 1'),
    (['--keep', '-1'], '--keep must be 0 (off) or more'),
    (['--device', 'bogus'], "--device 'bogus' is not a device"),
    (['--device', 'cuda:99'], '--device cuda:99'),          # no such GPU, here or on a GPU machine
])
def test_impossible_flags_are_refused_before_training(tmp_path, flags, words):
    line = error_line(run('train.py', *TINY, *flags, '--out_dir', tmp_path, '--dry_run', check=False))
    assert words in line


@pytest.mark.parametrize('flags', [['--dataset', 'svhn'], ['--preset', 'huge']])
def test_unknown_dataset_or_preset_is_refused(flags):
    p = run('train.py', *flags, '--dry_run', check=False)
    assert p.returncode == 2 and 'invalid choice' in p.stderr


def test_resume_with_another_configuration_names_the_mismatch(fake_cifar, tmp_path):
    tiny_run(fake_cifar, tmp_path, 2)
    p = run('train.py', *TINY, '--width', '32', '--data_root', fake_cifar, '--out_dir', tmp_path,
            '--resume', check=False)
    line = error_line(p)
    assert 'ckpt-00000002.pt' in line and 'width=16' in line and '32' in line


@pytest.mark.parametrize('content', [b'', b'garbage' * 100, None])
def test_a_file_that_is_no_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / 'x.pt'
    if content is None:
        torch.save({'weights': torch.zeros(3)}, path)   # a torch file, but not ours
    else:
        path.write_bytes(content)
    for script in ('evaluate.py', 'sample.py'):
        line = error_line(run(script, path, check=False))
        assert str(path) in line and 'checkpoint' in line


def test_truncated_checkpoint_is_refused(fake_cifar, tmp_path):
    ckpt = tiny_run(fake_cifar, tmp_path, 1)
    path = Path(train.checkpoint_paths(str(tmp_path))[-1])
    path.write_bytes(path.read_bytes()[:1000])
    assert ckpt['step'] == 1
    with pytest.raises(ValueError, match='not a readable hvae checkpoint.*cut short'):
        load_checkpoint(path)


def test_a_flipped_byte_or_a_nan_weight_in_a_checkpoint_is_refused(fake_cifar, tmp_path):
    """torch.load reads a damaged tensor without a word: the zip's CRC-32s catch it."""
    import zipfile
    ckpt = tiny_run(fake_cifar, tmp_path, 1)
    path = Path(train.checkpoint_paths(str(tmp_path))[-1])
    with zipfile.ZipFile(path) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)   # the largest tensor's bytes, stored uncompressed
    raw = bytearray(path.read_bytes())
    start = member.header_offset + 30 + int.from_bytes(raw[member.header_offset + 26:member.header_offset + 28], 'little') \
        + int.from_bytes(raw[member.header_offset + 28:member.header_offset + 30], 'little')
    raw[start + member.file_size // 2] ^= 0xFF
    bad = tmp_path / 'flipped.pt'
    bad.write_bytes(bytes(raw))
    for script in ('evaluate.py', 'sample.py'):
        line = error_line(run(script, bad, '--out', tmp_path / 's.png', check=False) if script == 'sample.py'
                          else run(script, bad, check=False))
        assert str(bad) in line and 'corrupt' in line and member.filename.split('/')[-1] in line
    nan = tmp_path / 'nan.pt'
    torch.save(dict(ckpt, ema={k: v * float('nan') if v.is_floating_point() else v for k, v in ckpt['ema'].items()}), nan)
    with pytest.raises(ValueError, match='ema tensors hold NaN or inf'):
        load_checkpoint(nan)


@pytest.mark.parametrize('script', ['sample.py', 'evaluate.py', 'compress.py'])
def test_a_device_that_is_not_there_is_one_line_before_the_checkpoint_is_read(script, tmp_path):
    extra = [tmp_path / 'x.png', '-o', tmp_path / 'x.hvz'] if script == 'compress.py' else []
    line = error_line(run(script, tmp_path / 'never.pt', *extra, '--device', 'cuda:99', check=False))
    assert line.startswith('error: --device cuda:99') and 'never.pt' not in line


def test_a_model_of_another_dataset_is_refused_before_training(fake_cifar, tmp_path):
    p = run('train.py', '--preset', 'mnist', '--dataset', 'cifar10', '--data_root', fake_cifar, '--no_download',
            '--out_dir', tmp_path, check=False)
    assert 'cifar10 images are 3x32x32, the model takes 1x28x28 binary' in error_line(p)
    assert not train.checkpoint_paths(str(tmp_path))


def test_resuming_a_run_already_at_max_steps_says_so(fake_cifar, tmp_path):
    tiny_run(fake_cifar, tmp_path, 2)
    p = run('train.py', *TINY, '--data_root', fake_cifar, '--out_dir', tmp_path, '--max_steps', '2', '--resume')
    assert 'nothing to train: the run is at step 2 and --max_steps is 2' in p.stdout


def test_nan_loss_skips_the_update_and_counts_it(fake_cifar, tmp_path, monkeypatch):
    config = train.make_config(train.parse_args([*TINY, '--data_root', fake_cifar]))
    import data
    info = data.load_dataset('cifar10', fake_cifar, 32, False)
    model = VAE(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    forward = VAE.forward
    monkeypatch.setattr(VAE, 'forward', lambda self, x, t, eps=None: {
        **(out := forward(self, x, t, eps)), 'distortion': out['distortion'] * float('nan')})
    stats, skipped = train.train_step(model, optimizer, info['train'][:4], info, config)
    assert skipped and math.isnan(stats['elbo'])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # and in a run: every step skipped, counted in the log, then the run stops
    p = run('train.py', *TINY, '--data_root', fake_cifar, '--out_dir', tmp_path, '--max_steps', '50',
            '--skip_threshold', '1e-9', '--max_skips_in_row', '4', check=False)
    line = error_line(p)
    assert '4 updates in a row skipped' in line and 'skip_threshold 1e-09' in line and 'grad norm' in line
    ckpt = load_checkpoint(train.checkpoint_paths(str(tmp_path))[-1])
    assert ckpt['counts']['skipped'] == 4 and ckpt['counts']['updates'] == 0


def test_a_skipped_step_leaves_the_batch_norm_statistics_as_they_were(monkeypatch):
    """The attentive VAE's batch norm moves its running statistics in the forward pass: a NaN batch
    would poison them for good though its update is skipped."""
    config = train.make_config(train.parse_args(['--preset', 'attentive_cpu', '--batch_size', '2']))
    torch.manual_seed(0)
    model = build(config)
    optimizer = train.make_optimizer(model, config)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    info = dict(binary=False, shift=-127.5, scale=1 / 64)
    train.train_step(model, optimizer, images, info, config)           # a good step moves them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = train.model_inputs
    monkeypatch.setattr(train, 'model_inputs', lambda *a: (inputs(*a)[0] * float('nan'), inputs(*a)[1]))
    stats, skipped = train.train_step(model, optimizer, images, info, config)
    assert skipped and math.isnan(stats['elbo'])
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert all(k.endswith('num_batches_tracked') for k in moved), moved
    assert any('running_mean' in k for k in before)


def test_dry_run_prints_config_and_exact_parameter_count(tmp_path):
    p = run('train.py', '--preset', 'cifar10', '--dry_run', '--out_dir', tmp_path / 'never')
    assert '39,145,700 parameters' in p.stdout and '"width": 384' in p.stdout
    assert not (tmp_path / 'never').exists()          # no files written


def test_lr_warms_up_linearly_then_stays_constant():
    config = dict(train.BASE, lr=1e-3, warmup_steps=100)
    assert train.get_lr(0, config) == pytest.approx(1e-5)
    assert train.get_lr(49, config) == pytest.approx(5e-4)
    assert train.get_lr(99, config) == train.get_lr(10_000, config) == 1e-3


def test_ema_warmup_follows_the_raw_weights_early_and_the_rate_later():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        for p in a.parameters():
            p.zero_()
        for p in b.parameters():
            p.fill_(1.0)
    train.update_ema(a, b, 1, dict(ema_rate=0.999, ema_warmup=True))   # decay 2/11
    assert a.weight[0, 0].item() == pytest.approx(9 / 11)
    train.update_ema(a, b, 10**6, dict(ema_rate=0.999, ema_warmup=False))
    assert a.weight[0, 0].item() == pytest.approx(9 / 11 + (2 / 11) * 0.001)


def test_evaluate_report_per_layer_kls_add_up_to_the_rate():
    nelbo = torch.tensor([2.0, 2.2])
    kl = torch.tensor([[1.0, 3.0, 0.0], [3.0, 5.0, 2.0]])      # nats per image
    lines = evaluate.report(nelbo, kl, 3072, False, 'ema', 7, 'test')
    per_layer = [float(l.split(':')[1].split()[0]) for l in lines[2:]]
    rate = float(lines[1].split()[1])
    assert sum(per_layer) == pytest.approx(rate, abs=2e-3)
    assert rate == pytest.approx(7.0 / math.log(2), abs=1e-2)
    assert f'{2.1 / math.log(2):.4f}' in lines[0]


def test_every_preset_builds_in_a_dry_run():
    for preset in train.PRESETS:
        config = train.make_config(train.parse_args(['--preset', preset]))
        with torch.device('meta'):
            vae = build(config)
        assert n_layers(vae) >= 1 and config['preset'] == preset


def test_step_based_cosine_schedule_and_kl_warmup():
    config = train.make_config(train.parse_args(['--preset', 'cpu', '--optimizer', 'adamax', '--lr', '1e-2',
                                                 '--lr_start', '1e-4', '--warmup_epochs', '5', '--lr_schedule', 'cosine',
                                                 '--lr_min', '1e-4', '--epochs', '400', '--kl_weight_start', '0.1',
                                                 '--kl_warmup_epochs', '16']))
    spe = 1125                                       # 45k images / 40 per step
    assert train.get_lr(0, config, spe) == pytest.approx(1e-4 + (1e-2 - 1e-4) / (5 * spe))
    assert train.get_lr(5 * spe - 1, config, spe) == pytest.approx(1e-2)
    middle = 5 * spe + (400 - 5) * spe / 2
    assert train.get_lr(int(middle), config, spe) == pytest.approx((1e-2 + 1e-4) / 2, rel=1e-3)
    assert train.get_lr(400 * spe, config, spe) == pytest.approx(1e-4)
    assert train.get_kl_weight(0, config, spe) == pytest.approx(0.1)
    assert train.get_kl_weight(8 * spe, config, spe) == pytest.approx(0.55)
    assert train.get_kl_weight(16 * spe, config, spe) == 1.0
    assert isinstance(train.make_optimizer(torch.nn.Linear(2, 2), config), torch.optim.Adamax)


def test_flips_mirror_whole_images_only():
    torch.manual_seed(0)
    batch = torch.arange(64 * 3 * 4 * 4, dtype=torch.int32).reshape(64, 3, 4, 4).to(torch.uint8)
    out = train.flip(batch, 'hv')
    kinds = set()
    for a, b in zip(batch, out):
        for name, f in (('none', a), ('h', a.flip(2)), ('v', a.flip(1)), ('hv', a.flip(1).flip(2))):
            if torch.equal(f, b):
                kinds.add(name)
                break
        else:
            raise AssertionError('an image was not a flip of its input')
    assert kinds == {'none', 'h', 'v', 'hv'}
    assert torch.equal(train.flip(batch, ''), batch)



IN_HEAP = '''
import sys, torch
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == 'keep':
    import train; train.keep_freed_memory()
x = torch.empty(50 * 2**18)                          # one 50 MB activation
heap = [line.split()[0].split('-') for line in open('/proc/self/maps') if line.rstrip().endswith('[heap]')]
print(any(int(a, 16) <= x.data_ptr() < int(b, 16) for a, b in heap))
'''


@pytest.mark.skipif(sys.platform != 'linux', reason='keep_freed_memory tunes glibc malloc: Linux only')
def test_keep_freed_memory_puts_large_activations_in_the_reused_heap():
    """glibc by default gives every block over its mmap threshold a mapping of its own, unmapped on
    free, so each step's activations fault their pages in afresh; after keep_freed_memory
    (set_precision calls it) a 50 MB block comes from the heap, which keeps freed memory."""
    import subprocess
    run = lambda mode: subprocess.run([sys.executable, '-c', IN_HEAP, str(ROOT), mode],
                                      capture_output=True, text=True, check=True).stdout.strip()
    assert run('default') == 'False'
    assert run('keep') == 'True'


def test_a_width_that_leaves_the_blocks_no_channels_is_refused_in_the_config():
    with pytest.raises(ValueError, match='leaves the residual blocks no channels'):
        train.make_config(train.parse_args(['--preset', 'cpu', '--width', '3']))   # was a conv traceback after loading data
    assert train.make_config(train.parse_args(['--preset', 'cpu', '--width', '4']))['width'] == 4


def test_resume_with_another_depth_of_the_attentive_model_names_the_mismatch(fake_cifar, tmp_path):
    flags = ['--preset', 'nvae_cpu', '--batch_size', '2', '--data_root', fake_cifar, '--out_dir', str(tmp_path)]
    train.main([*flags, '--max_steps', '1'])
    with pytest.raises(ValueError, match='another configuration: num_layers=4'):   # was: --depth silently ignored
        train.main([*flags, '--max_steps', '2', '--depth', '2', '--resume'])


def test_a_resumed_run_whose_max_minutes_are_used_says_so_and_trains_nothing(fake_cifar, tmp_path, capsys):
    tiny_run(fake_cifar, tmp_path, 10, '--max_minutes', '0.0001')                 # out of time after step 1
    assert [Path(p).name for p in train.checkpoint_paths(str(tmp_path))] == ["ckpt-00000001.pt"]
    capsys.readouterr()
    tiny_run(fake_cifar, tmp_path, 10, '--resume')                                # was: one more step, saved
    assert 'nothing to train: the run has used its --max_minutes 0.0001' in capsys.readouterr().out
    assert [Path(p).name for p in train.checkpoint_paths(str(tmp_path))] == ["ckpt-00000001.pt"]
    assert tiny_run(fake_cifar, tmp_path, 3, '--resume', '--max_minutes', '0')['step'] == 3
