"""
Specification of model.py: layout strings, parameter counts, initialisation, top-down causality,
units of the loss, sampling, and agreement with the official very deep VAE number for number.
Facts: ../shared/DESIGN.md sections 1.1 to 1.8 and ../shared/data/reference/README.md.
"""
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import layers
import model
import train

DATA = Path(os.environ.get('HVAE_DATA', Path(__file__).resolve().parents[1].parent / 'shared' / 'data'))

# a small random model: 6 encoder blocks, 5 stochastic layers (different N for the two towers)
SMALL = dict(width=16, zdim=4, enc_blocks='8x2,8d2,4x1,4d4,1x1', dec_blocks='1x1,4m1,4x1,8m4,8x1',
             image_size=8, num_mixtures=2)

# the reference presets (DESIGN.md 1.1 and 1.8), zdim 16, bottleneck 0.25, 10 mixtures by default
PRESETS = {
    'cifar10': dict(width=384, zdim=16, image_size=32,
                    enc_blocks='32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3',
                    dec_blocks='1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21'),
    'imagenet32': dict(width=512, zdim=16, image_size=32,
                       enc_blocks='32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6',
                       dec_blocks='1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40'),
    'imagenet64': dict(width=512, zdim=16, image_size=64,
                       enc_blocks='64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5',
                       dec_blocks='1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12'),
    'ffhq256': dict(width=512, zdim=16, image_size=256, bits=5,
                    enc_blocks='256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4',
                    dec_blocks='1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128'),
}


