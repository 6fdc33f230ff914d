"""
compress.py, the bits-back codec: round trips are bit-exact for every kind of model and image, the
coded size is the model's own -log2 probabilities to within the coder's overhead, and bad input
gets one clear line and no output file. Small models at init with perturbed weights: the codec is
exact whatever the model's quality.
"""
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pytest
import torch
from PIL import Image

import compress
import data
import model
import train
from conftest import DATA, error_line, real_data, run

TINY = dict(width=16, zdim=4, num_mixtures=2, enc_blocks='32x1,32d2,16x1,16d4,4x1,4d4,1x1',
            dec_blocks='1x1,4m1,16m4,32m16')


def make_checkpoint(path, preset, seed=0, **over):
    """A tiny model of a preset at init, every weight perturbed so that every path (the priors'
    zeroed convs too) matters, saved as train.py saves. The official attentive VAE's small preset
    is small already."""
    tiny = TINY if train.PRESETS[preset].get('model') != 'nvae' else {}
    config = {**train.BASE, **train.PRESETS[preset], **tiny, **over, 'preset': preset}
    torch.manual_seed(seed)
    vae = model.build(config)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.03 * torch.randn_like(p))
    torch.save(dict(format=model.CHECKPOINT_FORMAT, config=config, step=0, model=vae.state_dict(),
                    ema=vae.state_dict()), path)
    return path


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpts')
    return dict(cifar=make_checkpoint(d / 'cifar.pt', 'cpu'),
                other=make_checkpoint(d / 'other.pt', 'cpu', seed=1),
                five_bit=make_checkpoint(d / 'five.pt', 'cpu', bits=5),
                mnist=make_checkpoint(d / 'mnist.pt', 'mnist'),
                attentive=make_checkpoint(d / 'attentive.pt', 'attentive_cpu'))


def codec_of(path):
    return compress.make_codec(compress.parse_args([str(path), '--dataset', 'cifar10']))[0]


def save_png(pixels, path, mode=None):
    """uint8 (C, H, W) -> a PNG file."""
    array = pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(array), mode).save(path)
    return path


def read_png(path):
    with Image.open(path) as img:
        return img.mode, np.array(img)


def round_trip(ckpt, files, tmp_path, *flags):
    """compress.py on the command line, then --decompress; -> {name: (mode, pixels)} of the output."""
    hvz, out = tmp_path / 'out.hvz', tmp_path / 'restored'
    p = run('compress.py', ckpt, *files, '-o', hvz, '--threads', '1', *flags)   # small tensors: one thread is fastest
    assert 'images/s' in p.stderr and 'bits/dim so far' in p.stderr     # the progress line
    assert 'payload' in p.stdout and 'initial bits' in p.stdout
    run('compress.py', ckpt, '--decompress', hvz, '-o', out)
    return {str(p.relative_to(out)): read_png(p) for p in sorted(out.rglob('*.png'))}


@pytest.fixture(scope='module')
def cifar_test():
    return data.load_dataset('cifar10', real_data(), download=False)['test']


# -----------------------------------------------------------------------------
# the model's interface: pixel_log_probs is the model's own likelihood, top_down its own walk

