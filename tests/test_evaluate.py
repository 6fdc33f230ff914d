"""evaluate.py, figures.py and sample.py --layers_figure: the importance-weighted bound is the
one-sample ELBO at K = 1, tighter for larger K and the same however it is chunked; the per-layer
KLs add up to the rate; figures are drawn; bad input gets a one-line error."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import evaluate  # noqa: E402
import figures  # noqa: E402
import sample  # noqa: E402
from model import VAE, CHECKPOINT_FORMAT  # noqa: E402

DATA = Path(os.environ.get('HVAE_DATA', ROOT.parent / 'shared' / 'data'))
# the tiny layout of tests/test_train.py: 4 stochastic layers at 1, 4, 16 and 32
TINY = dict(dataset='cifar10', image_size=32, width=16, zdim=4, num_mixtures=2,
            enc_blocks='32x1,32d2,16x1,16d4,4x1,4d4,1x1', dec_blocks='1x1,4m1,16m4,32m16',
            batch_size=8, seed=0, bits=8, pad=0, image_channels=3)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny VAE trained for 50 steps on real CIFAR-10 images (enough for a posterior that
    carries information), its data, and a checkpoint of it."""
    if not (DATA / 'cifar-10-batches-py').is_dir():
        pytest.fail(f'the offline CIFAR-10 copy is missing: looked in {DATA}/cifar-10-batches-py (set HVAE_DATA)')
    info = data.load_dataset('cifar10', DATA, 32, False)
    torch.manual_seed(0)
    vae = VAE(TINY)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    for step in range(50):
        x, target = data.prepare(info['train'][16 * step:16 * (step + 1)], info)
        out = vae(x, target)
        opt.zero_grad()
        (out['distortion'] + out['rate']).mean().backward()
        opt.step()
    vae.eval()
    path = tmp_path_factory.mktemp('ckpt') / 'ckpt-00000050.pt'
    config = dict(TINY, data_root=str(DATA))
    torch.save(dict(format=CHECKPOINT_FORMAT, config=config, step=50, model=vae.state_dict(), ema=vae.state_dict()), path)
    x, target = data.prepare(info['test'][:8], info)
    return dict(vae=vae, info=info, x=x, target=target, path=path, config=config)


def dims_of(target):
    return target[0].numel()


# -----------------------------------------------------------------------------
# the importance-weighted bound

def test_sampled_kl_averages_to_the_analytic_kl(trained):
    vae, x, target = trained['vae'], trained['x'][:2], trained['target'][:2]
    xs, ts = x.repeat(128, 1, 1, 1), target.repeat(128, 1, 1, 1)           # 256 draws
    eps = evaluate.layer_noise(vae, len(xs), torch.Generator().manual_seed(0))
    with torch.no_grad():
        analytic = vae(xs, ts, eps)['kl']                                    # (256, L), given z_<l
        sampled = vae(xs, ts, eps, sampled_kl=True)['kl']
    diff = (sampled - analytic).double()                                     # E[sampled | z_<l] = analytic
    se = diff.std(0) / math.sqrt(len(diff))
    assert (diff.mean(0).abs() < 4 * se + 1e-6).all(), (diff.mean(0), se)
    assert analytic.sum(1).mean() > 1.0                                      # the posterior carries information