def perturb(vae, seed=0, std=0.05):
    """Add N(0, std^2) to every parameter, as the reference data does, so that every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return vae


def small_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb(model.VAE({**SMALL, **overrides}), seed)


def batch(n, size=8, channels=3, seed=0, bits=8):
    """Encoder input and a likelihood target on the 2^bits grid, (n, C, size, size)."""
    g = torch.Generator().manual_seed(seed)
    levels = 2 ** bits - 1
    target = torch.randint(0, levels + 1, (n, channels, size, size), generator=g) * 2 / levels - 1
    return target * 1.7, target


def layer_noise(vae, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, vae.config['zdim'], l.res, l.res, generator=g) for l in vae.decoder.layers]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def meta_vae(config):
    with torch.device('meta'):
        return model.VAE(config)


# -----------------------------------------------------------------------------
# layout strings

def test_parse_layout_expands_repeats_and_reads_pools_and_mixins():
    assert model.parse_layout('32x2,32d2,16', 'enc') == [(32, None), (32, None), (32, 2), (16, None)]
    assert model.parse_layout('1x1,4m1,4x2,8m4', 'dec') == [(1, None), (4, 1), (4, None), (4, None), (8, 4)]
    assert len(model.parse_layout(PRESETS['cifar10']['enc_blocks'], 'enc')) == 33
    assert len(model.parse_layout(PRESETS['cifar10']['dec_blocks'], 'dec')) == 43


@pytest.mark.parametrize('kind, layout, bad', [
    ('enc', '32y2', '32y2'), ('enc', '', ''), ('enc', 'x3', 'x3'), ('dec', '4m', '4m'),
    ('enc', '32x2,,16', ''), ('enc', '32x0', '32x0'), ('enc', '0', '0'), ('enc', '8,4m1', '4m1'),
    ('dec', '1,8d2', '8d2'), ('dec', '1,4m1,4x', '4x')])
def test_parse_layout_rejects_malformed_tokens_naming_them(kind, layout, bad):
    with pytest.raises(ValueError, match=re.escape(f"bad token '{bad}'")):
        model.parse_layout(layout, kind)


@pytest.mark.parametrize('enc, dec, message', [
    ('8x1,8d2,4x1,4d4,1x1', '1x1,4m1,4x1', 'ends at 4x4, not the image size 8'),
    ('8x1,8d2,4x1,4d4,1x1', '1x1,2m1,8m2', 'no encoder activation at 2x2'),
    ('8x1,4x1', '1x1,8', 'block at 4 where the activation is 8x8'),
    ('8d3,1x1', '8', '8 is not divisible by 3'),
    ('8x1,8d2,4x1,4d4,1x1', '1x1,8m4,8x1', '8m4 mixes in a resolution not decoded before'),
])
def test_inconsistent_layouts_are_rejected_with_the_reason(enc, dec, message):
    config = {**SMALL, 'enc_blocks': enc, 'dec_blocks': dec}
    with pytest.raises(ValueError, match=re.escape(message)):
        model.check_layouts({**model.DEFAULTS, **config})
    with pytest.raises(ValueError, match=re.escape(message)):
        model.VAE(config)


def test_vae_rejects_a_config_without_required_keys_or_with_an_unknown_likelihood():
    with pytest.raises(ValueError, match='width'):
        model.VAE({k: v for k, v in SMALL.items() if k != 'width'})
    with pytest.raises(ValueError, match='gaussian'):
        model.VAE({**SMALL, 'likelihood': 'gaussian'})


def per_resolution(layout):
    blocks = model.parse_layout(layout, 'dec')
    resolutions = list(dict.fromkeys(r for r, _ in blocks))
    return resolutions, [sum(q == r for q, _ in blocks) for r in resolutions]


def test_scale_depth_43_reproduces_the_cifar10_layout():
    dec = PRESETS['cifar10']['dec_blocks']
    scaled = model.scale_depth(dec, 43)
    assert per_resolution(scaled) == ([1, 4, 8, 16, 32], [1, 3, 6, 11, 22])
    assert model.parse_layout(scaled, 'dec') == model.parse_layout(dec, 'dec')


def test_scale_depth_at_the_number_of_resolutions_keeps_one_layer_each_with_its_mixin():
    scaled = model.scale_depth(PRESETS['cifar10']['dec_blocks'], 5)
    assert model.parse_layout(scaled, 'dec') == [(1, None), (4, 1), (8, 4), (16, 8), (32, 16)]


def test_scale_depth_gives_exactly_L_layers_in_the_layout_proportions():
    cifar = PRESETS['cifar10']
    extra = [0, 2, 5, 10, 21]                      # layers beyond the first at each resolution
    for L in range(5, 61):
        scaled = model.scale_depth(cifar['dec_blocks'], L)
        resolutions, counts = per_resolution(scaled)
        assert sum(counts) == L and resolutions == [1, 4, 8, 16, 32], (L, scaled)
        for c, e in zip(counts, extra):             # largest remainder: within one of the exact share
            assert abs((c - 1) - (L - 5) * e / 38) < 1, (L, scaled)
        assert [m for _, m in model.parse_layout(scaled, 'dec') if m] == [1, 4, 8, 16]
        model.check_layouts({**model.DEFAULTS, **cifar, 'dec_blocks': scaled})


def test_scale_depth_spreads_evenly_when_the_layout_has_one_layer_per_resolution():
    assert per_resolution(model.scale_depth('1,4m1,8m4', 9)) == ([1, 4, 8], [3, 3, 3])


def test_scale_depth_below_the_number_of_resolutions_raises():
    with pytest.raises(ValueError, match='below the 5 resolutions'):
        model.scale_depth(PRESETS['cifar10']['dec_blocks'], 4)


# -----------------------------------------------------------------------------
# parameter counts

def closed_form_count(config):
    """Parameters from the architecture of DESIGN.md 1.2 to 1.4."""
    c = {**model.DEFAULTS, **config}
    w, z = c['width'], c['zdim']
    named = dict(map(int, item.split(':')) for item in c['custom_width'].split(',') if item)
    W = lambda r: named.get(r, w)

    def block(c_in, c_out, res):
        k, m = 3 if res > 2 else 1, int(W(res) * c['bottleneck_multiple'])
        return c_in * m + m + 2 * (m * m * k * k + m) + m * c_out + c_out

    enc = 9 * c['image_channels'] * w + w + sum(block(W(r), W(r), r) for r, _ in model.parse_layout(c['enc_blocks'], 'enc'))
    dec_layers = model.parse_layout(c['dec_blocks'], 'dec')
    dec = sum(block(2 * W(r), 2 * z, r) + block(W(r), 2 * z + W(r), r) + z * W(r) + W(r) + block(W(r), W(r), r)
              for r, _ in dec_layers)
    state = sum(W(r) * r * r for r in {r for r, _ in dec_layers} if r <= c['no_bias_above'])
    out = 10 * c['num_mixtures'] if c['likelihood'] == 'dmol' else c['image_channels']
    return enc + dec + state + 2 * w + w * out + out


@pytest.mark.parametrize('name, expected', [('cifar10', 39_145_700), ('imagenet32', 119_280_868),
                                            ('imagenet64', 125_005_860), ('ffhq256', 114_874_852)])
def test_preset_parameter_counts_are_exact(name, expected):
    vae = meta_vae(PRESETS[name])
    assert n_params(vae) == expected
    assert closed_form_count(PRESETS[name]) == expected


def test_small_and_bernoulli_parameter_counts_have_the_closed_form():
    for config in (SMALL, {**SMALL, 'likelihood': 'bernoulli', 'image_channels': 1, 'no_bias_above': 4}):
        assert n_params(meta_vae(config)) == closed_form_count(config)


def test_cifar10_parameter_split_matches_the_reference():
    vae = meta_vae(PRESETS['cifar10'])
    part = lambda pattern: sum(p.numel() for n, p in vae.named_parameters() if re.search(pattern, n))
    encoder = part(r'^encoder\.')
    assert round(encoder / 1e6, 2) == 7.50
    split = {r'\.posterior\.': 10.30, r'\.prior\.': 10.32, r'\.resblock\.': 10.18, r'\.z_proj\.': 0.28,
             r'^decoder\.state\.': 0.52, r'^decoder\.head\.': 0.04}
    for pattern, millions in split.items():
        assert round(part(pattern) / 1e6, 2) == millions, pattern
    gain_bias = part(r'^decoder\.(gain|bias)$')
    assert gain_bias == 2 * 384
    assert encoder + sum(part(p) for p in split) + gain_bias == n_params(vae) == 39_145_700


def test_state_biases_exist_only_up_to_no_bias_above():
    assert sorted(meta_vae(PRESETS['ffhq256']).decoder.state, key=int) == ['1', '4', '8', '16', '32', '64']
    vae = model.VAE({**SMALL, 'no_bias_above': 4})
    assert sorted(vae.decoder.state, key=int) == ['1', '4']
    assert [tuple(s.shape) for s in vae.decoder.state.values()] == [(1, 16, 1, 1), (1, 16, 4, 4)]
    b = torch.randn(2, 16, 4, 4)
    x = vae.decoder.layer_input({4: b}, vae.decoder.layers[3], 2, b)     # 8m4 with no state at 8: zeros + up(b)
    assert torch.equal(x, b.repeat_interleave(2, -1).repeat_interleave(2, -2))


# -----------------------------------------------------------------------------
# initialisation

def test_every_prior_starts_at_standard_normal_for_any_input():
    torch.manual_seed(0)
    vae = model.VAE(SMALL)
    for layer in vae.decoder.layers:
        assert torch.equal(layer.prior.conv4.weight, torch.zeros_like(layer.prior.conv4.weight))
        assert torch.equal(layer.prior.conv4.bias, torch.zeros_like(layer.prior.conv4.bias))
        for scale in (0.1, 1.0, 30.0):
            # the prior block emits (mean, log-sigma, state update) = (0, 0, 0) whatever it reads
            x = torch.randn(3, 16, layer.res, layer.res) * scale
            assert torch.equal(layer.prior(x), torch.zeros(3, 2 * 4 + 16, layer.res, layer.res))
    # so sampling draws every z_l as the noise itself: z = 0 + 1 * temperature * eps
    eps = layer_noise(vae, 3, seed=4)
    with torch.no_grad():
        priors, fed = record(vae, lambda: vae.decoder.generate(3, 0.6, eps=eps))
    for p, z, e in zip(priors, fed, eps):
        assert torch.equal(p, torch.zeros_like(p))
        torch.testing.assert_close(z, 0.6 * e, rtol=0, atol=0)


def test_conv_biases_and_states_start_at_zero_and_gain_at_one():
    torch.manual_seed(0)
    vae = model.VAE(SMALL)
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 6 * 4 + 5 * (4 + 4 + 1 + 4) + 1
    for c in convs:
        assert torch.equal(c.bias, torch.zeros_like(c.bias))
    for s in vae.decoder.state.values():
        assert torch.equal(s, torch.zeros_like(s))
    assert torch.equal(vae.decoder.gain, torch.ones(1, 16, 1, 1))
    assert torch.equal(vae.decoder.bias, torch.zeros(1, 16, 1, 1))


class MathWithoutScaling:
    """Stands in for model.math while building a twin whose residual scales sqrt(1/N) are all 1."""

    def __getattr__(self, name):
        return getattr(math, name)

    @staticmethod
    def sqrt(v):
        return 1.0


def test_residual_towers_scale_their_last_conv_by_sqrt_1_over_N(monkeypatch):
    torch.manual_seed(0)
    vae = model.VAE(SMALL)
    with monkeypatch.context() as m:
        m.setattr(model, 'math', MathWithoutScaling())
        torch.manual_seed(0)
        twin = model.VAE(SMALL)                            # the same draws, unscaled
    s_enc, s_dec = math.sqrt(1 / 6), math.sqrt(1 / 5)      # 6 encoder blocks, 5 decoder layers
    for b, t in zip(vae.encoder.blocks, twin.encoder.blocks):
        assert torch.equal(b.conv4.weight, t.conv4.weight * s_enc)
        for name in ('conv1', 'conv2', 'conv3'):
            assert torch.equal(getattr(b, name).weight, getattr(t, name).weight)
    for l, t in zip(vae.decoder.layers, twin.decoder.layers):
        assert torch.equal(l.resblock.conv4.weight, t.resblock.conv4.weight * s_dec)
        assert torch.equal(l.z_proj.weight, t.z_proj.weight * s_dec)
        assert torch.equal(l.posterior.conv4.weight, t.posterior.conv4.weight)     # not a residual tower
        assert torch.equal(l.resblock.conv1.weight, t.resblock.conv1.weight)
    assert torch.equal(vae.encoder.stem.weight, twin.encoder.stem.weight)
    assert torch.equal(vae.decoder.head.weight, twin.decoder.head.weight)


# -----------------------------------------------------------------------------
# encoder and decoder wiring

def test_each_posterior_reads_the_last_encoder_activation_at_its_resolution():
    vae = small_vae()
    outputs, reads = [], {}
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.detach())) for b in vae.encoder.blocks]
    hooks += [l.posterior.register_forward_pre_hook(lambda m, i, k=k: reads.__setitem__(k, i[0].detach()))
              for k, l in enumerate(vae.decoder.layers)]
    x, target = batch(2)
    with torch.no_grad():
        vae(x, target)
    for h in hooks:
        h.remove()
    # encoder blocks 8, 8, 8d2 -> 4, 4, 4d4 -> 1, 1: the last at 8, 4 and 1 are blocks 1, 3 and 5
    last = {8: outputs[1], 4: outputs[3], 1: outputs[5]}
    assert [tuple(o.shape[1:]) for o in outputs] == [(16, 8, 8), (16, 8, 8), (16, 4, 4), (16, 4, 4), (16, 1, 1), (16, 1, 1)]
    for k, layer in enumerate(vae.decoder.layers):    # posterior input: gelu(cat[state, activation]), activated
        assert reads[k].shape == (2, 32, layer.res, layer.res)
        assert torch.equal(reads[k][:, 16:], F.gelu(last[layer.res])), k


def test_shared_gelu_gives_the_blocks_own_numbers():
    """The layer activates the state once for prior and posterior, and the decoder each encoder
    activation once per resolution: the same as each block applying gelu to its own input."""
    torch.manual_seed(0)
    vae = small_vae()
    layer = vae.decoder.layers[3]
    x, a = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    for p in layer.prior.parameters():
        nn.init.normal_(p)   # the prior's last conv starts at zero
    mean_p, logsig_p, x_new = layer.prior_params(x, F.gelu(x))
    plain = layer.prior(x)
    assert torch.allclose(torch.cat([mean_p, logsig_p, x_new - x], 1), plain, rtol=1e-6, atol=1e-6)
    mean_q, logsig_q = layer.posterior_params(F.gelu(x), vae.decoder.activated({8: a, 4: a[..., :4, :4], 1: a[..., :1, :1]}))
    assert torch.allclose(torch.cat([mean_q, logsig_q], 1), layer.posterior(torch.cat([x, a], 1)), rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError):
        layer.posterior_params(F.gelu(x), {4: a})   # no activation at the layer's resolution


def test_mixin_layers_add_the_nearest_upsampled_coarser_state():
    vae = small_vae()
    dec = vae.decoder
    a, b, c = torch.randn(2, 16, 1, 1), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 8, 8)
    assert torch.equal(dec.layer_input({1: a, 4: b}, dec.layers[1], 2, a), b + a)             # 4m1
    up = b.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.equal(dec.layer_input({1: a, 4: b, 8: c}, dec.layers[3], 2, a), c + up)      # 8m4
    assert torch.equal(dec.layer_input({1: a, 4: b, 8: c}, dec.layers[4], 2, a), c)          # 8


def test_decoder_output_is_the_head_on_gain_times_state_plus_bias():
    dec = small_vae().decoder
    x = torch.randn(2, 16, 8, 8)
    expected = F.conv2d(x * dec.gain + dec.bias, dec.head.weight, dec.head.bias)
    torch.testing.assert_close(dec.output(x), expected, rtol=0, atol=1e-6)
    assert dec.output(x).shape == (2, 20, 8, 8)


# -----------------------------------------------------------------------------
# top-down causality and sampling

def record(vae, fn):
    """Run fn with forward hooks on every decoder layer; -> (the output of each layer's prior block,
    the latent fed into each layer's z_proj), layer by layer."""
    L = len(vae.decoder.layers)
    priors, zs = [None] * L, [None] * L
    hooks = []
    for k, l in enumerate(vae.decoder.layers):
        hooks.append(l.prior.register_forward_hook(lambda m, i, o, k=k: priors.__setitem__(k, o.detach().clone())))
        hooks.append(l.z_proj.register_forward_hook(lambda m, i, o, k=k: zs.__setitem__(k, i[0].detach().clone())))
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return priors, zs


@pytest.mark.parametrize('via', ['latents', 'eps'])
def test_changing_latent_l_leaves_priors_up_to_l_unchanged_and_changes_the_later_ones(via):
    vae = small_vae()
    x, _ = batch(2)
    eps = layer_noise(vae, 2)
    with torch.no_grad():
        acts = vae.encoder(x)
        head, zs, _ = vae.decoder(acts, eps)
        base, _ = record(vae, lambda: vae.decoder(acts, eps))
        L, z = len(zs), vae.config['zdim']
        for l in range(L):
            if via == 'latents':
                run = lambda: vae.decoder(acts, eps, latents=zs[:l] + [zs[l] + 0.5])
            else:
                run = lambda: vae.decoder(acts, eps[:l] + [eps[l] + 0.5] + eps[l + 1:])
            changed, _ = record(vae, run)
            for i in range(l + 1):
                assert torch.equal(changed[i], base[i]), (l, i)
            for i in range(l + 1, L):
                assert (changed[i][:, :2 * z] - base[i][:, :2 * z]).abs().max() > 1e-5, (l, i)
        changed_head = vae.decoder(acts, eps, latents=zs[:-1] + [zs[-1] + 0.5])[0]
        assert (changed_head - head).abs().max() > 1e-5


def test_generate_keeps_the_given_latents_and_draws_the_rest_at_temperature():
    vae = small_vae()
    x, _ = batch(2)
    with torch.no_grad():
        zs = vae.posterior_latents(x)
        assert [tuple(z.shape) for z in zs] == [(2, 4, r, r) for r in (1, 4, 4, 8, 8)]
        eps = layer_noise(vae, 2, seed=1)
        temps = [0.9, 0.5, 1.0, 0.7, 0.3]
        for k in (0, 1, 3, 5):
            priors, fed = record(vae, lambda: vae.decoder.generate(2, temps, eps=eps, latents=zs[:k]))
            for i in range(5):
                if i < k:
                    assert torch.equal(fed[i], zs[i]), (k, i)
                else:   # z = mean_p + sigma_p * temperature * eps
                    mean, logsig = priors[i][:, :4], priors[i][:, 4:8]
                    torch.testing.assert_close(fed[i], mean + logsig.exp() * temps[i] * eps[i], rtol=1e-6, atol=1e-6)
                    assert not torch.equal(fed[i], zs[i])


def test_generate_at_temperature_zero_ignores_the_noise():
    vae = small_vae()
    with torch.no_grad():
        a = vae.decoder.generate(2, 0.0, eps=layer_noise(vae, 2, seed=1))
        b = vae.decoder.generate(2, [0.0] * 5, eps=layer_noise(vae, 2, seed=2))
        c = vae.decoder.generate(2, 1.0, eps=layer_noise(vae, 2, seed=2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-5


def test_prior_pass_with_every_latent_given_equals_the_posterior_pass():
    vae = small_vae()
    x, _ = batch(2)
    with torch.no_grad():
        acts = vae.encoder(x)
        head, zs, _ = vae.decoder(acts)
        again, zs_again, _ = vae.decoder(acts, latents=zs)
        assert all(torch.equal(a, b) for a, b in zip(zs, zs_again))        # the latents round trip
        assert torch.equal(again, head)
        torch.testing.assert_close(vae.decoder.generate(2, 0.37, latents=zs), head, rtol=0, atol=1e-6)


def test_sample_returns_uint8_images_and_honours_given_latents():
    vae = small_vae()
    torch.manual_seed(0)
    images = vae.sample(3, 0.8)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 8, 8)
    x, _ = batch(2)
    zs = vae.posterior_latents(x)
    torch.manual_seed(5)
    a = vae.sample(2, 0.8, latents=zs)
    torch.manual_seed(5)
    b = vae.sample(2, 0.1, latents=zs)          # every latent fixed: the temperature has nothing to scale
    torch.manual_seed(5)
    with torch.no_grad():
        expected = layers.to_uint8(layers.dmol_sample(vae.decoder.generate(2, 0.8, latents=zs)))
    assert torch.equal(a, expected) and torch.equal(b, expected)


def test_5bit_model_scores_with_5bit_bins_and_samples_on_the_5bit_grid():
    vae = small_vae(bits=5)
    x, target = batch(2, bits=5)
    eps = layer_noise(vae, 2)
    with torch.no_grad():
        out = vae(x, target, eps)
        head = vae.decoder(vae.encoder(x), eps)[0]
        torch.testing.assert_close(out['distortion'] * 192, layers.dmol_nll(head, target, bits=5))
        assert (out['distortion'] * 192 - layers.dmol_nll(head, target, bits=8)).abs().min() > 1
        torch.manual_seed(0)
        levels = set(torch.round(torch.arange(32) * 255 / 31).int().tolist())
        assert set(vae.sample(4).unique().int().tolist()) <= levels


# -----------------------------------------------------------------------------
# units of the loss

def test_distortion_is_dmol_nll_of_the_head_per_dimension_and_rate_is_kl_per_dimension():
    vae = small_vae()
    x, target = batch(3)
    eps = layer_noise(vae, 3)
    with torch.no_grad():
        out = vae(x, target, eps)
        head, _, kls = vae.decoder(vae.encoder(x), eps)
    dims = 3 * 8 * 8
    assert out['distortion'].shape == (3,) and out['rate'].shape == (3,) and out['kl'].shape == (3, 5)
    torch.testing.assert_close(out['distortion'] * dims, layers.dmol_nll(head, target))
    torch.testing.assert_close(out['kl'], torch.stack([k.sum((1, 2, 3)) for k in kls], 1))
    torch.testing.assert_close(out['rate'] * dims, out['kl'].sum(1))
    assert (out['kl'] > 0).all()


def test_bernoulli_model_with_padding_divides_by_the_cropped_28x28_dims():
    config = dict(width=8, zdim=2, enc_blocks='32x1,32d2,16d2,8d2,4d4,1x1', dec_blocks='1x1,4m1,8m4,16m8,32m16',
                  image_size=32, image_channels=1, likelihood='bernoulli', pad=2)
    torch.manual_seed(0)
    vae = perturb(model.VAE(config))
    g = torch.Generator().manual_seed(0)
    target = F.pad(torch.randint(0, 2, (2, 1, 28, 28), generator=g).float(), (2, 2, 2, 2))
    eps = layer_noise(vae, 2)
    with torch.no_grad():
        out = vae(target, target, eps)
        head = vae.decoder(vae.encoder(target), eps)[0]
        crop = (..., slice(2, 30), slice(2, 30))
        torch.testing.assert_close(out['distortion'] * 784, layers.bernoulli_nll(head[crop], target[crop]))
        torch.testing.assert_close(out['rate'] * 784, out['kl'].sum(1))
        border = target.clone()
        border[..., :2, :] = 1.0                                     # the padding does not count
        torch.testing.assert_close(vae(target, border, eps)['distortion'], out['distortion'], rtol=0, atol=0)
        torch.manual_seed(0)
        images = vae.sample(3)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 28, 28)
    assert set(images.unique().tolist()) <= {0, 255}


def test_bits_per_dim_is_nats_per_dim_over_ln2_on_known_values():
    # Bernoulli with logits 0: exactly 1 bit per pixel, whatever the image
    vae = small_vae(likelihood='bernoulli', image_channels=1)
    with torch.no_grad():
        vae.decoder.head.weight.zero_()
        vae.decoder.head.bias.zero_()
    x = torch.randint(0, 2, (2, 1, 8, 8)).float()
    out = vae(x, x)
    torch.testing.assert_close(out['distortion'] / math.log(2), torch.ones(2))
    # DMOL: every logistic centred on the lower boundary of the top bin, white image: 1 bit per dim
    vae = small_vae()
    h, M = 1 / 255, 2
    with torch.no_grad():
        vae.decoder.head.weight.zero_()
        vae.decoder.head.bias.copy_(torch.cat([torch.zeros(M), torch.tensor([1 - h] * M + [0.0] * 2 * M).repeat(3)]))
    x = torch.ones(2, 3, 8, 8)
    torch.testing.assert_close(vae(x, x)['distortion'] / math.log(2), torch.ones(2))
    # DMOL: a wide logistic (scale e^3) at 0, every value 0.2: -log2 of its bin by hand, ~13.3 bits/dim
    with torch.no_grad():
        vae.decoder.head.bias.copy_(torch.cat([torch.zeros(M), torch.tensor([0.0] * M + [3.0] * M + [0.0] * M).repeat(3)]))
    x = torch.full((2, 3, 8, 8), 153 / 127.5 - 1)
    s = math.exp(3)
    p = 1 / (1 + math.exp(-(x[0, 0, 0, 0].item() + h) / s)) - 1 / (1 + math.exp(-(x[0, 0, 0, 0].item() - h) / s))
    torch.testing.assert_close(vae(x, x)['distortion'] / math.log(2), torch.full((2,), -math.log2(p)), rtol=1e-4, atol=0)


# -----------------------------------------------------------------------------
# a training step on CPU

TINY32 = dict(width=16, zdim=4, enc_blocks='32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1',
              dec_blocks='1x1,4m1,8m4,16m8,32m16', image_size=32, num_mixtures=2)


def test_tiny_model_trains_a_step_in_under_a_second_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    vae = perturb(model.VAE(TINY32))
    x, target = batch(4, size=32)
    times = []
    for _ in range(4):                  # on one thread (the module fixture); the first step warms up
        t0 = time.perf_counter()
        vae.zero_grad(set_to_none=True)
        out = vae(x, target)
        loss = (out['distortion'] + out['rate']).mean()
        loss.backward()
        times.append(time.perf_counter() - t0)
    assert statistics.median(times[1:]) < 1.0, times
    assert torch.isfinite(loss)
    for name, p in vae.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_at_init_only_the_prior_convs_behind_the_zeroed_last_conv_get_no_gradient():
    torch.manual_seed(0)
    vae = model.VAE(SMALL)
    x, target = batch(2)
    out = vae(x, target)
    (out['distortion'] + out['rate']).mean().backward()
    zero = {n for n, p in vae.named_parameters() if p.grad is None or p.grad.abs().max() == 0}
    expected = {f'decoder.layers.{i}.prior.conv{j}.{k}' for i in range(5) for j in (1, 2, 3) for k in ('weight', 'bias')}
    # and the first layer's prior reads the zero starting state through zero biases: its hidden
    # activations are 0, so its last conv's weight (not its bias) gets no gradient either
    expected.add('decoder.layers.0.prior.conv4.weight')
    assert zero == expected


def grads_of(vae, x, target, eps=None, seed=0):
    vae.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = vae(x, target, eps)
    (out['distortion'] + out['rate']).mean().backward()
    return out, {n: p.grad.clone() for n, p in vae.named_parameters()}


@pytest.mark.parametrize('given_noise', [True, False])
def test_grad_checkpoint_gives_the_plain_backward_gradients(given_noise):
    vae = small_vae(3)
    x, target = batch(3, seed=3)
    eps = layer_noise(vae, 3, seed=4) if given_noise else None   # drawn noise: the recompute redraws the same
    out, plain = grads_of(vae, x, target, eps)
    out_ckpt, ckpt = grads_of(vae.set_grad_checkpoint(True), x, target, eps)
    assert torch.equal(out['kl'], out_ckpt['kl'])
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-6, atol=1e-9), n