@pytest.mark.parametrize('kind', ['cifar', 'five_bit', 'mnist', 'attentive'])
def test_pixel_log_probs_at_the_true_values_sum_to_minus_the_models_nll(ckpts, kind):
    vae = model.model_from_checkpoint(model.load_checkpoint(ckpts[kind])).eval()
    cfg = vae.config
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (3, cfg['image_channels'], 32 - 2 * cfg['pad'], 32 - 2 * cfg['pad']), dtype=torch.uint8)
    binary = cfg['likelihood'] == 'bernoulli'
    if binary:
        pixels = (pixels > 127).to(torch.uint8) * 255
    x, target = model.model_inputs(*data.prepare(pixels, dict(shift=-120.0, scale=1 / 64, binary=binary), cfg['bits'], cfg['pad']), cfg)
    params = vae.top_down(x, lambda l, prior, posterior: posterior[0] + posterior[1] * torch.randn_like(posterior[0]))
    symbols = pixels.long() // 255 if binary else pixels.long() >> (8 - cfg['bits'])
    total = 0
    for c in range(cfg['image_channels']):
        log_p = vae.pixel_log_probs(params, target, c)
        assert log_p.shape == (3, *pixels.shape[2:], 2 if binary else 2 ** cfg['bits'])
        if cfg['model'] != 'nvae':   # the official attentive VAE's tables sum to 1 + p(255) (its 0.99 edge)
            torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(log_p.shape[:-1]), atol=1e-5, rtol=0)
        total = total + log_p.gather(-1, symbols[:, c, ..., None])[..., 0].sum((1, 2))
        later = target.clone()
        later[:, c:] = torch.rand_like(later[:, c:])   # channels >= c are not read
        assert torch.equal(vae.pixel_log_probs(params, later, c), log_p)
    torch.testing.assert_close(-total, vae.nll(params, target), rtol=2e-6, atol=0)