def test_iw_with_one_sample_is_the_one_sample_elbo_of_the_same_draws(trained):
    vae, x, target = trained['vae'], trained['x'], trained['target']
    eps = evaluate.layer_noise(vae, len(x), torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = vae(x, target, eps, sampled_kl=True)
    # log p(x|z) + log p(z) - log q(z|x) at the same z, written out
    mc_nelbo = (out['distortion'] + out['kl'].sum(1) / dims_of(target)).double() * dims_of(target)
    iw = evaluate.iw_nll(vae, x, target, 1, 1, torch.Generator().manual_seed(3))
    torch.testing.assert_close(iw, mc_nelbo, rtol=1e-6, atol=1e-3)


def test_analytic_negative_elbo_is_the_expectation_of_the_one_sample_estimate(trained):
    vae, x, target = trained['vae'], trained['x'][:2], trained['target'][:2]
    xs, ts = x.repeat(128, 1, 1, 1), target.repeat(128, 1, 1, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        out = vae(xs, ts)
    analytic = ((out['distortion'] + out['rate']).double() * dims_of(target)).view(128, 2)
    iw1 = evaluate.iw_nll(vae, xs, ts, 1, 1, torch.Generator().manual_seed(1)).view(128, 2)
    diff = analytic.mean(0) - iw1.mean(0)
    se = torch.sqrt(analytic.var(0) / 128 + iw1.var(0) / 128)
    assert (diff.abs() < 4 * se).all(), (diff, se)


def test_iw_bound_is_tighter_than_the_elbo_on_a_batch(trained):
    vae, x, target = trained['vae'], trained['x'], trained['target']
    torch.manual_seed(0)
    with torch.no_grad():       # the analytic negative ELBO, averaged over 4 draws
        nelbo = torch.stack([(lambda o: (o['distortion'] + o['rate']) * dims_of(target))(vae(x, target))
                             for _ in range(4)]).double().mean(0)
    iw = torch.stack([evaluate.iw_nll(vae, x, target, 16, 8, torch.Generator().manual_seed(s))
                      for s in range(4)]).mean(0)
    gap = nelbo - iw                                                         # (8,) nats per image
    assert gap.mean() > 2 * gap.std() / math.sqrt(len(gap)) and gap.mean() > 0.5, gap


def test_iw_nll_does_not_increase_as_k_grows_from_1_to_64(trained):
    vae, x, target = trained['vae'], trained['x'], trained['target']
    nll = {k: evaluate.iw_nll(vae, x, target, k, 16, torch.Generator().manual_seed(k)) for k in (1, 4, 16, 64)}
    ks = sorted(nll)
    for a, b in zip(ks, ks[1:]):
        diff = nll[b] - nll[a]                                               # paired over images
        assert diff.mean() <= 2 * diff.std() / math.sqrt(len(diff)), (a, b, diff)
    assert nll[64].mean() < nll[1].mean()


def test_chunked_and_unchunked_bounds_are_equal(trained):
    vae, x, target = trained['vae'], trained['x'][:3], trained['target'][:3]
    runs = [evaluate.iw_nll(vae, x, target, 12, chunk, torch.Generator().manual_seed(7)) for chunk in (12, 5, 1)]
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], rtol=1e-6, atol=1e-3)


def test_evaluation_is_the_same_whatever_the_chunk_and_the_elbo_whatever_the_iw(trained):
    vae, info, config = trained['vae'], trained['info'], trained['config']
    split, device = info['test'][:10], torch.device('cpu')
    a = evaluate.evaluate(vae, split, info, dict(config, batch_size=4), device, iw=6, iw_chunk=6)
    b = evaluate.evaluate(vae, split, info, dict(config, batch_size=4), device, iw=6, iw_chunk=4)
    c = evaluate.evaluate(vae, split, info, dict(config, batch_size=4), device)
    torch.testing.assert_close(a[2], b[2], rtol=1e-6, atol=1e-3)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]) and c[2] is None
    assert a[2].shape == (10,) and (a[2] < a[0].double() * 3072).float().mean() > 0.5


# -----------------------------------------------------------------------------
# the printed report