def test_grad_checkpoint_keeps_fewer_activations_for_the_backward():
    vae = small_vae(3)
    x, target = batch(2, seed=3)

    def saved(on):
        vae.set_grad_checkpoint(on)
        count = [0]
        def pack(t):
            count[0] += t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = vae(x, target)
        return count[0]
    assert saved(True) < 0.5 * saved(False)


def test_the_removed_bottleneck_attentive_variant_is_refused_naming_the_official_one():
    with pytest.raises(ValueError, match="removed.*'nvae'"):
        model.VAE({**SMALL, 'model': 'attentive'})


NARROW = dict(SMALL, width=8, custom_width='4:16,1:16')   # the image resolution narrower, as ffhq1024


def test_custom_width_sets_each_resolutions_channels_with_the_closed_form_count():
    vae = model.VAE(NARROW)
    assert n_params(vae) == closed_form_count(NARROW) != closed_form_count(SMALL)
    assert [l.width for l in vae.decoder.layers] == [16, 16, 16, 8, 8]
    assert vae.decoder.state['4'].shape == (1, 16, 4, 4) and vae.decoder.state['8'].shape == (1, 8, 8, 8)
    acts = vae.encoder(batch(2)[0])
    assert {r: a.shape[1] for r, a in acts.items()} == {8: 8, 4: 16, 1: 16}