@pytest.mark.parametrize('kind', ['cifar', 'attentive'])
def test_top_down_walks_the_decoder_and_the_prior_pass_is_bit_identical(ckpts, cifar_test, kind):
    """With the posterior's draws picked, top_down gives the decoder's head params; the prior pass
    (x = None) picking the same z gives the very same bits: the decoder can run it."""
    vae = model.model_from_checkpoint(model.load_checkpoint(ckpts[kind])).eval()
    x, _ = compress.Codec(vae, compress.input_norm(dict(config=vae.config)), 'cpu').prepare(cifar_test[:3])
    zs = []
    params = vae.top_down(x, lambda l, prior, posterior: zs.append(posterior[0] + posterior[1] * torch.randn_like(prior[0])) or zs[-1])
    if vae.config['model'] == 'vdvae':   # the very deep VAE's own decoder pass gives the same params
        with torch.no_grad():
            expected = vae.decoder(vae.encoder(x), latents=zs)[0]
        torch.testing.assert_close(params, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(vae.top_down(None, lambda l, prior, posterior: zs[l], n=3), params)


def test_input_normalisation_is_the_runs():
    info = data.load_dataset('cifar10', real_data(), download=False)
    norm = compress.input_norm(dict(config=dict(dataset='cifar10', likelihood='dmol')))
    assert (norm['shift'], norm['scale'], norm['binary']) == (info['shift'], info['scale'], info['binary'])
    stored = compress.input_norm(dict(config=dict(dataset='folder', likelihood='dmol'), dataset=dict(shift=-3.0, scale=0.5)))
    assert stored == dict(shift=-3.0, scale=0.5, binary=False)


# -----------------------------------------------------------------------------
# round trips, bit for bit

def test_cifar10_test_images_round_trip_bit_exact(ckpts, cifar_test, tmp_path):
    images = cifar_test[:6].numpy()
    files = [save_png(p, tmp_path / f'img{i}.png') for i, p in enumerate(images)]
    restored = round_trip(ckpts['cifar'], files, tmp_path, '--batch_size', '2')
    assert sorted(restored) == [f'img{i}.png' for i in range(6)]
    for i, p in enumerate(images):
        mode, pixels = restored[f'img{i}.png']
        assert mode == 'RGB' and np.array_equal(pixels, p.transpose(1, 2, 0))


def test_binary_mnist_round_trip_bit_exact(ckpts, tmp_path):
    test = data.load_dataset('mnist', real_data(), download=False)['test'][:3].numpy()   # 0/255, 28x28
    files = [save_png(p, tmp_path / f'digit{i}.png') for i, p in enumerate(test)]
    restored = round_trip(ckpts['mnist'], files, tmp_path)
    for i, p in enumerate(test):
        assert restored[f'digit{i}.png'][0] == 'L' and np.array_equal(restored[f'digit{i}.png'][1], p[0])


def test_the_attentive_model_round_trips_bit_exact(ckpts, cifar_test):
    images = cifar_test[6:9].numpy()
    codec = codec_of(ckpts['attentive'])
    header, words, _ = compress.compress(codec, list(images), ['RGB'] * 3, ['a', 'b', 'c'], batch=2)
    decoded = compress.decompress(codec, header, words, 'memory')
    assert all(np.array_equal(p, q) for (_, p, _), q in zip(decoded, images))


def test_a_50x37_image_is_tiled_padded_and_restored_exactly(ckpts, cifar_test, tmp_path):
    rng = np.random.RandomState(0)
    odd = rng.randint(0, 256, (3, 37, 50), dtype=np.uint8)          # 2 x 2 tiles of 32, three of them padded
    odd[:, :32, :32] = cifar_test[0].numpy()
    tiles, mask = compress.to_tiles(odd, 32)
    assert tiles.shape == (4, 3, 32, 32) and mask.sum() == 37 * 50
    assert np.array_equal(compress.from_tiles(tiles, 37, 50), odd)
    assert np.array_equal(tiles[3, :, 5:, 18:], np.broadcast_to(odd[:, 36:, 49:], (3, 27, 14)))   # the corner repeated
    restored = round_trip(ckpts['cifar'], [save_png(odd, tmp_path / 'odd.png')], tmp_path)
    assert restored['odd.png'][0] == 'RGB' and np.array_equal(restored['odd.png'][1], odd.transpose(1, 2, 0))
    # a padded model (MNIST: 28x28 images padded to 32) tiles by its unpadded size
    codec = codec_of(ckpts['mnist'])
    binary = (rng.rand(1, 37, 50) > 0.7).astype(np.uint8) * 255
    header, words, _ = compress.compress(codec, [binary], ['L'], ['b'])
    assert header['tile'] == 28 and sum(header['batches']) == 4
    assert np.array_equal(compress.decompress(codec, header, words, 'memory')[0][1], binary)


def test_greyscale_and_palette_pngs_round_trip_in_their_own_pixels(ckpts, cifar_test, tmp_path):
    grey = cifar_test[1].numpy().mean(0).astype(np.uint8)[None]                    # (1, 32, 32)
    g = save_png(grey, tmp_path / 'grey.png', 'L')
    palette = Image.fromarray(cifar_test[2].numpy().transpose(1, 2, 0)).quantize(16)
    palette.save(tmp_path / 'palette.png')
    restored = round_trip(ckpts['cifar'], [g, tmp_path / 'palette.png'], tmp_path)
    assert restored['grey.png'][0] == 'L' and np.array_equal(restored['grey.png'][1], grey[0])
    assert np.array_equal(restored['palette.png'][1], np.array(palette.convert('RGB')))


def test_folders_keep_their_relative_names_and_five_bit_models_are_lossless(ckpts, cifar_test, tmp_path):
    folder = tmp_path / 'photos'
    (folder / 'sub').mkdir(parents=True)
    save_png(cifar_test[3].numpy(), folder / 'a.png')
    save_png(cifar_test[4].numpy(), folder / 'sub' / 'b.png')
    restored = round_trip(ckpts['five_bit'], [folder], tmp_path)
    assert sorted(restored) == ['a.png', 'sub/b.png']
    assert np.array_equal(restored['sub/b.png'][1], cifar_test[4].numpy().transpose(1, 2, 0))


# -----------------------------------------------------------------------------
# the coded size is the model's -log2 probability of the discretised symbols

def test_coded_size_of_a_batch_is_the_models_minus_log2_probabilities(ckpts, cifar_test, monkeypatch):
    """Net stack growth of one batch = sum over pixels of -log2 P(x|z) + sum over latents of
    -log2 P(z) + log2 Q(z|x), all on the grid, within a few bytes (the ANS and 24-bit
    quantisation overhead)."""
    codec = codec_of(ckpts['cifar'])
    codec.vae.eval()
    posteriors, ks = [], []
    grid_posterior, on_grid = compress.grid_posterior, compress.on_grid
    monkeypatch.setattr(compress, 'grid_posterior', lambda *a: posteriors.append(grid_posterior(*a)) or posteriors[-1])
    monkeypatch.setattr(compress, 'on_grid', lambda prior, k: ks.append(k) or on_grid(prior, k))
    tiles = cifar_test[:4]
    coder = compress.constriction.stream.stack.AnsCoder(compress.seed_words(200_000))
    before = coder.num_valid_bits()
    codec.encode(coder, tiles, np.ones((4, 32, 32), bool))
    coded = coder.num_valid_bits() - before

    def gauss_bits(k, mean, std, r):   # -log2 of the bin's mass on [-r, r] (the coder gives each bin >= 2^-24)
        k, mean, std = (torch.as_tensor(np.asarray(a, np.float64)) for a in (k, mean, std))
        def mass(a, b):                 # in the upper tail the survival function, without cancellation
            a, b = (a - mean) / std, (b - mean) / std
            return torch.where(a > 0, torch.special.ndtr(-a) - torch.special.ndtr(-b), torch.special.ndtr(b) - torch.special.ndtr(a))
        p = mass(k - 0.5, k + 0.5) / mass(torch.tensor(-r - 0.5), torch.tensor(r + 0.5))
        return -torch.log2(p.clamp(min=2.0 ** -24)).sum().item()

    latent = sum(gauss_bits(k, 0.0, 1 / compress.GRID_STEP, compress.GRID_RANGE) - gauss_bits(k - c, m, s, compress.WINDOW)
                 for k, (c, m, s) in zip(ks, posteriors))
    x_in, target = codec.prepare(tiles)
    params = codec.vae.top_down(x_in, lambda l, prior, posterior: on_grid(prior, ks[l]))
    log_p = [codec.vae.pixel_log_probs(params, target, c).gather(-1, tiles[:, c, ..., None].long()) for c in range(3)]
    pixel = sum(-torch.log2(lp.double().exp().clamp(min=2.0 ** -24)).sum().item() for lp in log_p)
    assert abs(coded - (pixel + latent)) < 8 * 8, (coded, pixel, latent)   # 8 bytes
    assert latent > 0 and pixel > 4 * 3072


def test_the_initial_bits_are_left_out_of_the_file_and_reported_apart(ckpts, cifar_test):
    """The seed words the coder never reached are not stored; what is stored is the borrowed seed
    (the initial bits) plus the net payload."""
    codec = codec_of(ckpts['cifar'])
    header, words, stats = compress.compress(codec, list(cifar_test[:5].numpy()), ['RGB'] * 5, list('abcde'), batch=4)
    assert header['batches'][0] == 1 and sum(header['batches']) == 5
    assert stats['untouched'] > 0 and 0 < stats['initial_bits'] < 32 * stats['seed_words']
    assert 32 * len(words) == stats['initial_bits'] + stats['payload_bits']


# -----------------------------------------------------------------------------
# bad input: one clear line, no output file

@pytest.fixture(scope='module')
def written(ckpts, cifar_test, tmp_path_factory):
    d = tmp_path_factory.mktemp('written')
    files = [save_png(p, d / f'{i}.png') for i, p in enumerate(cifar_test[:2].numpy())]
    run('compress.py', ckpts['cifar'], '-o', d / 'good.hvz', '--threads', '1', *files)   # images after the options too
    return d / 'good.hvz'


def decompress_fails(ckpt, hvz, tmp_path):
    out = tmp_path / 'restored'
    line = error_line(run('compress.py', ckpt, '--decompress', hvz, '-o', out, check=False))
    assert not out.exists() or not any(out.iterdir())
    return line


def damaged(written, tmp_path, edit):
    raw = bytearray(written.read_bytes())
    path = tmp_path / 'bad.hvz'
    path.write_bytes(bytes(edit(raw)))
    return path


def test_a_truncated_file_is_refused(ckpts, written, tmp_path):
    assert 'truncated' in decompress_fails(ckpts['cifar'], damaged(written, tmp_path, lambda r: r[:len(r) // 2]), tmp_path)
    assert 'truncated' in decompress_fails(ckpts['cifar'], damaged(written, tmp_path, lambda r: r[:-100]), tmp_path)


def test_a_flipped_byte_is_refused(ckpts, written, tmp_path):
    def flip(raw):
        raw[len(raw) - 100] ^= 0x10
        return raw
    assert 'corrupt' in decompress_fails(ckpts['cifar'], damaged(written, tmp_path, flip), tmp_path)


def test_a_file_of_another_format_or_version_is_refused(ckpts, written, cifar_test, tmp_path):
    png = tmp_path / 'image.hvz'
    png.write_bytes(save_png(cifar_test[0].numpy(), tmp_path / 'image.png').read_bytes())
    assert 'not an hvae compressed file' in decompress_fails(ckpts['cifar'], png, tmp_path)

    def version_2(raw):
        raw[len(compress.MAGIC):len(compress.MAGIC) + 4] = struct.pack('<I', 2)
        return raw
    assert 'format version 2' in decompress_fails(ckpts['cifar'], damaged(written, tmp_path, version_2), tmp_path)


def test_the_wrong_checkpoint_is_refused(ckpts, written, tmp_path):
    assert 'another model' in decompress_fails(ckpts['other'], written, tmp_path)


def test_another_torch_device_or_grid_is_refused_by_the_header(ckpts, cifar_test):
    codec = codec_of(ckpts['cifar'])
    header, words, _ = compress.compress(codec, [cifar_test[0].numpy()], ['RGB'], ['a'])
    for key, value, words_ in [('torch', '1.0.0', 'torch 1.0.0'), ('device', 'cuda (H100)', 'device cuda'),
                               ('grid', dict(step=0.25, range=128, window=32), 'latent grid')]:
        with pytest.raises(ValueError, match=words_):
            compress.decompress(codec, {**header, key: value}, words, 'f.hvz')


def test_a_model_that_computes_differently_gives_an_error_never_a_wrong_image(ckpts, cifar_test):
    """Weights off by a rounding error, the fingerprint forged to match: the decoder's
    distributions differ from the encoder's, and the checks (the stack must end at its seed, the
    pixels' checksum) turn that into an error."""
    codec = codec_of(ckpts['cifar'])
    images = list(cifar_test[:3].numpy())
    header, words, _ = compress.compress(codec, images, ['RGB'] * 3, list('abc'))
    with torch.no_grad():
        codec.vae.decoder.head.bias.add_(1e-3)
    with pytest.raises(ValueError, match='does not decode|do not match|does not end'):
        compress.decompress(codec, header, words, 'f.hvz')


def test_compress_refuses_an_output_that_is_an_input_a_folder_or_an_existing_file(ckpts, cifar_test, tmp_path, monkeypatch):
    src = save_png(cifar_test[0].numpy(), tmp_path / 'self.png')
    image = src.read_bytes()
    old = tmp_path / 'old.hvz'
    old.write_bytes(b'old')
    line = error_line(run('compress.py', ckpts['cifar'], src, '-o', src, check=False))
    assert line == f'error: -o {src} is one of the inputs; choose another -o'   # was: the image replaced by the .hvz
    monkeypatch.setattr(compress, 'make_codec', lambda *a: pytest.fail('loaded the model before checking -o'))
    for out, words in [(tmp_path, 'is a folder; -o names the .hvz file'),
                       (old, f'{old} already exists: remove it or choose another -o')]:
        with pytest.raises(ValueError, match=words):
            compress.main([str(ckpts['cifar']), str(src), '-o', str(out)])
        with pytest.raises(ValueError, match=words):   # the measurement's -o too
            compress.main([str(ckpts['cifar']), '--dataset', 'cifar10', '-o', str(out)])
    assert src.read_bytes() == image and old.read_bytes() == b'old'
    assert sorted(tmp_path.iterdir()) == [old, src]


def test_decompress_refuses_to_overwrite_an_existing_png(ckpts, written, tmp_path):
    out = tmp_path / 'restored'
    out.mkdir()
    (out / '1.png').write_bytes(b'keep')
    line = error_line(run('compress.py', ckpts['cifar'], '--decompress', written, '-o', out, check=False))
    assert line == f"error: {out / '1.png'} already exists: remove it or choose another -o"
    assert (out / '1.png').read_bytes() == b'keep' and list(out.iterdir()) == [out / '1.png']   # 0.png not written either
    with pytest.raises(ValueError, match='is a file; with --decompress -o names the folder'):
        compress.main([str(ckpts['cifar']), '--decompress', str(written), '-o', str(written)])


def test_images_the_model_cannot_take_are_refused_before_any_output(ckpts, cifar_test, tmp_path):
    colour = save_png(cifar_test[0].numpy(), tmp_path / 'colour.png')
    grey = save_png(np.full((1, 28, 28), 128, np.uint8), tmp_path / 'grey.png', 'L')
    rgba = np.concatenate([cifar_test[0].numpy(), np.full((1, 32, 32), 100, np.uint8)])
    clear = save_png(rgba, tmp_path / 'clear.png', 'RGBA')
    deep = tmp_path / 'deep.png'
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(deep)
    (tmp_path / 'not_an_image.png').write_text('hello')
    hvz = tmp_path / 'out.hvz'
    for ckpt, image, words in [(ckpts['mnist'], colour, 'colour image'), (ckpts['mnist'], grey, 'black-and-white'),
                               (ckpts['cifar'], clear, 'transparent'), (ckpts['cifar'], deep, 'not supported'),
                               (ckpts['cifar'], tmp_path / 'not_an_image.png', 'not a readable image')]:
        with pytest.raises(ValueError, match=words) as e:
            compress.main([str(ckpt), str(image), '-o', str(hvz)])
        assert '\n' not in str(e.value) and not hvz.exists()
    assert 'colour image' in error_line(run('compress.py', ckpts['mnist'], colour, '-o', hvz, check=False))
    assert not hvz.exists() and not list(tmp_path.glob('*.tmp'))


# -----------------------------------------------------------------------------
# the official weights as an hvae checkpoint

REFERENCE = DATA / 'reference' / 'vdvae_reference_small.pt'
REFERENCE_FLAGS = ['--preset', 'cifar10', '--width', '32', '--zdim', '4', '--num_mixtures', '3',
                   '--enc_blocks', '32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1',
                   '--dec_blocks', '1x1,4m1,4x1,8m4,8x1,16m8,16x1,32m16,32x1']


def test_converted_official_weights_reproduce_the_official_model_and_compress(tmp_path):
    if not REFERENCE.exists():
        pytest.fail(f'reference data not found: {REFERENCE}')
    ref = torch.load(REFERENCE, weights_only=True)
    torch.save(ref['state_dict'], tmp_path / 'official-model-ema.th')
    run('convert.py', tmp_path / 'official-model-ema.th', *REFERENCE_FLAGS, '--data_root', real_data(), '-o', tmp_path / 'vdvae.pt')
    ckpt = model.load_checkpoint(tmp_path / 'vdvae.pt')
    for weights in ('ema', 'model'):
        vae = model.model_from_checkpoint(ckpt, weights)
        x = ref['x_in_nhwc'].permute(0, 3, 1, 2)
        with torch.no_grad():
            head = vae.decoder(vae.encoder(x), ref['eps_posterior'])[0]
        torch.testing.assert_close(head, ref['head_nhwc'].permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)
    out = run('evaluate.py', tmp_path / 'vdvae.pt', '--max_batches', '1', '--batch_size', '4', '--kl_png', '').stdout
    assert 'negative ELBO' in out
    images = ref['images_uint8_nhwc'].permute(0, 3, 1, 2).numpy()
    codec = codec_of(tmp_path / 'vdvae.pt')
    header, words, _ = compress.compress(codec, list(images), ['RGB'] * 4, list('abcd'), batch=4)
    assert all(np.array_equal(p, q) for (_, p, _), q in zip(compress.decompress(codec, header, words, 'memory'), images))


def test_convert_refuses_weights_that_do_not_fit_the_preset(tmp_path):
    ref = torch.load(REFERENCE, weights_only=True)
    torch.save(ref['state_dict'], tmp_path / 'official.th')
    p = run('convert.py', tmp_path / 'official.th', '--preset', 'cifar10', '-o', tmp_path / 'x.pt', check=False)
    assert 'does not fit the cifar10 preset' in error_line(p)
    assert not (tmp_path / 'x.pt').exists()


def test_convert_refuses_nan_weights_and_an_output_it_would_replace_before_the_work(tmp_path):
    ref = torch.load(REFERENCE, weights_only=True)
    source = tmp_path / 'official.th'
    torch.save(ref['state_dict'], source)
    before = source.read_bytes()
    for out, words in [(source, 'already exists'), (tmp_path, 'is a folder'), (tmp_path / 'no' / 'x.pt', 'does not exist')]:
        assert words in error_line(run('convert.py', source, *REFERENCE_FLAGS, '-o', out, check=False))
    assert source.read_bytes() == before and sorted(tmp_path.iterdir()) == [source]
    state = dict(ref['state_dict'])
    state['encoder.in_conv.weight'] = state['encoder.in_conv.weight'] * float('nan')
    torch.save(state, tmp_path / 'nan.th')
    line = error_line(run('convert.py', tmp_path / 'nan.th', *REFERENCE_FLAGS, '-o', tmp_path / 'x.pt', check=False))
    assert 'hold NaN or inf' in line and 'encoder.in_conv.weight' in line and not (tmp_path / 'x.pt').exists()
    # a converted file holds weights, not a training state: --resume says so in one line
    run('convert.py', source, *REFERENCE_FLAGS, '-o', tmp_path / 'x.pt')
    (tmp_path / 'run').mkdir()
    (tmp_path / 'x.pt').rename(tmp_path / 'run' / 'ckpt-00000000.pt')
    p = run('train.py', *REFERENCE_FLAGS, '--data_root', real_data(), '--no_download', '--out_dir', tmp_path / 'run',
            '--resume', check=False)
    assert 'holds weights only' in error_line(p) and '--init_from' in error_line(p)


def test_convert_refuses_run_flags_and_a_dataset_the_model_cannot_read_before_the_work(tmp_path):
    import convert
    source = tmp_path / 'official.th'
    torch.save(torch.load(REFERENCE, weights_only=True)['state_dict'], source)
    for flags, words in [(['--lr', '1e-3'], '--lr steers a run'), (['--max_steps', '5'], '--max_steps steers a run'),
                         (['--resume'], '--resume steers a run'),
                         (['--dataset', 'mnist'], 'mnist images are 1x28x28 binary, the model takes 3x32x32')]:
        with pytest.raises(ValueError, match=words):
            convert.main([str(source), *REFERENCE_FLAGS, *flags, '-o', str(tmp_path / 'x.pt')])
    assert sorted(tmp_path.iterdir()) == [source]
    convert.main([str(source), *REFERENCE_FLAGS, '--data_root', 'elsewhere', '--no_download', '-o', str(tmp_path / 'x.pt')])
    config = torch.load(tmp_path / 'x.pt', weights_only=True)['config']
    assert config['data_root'] == 'elsewhere' and config['download'] is False and config['width'] == 32