def test_printed_per_layer_kls_add_up_to_the_printed_rate(trained, tmp_path, capsys):
    png, out = tmp_path / 'kl.png', tmp_path / 'r.json'
    evaluate.main([str(trained['path']), '--max_batches', '2', '--iw', '3', '--kl_png', str(png), '--json', str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert '(16 images, ema weights, step 50)' in lines[0]
    rate = float(lines[1].split()[1])
    layers = [l for l in lines if l.startswith('  layer')]
    bits = [float(l.split(':')[1].split()[0]) for l in layers]
    shares = [float(l.split()[-1].rstrip('%')) for l in layers]
    assert len(bits) == 4 and sum(bits) == pytest.approx(rate, abs=4 * 5e-4 + 5e-3)
    assert sum(shares) == pytest.approx(100, abs=4 * 0.05)
    result = json.loads(out.read_text())
    assert sum(result['kl_bits']) == pytest.approx(result['rate_bits'])
    assert result['images'] == 16 and result['layers'] == 4 and result['iw'] == 3
    assert any(l.startswith('test importance-weighted NLL, K = 3:') for l in lines)
    assert any(l.startswith('active layers (KL >= 1% of the rate):') for l in lines)
    assert Image.open(png).size[0] >= 640


def test_active_layers_hold_at_least_one_percent_of_the_rate():
    assert evaluate.active_layers(torch.tensor([50.0, 0.4, 49.6])) == [0, 2]
    assert evaluate.active_layers(torch.tensor([1.0, 1.0])) == [0, 1]
    assert evaluate.active_layers(torch.zeros(3)) == []


def script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def one_error_line(p):
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), p.stderr
    return lines[0]


@pytest.mark.parametrize('flags', [['--iw', '-1'], ['--iw', '4', '--iw_chunk', '0'], ['--batch_size', '0']])
def test_bad_evaluate_flags_are_refused_before_any_work(flags):
    with pytest.raises(ValueError, match='--'):
        evaluate.main(['no-such-checkpoint.pt', *flags])


def test_bad_input_gets_a_one_line_error(tmp_path):
    assert '--iw >= 0' in one_error_line(script('evaluate.py', 'x.pt', '--iw', '0', '--iw_chunk', '0'))
    log = tmp_path / 'log.jsonl'
    log.write_text('{"step": 1, "eval_elbo_bpd": 5.0}\n')
    assert 'no records with kl_per_layer' in one_error_line(script('figures.py', 'kl_heatmap', log))
    with pytest.raises(FileNotFoundError):
        figures.kl_heatmap(tmp_path / 'missing.jsonl', tmp_path / 'h.png')


def test_evaluate_refuses_an_output_path_it_cannot_write_before_any_work(trained, tmp_path, monkeypatch):
    p = script('evaluate.py', trained['path'], '--max_batches', '1', '--kl_png', '', '--json', tmp_path)
    assert one_error_line(p) == f'error: --json {tmp_path} is a folder; give a file name'   # was a traceback
    monkeypatch.setattr(evaluate, 'evaluate', lambda *a, **k: pytest.fail('evaluated before checking the outputs'))
    for flags, words in [(['--json', tmp_path / 'nod' / 'r.json'], f"--json {tmp_path / 'nod' / 'r.json'}: the folder"),
                         (['--kl_png', tmp_path / 'nod' / 'k.png'], 'does not exist'),
                         (['--kl_png', tmp_path / 'k.xyz'], 'use .png')]:
        with pytest.raises(ValueError, match=words):
            evaluate.main([str(trained['path']), '--max_batches', '1', '--kl_png', '', *map(str, flags)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('what', ['kl_png', 'json'])
def test_a_failed_write_prints_the_numbers_first_and_leaves_the_old_file_whole(trained, tmp_path, capsys, monkeypatch, what):
    out = tmp_path / ('k.png' if what == 'kl_png' else 'r.json')
    out.write_text('old')

    def half_then_fail(path):   # a full disk half way through the file
        Path(path).write_bytes(b'half')
        raise OSError(28, 'No space left on device')

    class FullDisk(dict):       # json stops at this value, part way through the file
        def items(self):
            raise OSError(28, 'No space left on device')

    if what == 'kl_png':
        monkeypatch.setattr(figures, 'bar_chart', lambda values, path, *args: half_then_fail(path))
    else:
        summary = evaluate.summary
        monkeypatch.setattr(evaluate, 'summary', lambda *args: dict(summary(*args), last=FullDisk(a=1)))
    with pytest.raises(OSError, match='No space left'):
        evaluate.main([str(trained['path']), '--max_batches', '1', '--kl_png', '', f'--{what}', str(out)])
    assert 'test negative ELBO:' in capsys.readouterr().out
    assert out.read_text() == 'old' and list(tmp_path.iterdir()) == [out]   # no half file, no temp file left


def test_sample_refuses_an_output_path_it_cannot_write_before_sampling(trained, tmp_path, monkeypatch):
    p = script('sample.py', trained['path'], '--n', '1', '--rows', '1', '--out', tmp_path / 'xx')
    assert 'not an image extension Pillow writes; use .png' in one_error_line(p)   # was: after sampling
    for out, words in [(tmp_path / 'nod' / 's.png', 'does not exist'), (tmp_path, 'is a folder')]:
        with pytest.raises(ValueError, match=words):   # refused before the checkpoint is even read
            sample.main(['no-such-checkpoint.pt', '--out', str(out)])
    assert not list(tmp_path.iterdir())
    out = tmp_path / 's.png'
    out.write_text('old')

    def half_then_fail(image, path, *args, **kwargs):   # a full disk half way through the file
        Path(path).write_bytes(b'half')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(Image.Image, 'save', half_then_fail)
    with pytest.raises(OSError, match='No space left'):
        sample.main([str(trained['path']), '--n', '1', '--rows', '1', '--out', str(out)])
    assert out.read_text() == 'old' and list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize('flags, words', [
    (['--scale', '0'], '--scale must be at least 1'),
    (['--temperature', '-1'], '--temperature must be 0 or more'),
    (['--recon_layers', '2', '--layers_figure'], 'give one'),        # was: neither figure written
    (['--layers', '1', '2'], 'add it'),
    (['--layers_figure', '--temperature', '0.5', '1'], 'one --temperature'),
])
def test_sample_flags_that_would_be_ignored_are_refused_before_any_work(flags, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        sample.main(['no-such-checkpoint.pt', *flags, '--out', str(tmp_path / 's.png')])
    assert not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------
# figures

def test_kl_heatmap_colours_the_largest_kl_brightest_and_zero_darkest(tmp_path):
    log = tmp_path / 'log.jsonl'
    kls = [[0.0, 1.0, 2.0], [0.0, 3.0, 4.0 * math.log(2) * 10]]            # nats per image
    log.write_text(''.join(json.dumps(dict(step=50 * (i + 1), kl_per_layer=k)) + '\n' for i, k in enumerate(kls)))
    steps, bits = figures.read_kl_log(log)
    assert steps == [50, 100] and bits.shape == (3, 2) and bits[2, 1] == pytest.approx(40.0)
    image = figures.kl_heatmap(log, tmp_path / 'h.png')
    plot = image.crop((0, 0, int(0.4 * image.width), image.height))      # the cells, not the colour bar
    colours = {c for _, c in plot.getcolors(10**6)}
    assert {figures.colour(b / 40.0) for b in bits.flatten()} <= colours
    assert figures.colour(1.0) in colours and figures.colour(0.0) in colours
    assert Image.open(tmp_path / 'h.png').size == image.size
    shares = figures.kl_heatmap(log, tmp_path / 's.png', share=True)
    assert shares.size == image.size


def test_colour_scale_runs_from_dark_to_light():
    brightness = [sum(figures.colour(t / 10)) for t in range(11)]
    assert brightness == sorted(brightness) and brightness[0] < 150 < 600 < brightness[-1]


def test_layers_figure_has_one_row_per_k_and_the_test_image_first(trained, tmp_path):
    out = tmp_path / 'layers.png'
    sample.main([str(trained['path']), '--layers_figure', '--layers', '0', '2', '4', '--n', '3',
                 '--scale', '1', '--out', str(out)])
    vae, info = trained['vae'], trained['info']
    rows, labels = sample.layers_figure(vae, info, TINY, info['test'][:1], [0, 2, 4], 3, 0.6)
    assert len(rows) == 3 and all(r.shape == (4, 3, 32, 32) for r in rows) and len(labels) == 3
    assert all(torch.equal(r[0], info['test'][0]) for r in rows)            # column 1: the test image
    assert Image.open(out).size[1] > 3 * 34


def kl_log(tmp_path, lines, name='log.jsonl'):
    path = tmp_path / name
    path.write_text(''.join(l + '\n' for l in lines))
    return path


GOOD = '{"step": 1, "kl_per_layer": [1.0, 2.0]}'


@pytest.mark.parametrize('content, words', [
    (['3'], 'line 1: a number, not a record'),                                        # was: TypeError
    (['{"step": 1, "kl_per_layer": []}'], 'line 1: kl_per_layer must be a non-empty list'),   # ZeroDivisionError
    ([GOOD, '{"kl_per_layer": [1.0, 2.0]}'], 'line 2: a record with kl_per_layer needs an integer step'),  # KeyError
    ([GOOD, '{"step": 2, "kl_per_layer": [1.0]}'], 'line 2: 1 layers in kl_per_layer, the records before had 2'),
    (['{', ' "unit": "bits/dim",', ' "nelbo": 5.0', '}'], 'line 1: not JSON'),        # evaluate.py --json output
    (['{"step": 1, "kl_per', GOOD], 'line 1: not JSON'),                              # a cut line, not the last
    ([GOOD, '{"step": 2, "kl_per_layer": ["a", 1.0]}'], 'line 2: kl_per_layer must be a non-empty list of numbers'),
])
def test_a_bad_log_line_is_one_error_naming_the_file_and_line(tmp_path, content, words):
    log = kl_log(tmp_path, content)
    with pytest.raises(ValueError, match=f'{log} {words}'):
        figures.main(['kl_heatmap', str(log), '--out', str(tmp_path / 'h.png')])
    assert not (tmp_path / 'h.png').exists()


def test_a_folder_checkpoint_or_image_as_the_log_is_one_error_naming_it(tmp_path, trained):
    png = tmp_path / 'x.png'
    Image.new('RGB', (4, 4)).save(png)
    for path, words in [(tmp_path, 'is a folder'), (trained['path'], 'is not a text file'), (png, 'is not a text file')]:
        assert one_error_line(script('figures.py', 'kl_heatmap', path, '--out', tmp_path / 'h.png')) \
            .startswith(f'error: {path} {words}')                      # were: IsADirectoryError, 'utf-8' codec ...


def test_a_cut_last_line_is_skipped_with_a_note(tmp_path, capsys):
    log = tmp_path / 'log.jsonl'
    log.write_text(GOOD + '\n' + GOOD.replace('1,', '2,') + '\n{"step": 3, "kl_per_la')   # killed mid-write
    steps, bits = figures.read_kl_log(log)
    assert steps == [1, 2] and bits.shape == (2, 2)
    assert f'{log} line 3 is cut short' in capsys.readouterr().err
    figures.main(['kl_heatmap', str(log), '--out', str(tmp_path / 'h.png')])
    assert Image.open(tmp_path / 'h.png').size[0] >= 700


def test_records_with_a_nan_kl_are_skipped_with_a_note_and_all_nan_is_an_error(tmp_path, capsys):
    log = kl_log(tmp_path, [GOOD, '{"step": 2, "kl_per_layer": [NaN, 1.0]}', '{"step": 3, "kl_per_layer": [1.0, 3.0]}',
                            '{"step": 4, "kl_per_layer": [null, 1.0]}'])   # null: what train.py now writes for NaN
    steps, bits = figures.read_kl_log(log)                              # was: cannot convert float NaN to integer
    assert steps == [1, 3] and np.isfinite(bits).all()
    assert 'skipped 2 record(s) with a NaN or infinite kl_per_layer (steps 2, 4)' in capsys.readouterr().err
    log = kl_log(tmp_path, ['{"step": 2, "kl_per_layer": [NaN, 1.0]}'], 'nan.jsonl')
    with pytest.raises(ValueError, match='no records with finite kl_per_layer'):
        figures.read_kl_log(log)


@pytest.mark.parametrize('vmax', ['inf', 'nan', '0', '-1'])
def test_vmax_must_be_finite_and_positive(tmp_path, vmax):
    log = kl_log(tmp_path, [GOOD])
    with pytest.raises(ValueError, match=f'--vmax must be a finite positive number, not {vmax}'):   # inf: OverflowError
        figures.main(['kl_heatmap', str(log), '--vmax', vmax, '--out', str(tmp_path / 'h.png')])


def test_kl_heatmap_checks_out_before_reading_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, 'read_kl_log', lambda path: pytest.fail('read the log before checking --out'))
    out = tmp_path / 'nodir' / 'x.png'
    with pytest.raises(ValueError, match=f'--out {out}: the folder .* does not exist'):   # was: names x.tmp.png, after the work
        figures.main(['kl_heatmap', str(kl_log(tmp_path, [GOOD])), '--out', str(out)])


def test_a_long_title_is_shortened_not_a_huge_image(tmp_path):
    log = kl_log(tmp_path, [GOOD])
    image = figures.kl_heatmap(log, tmp_path / 'h.png', title='x' * 3000)   # was 33,041 pixels wide
    assert image.width <= figures.MAX_TEXT_WIDTH
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    title = figures.shorten(measure, 'x' * 3000, figures.font(22), 500)
    assert title.endswith('...') and figures.text_size(measure, title, figures.font(22))[0] <= 500
    assert figures.shorten(measure, 'short', figures.font(22), 500) == 'short'


def test_evaluate_and_sample_refuse_to_write_over_their_checkpoint(trained, tmp_path):
    import sample
    ckpt = tmp_path / 'ckpt.png'   # a checkpoint under an image name: sample.py's --out could be it
    ckpt.write_bytes(Path(trained['path']).read_bytes())
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match='is the input'):
        evaluate.main([str(ckpt), '--max_batches', '1', '--kl_png', '', '--json', str(ckpt)])
    with pytest.raises(ValueError, match='is the input'):
        evaluate.main([str(ckpt), '--max_batches', '1', '--kl_png', str(ckpt)])
    with pytest.raises(ValueError, match='is the input'):
        sample.main([str(ckpt), '--n', '1', '--out', str(ckpt)])
    assert ckpt.read_bytes() == before