def test_custom_width_pads_encoder_channels_with_zeros_and_mixes_in_the_first_coarse_channels():
    vae = small_vae(5, **{k: NARROW[k] for k in ('width', 'custom_width')})
    x, target = batch(2, seed=5)
    b = vae.encoder.blocks
    down = b[2](b[1](b[0](vae.encoder.stem(x))))                               # 8x2, 8d2: 8 channels at 4x4
    padded = torch.cat([down, torch.zeros_like(down)], 1)                       # zeros to the 16 of 4x4
    assert torch.equal(vae.encoder(x)[4], b[3](padded))                         # 4x1 reads the padded 16
    xs = {1: torch.randn(2, 16, 1, 1), 4: torch.randn(2, 16, 4, 4)}
    layer = vae.decoder.layers[3]                                               # 8m4: 8 channels
    x8 = vae.decoder.layer_input(xs, layer, 2, x)
    assert torch.equal(x8, model.upsample(xs[4][:, :8], 8))                       # no state at 8 in xs: zeros
    out = vae(x, target)
    assert out['kl'].shape == (2, 5) and torch.isfinite(out['distortion']).all()


@pytest.mark.parametrize('bad', ['4:0', '4-16', 'x:8'])
def test_malformed_custom_width_is_refused_naming_the_item(bad):
    with pytest.raises(ValueError, match='resolution:width'):
        model.VAE(dict(SMALL, custom_width=bad))


@pytest.mark.parametrize('preset', ['cpu', 'attentive_cpu'])
def test_channels_last_draws_the_same_noise_as_nchw(preset):
    """randn_like follows a tensor's memory format: the layers draw in NCHW order instead, so
    --channels_last changes the layout, not the random numbers (nor the loss beyond rounding)."""
    config = train.make_config(train.parse_args(['--preset', preset]))
    torch.manual_seed(0)
    vae = model.build(config)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    runs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        vae = vae.to(memory_format=layout)
        torch.manual_seed(1)
        out = vae(x.contiguous(memory_format=layout), x)
        torch.manual_seed(2)
        runs.append((out['kl'].detach(), out['distortion'].detach(), vae.sample(2)))
    (kl, nll, images), (kl_cl, nll_cl, images_cl) = runs
    torch.testing.assert_close(kl_cl, kl, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(nll_cl, nll, rtol=1e-5, atol=1e-6)
    assert torch.equal(images_cl, images)
