"""
The official very deep VAE, number for number: hvae loaded with the official weights reproduces
its outputs, per-layer KL, ELBO and every gradient (../shared/data/reference/README.md).
"""
import functools
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest
import torch

import convert
import model
from test_model import DATA, closed_form_count, n_params


# -----------------------------------------------------------------------------
# number for number against the official code (data/reference/README.md)

REFERENCE = DATA / 'reference' / 'vdvae_reference_small.pt'


def nchw(t):
    return t.permute(0, 3, 1, 2)


def hvae_name(official, tensor):
    if re.fullmatch(r'decoder\.bias_xs\.\d+', official):
        return f'decoder.state.{tensor.shape[-1]}'
    return convert.official_name(official)


@functools.lru_cache(maxsize=None)
def reference_run():
    """The reference data and hvae's outputs and ELBO gradients on it, computed once per session.
    A plain function, not a fixture, so that missing data fails each test rather than erroring it."""
    if not REFERENCE.exists():
        pytest.fail(f'reference data not found: looked for {REFERENCE} (set HVAE_DATA to the folder holding reference/)')
    d = torch.load(REFERENCE, weights_only=True)
    vae = convert.load_official_vdvae(model.VAE(d['config']), d['state_dict'])
    x, target = nchw(d['x_in_nhwc']), nchw(d['target_nhwc'])
    out = vae(x, target, eps=d['eps_posterior'])
    elbo = (out['distortion'] + out['rate']).mean()
    elbo.backward()
    with torch.no_grad():
        head = vae.decoder(vae.encoder(x), d['eps_posterior'])[0]
        uncond = vae.decoder.generate(4, d['temperature_uncond'], eps=d['eps_prior'])
    return dict(d=d, vae=vae, out=out, elbo=elbo, head=head, uncond=uncond)


def test_reference_model_has_the_official_parameter_count():
    reference = reference_run()
    assert n_params(reference['vae']) == reference['d']['n_params'] == 105_774
    assert closed_form_count(reference['d']['config']) == 105_774


def test_reference_head_output_matches_the_official_model():
    reference = reference_run()
    torch.testing.assert_close(reference['head'], nchw(reference['d']['head_nhwc']), rtol=1e-5, atol=1e-5)


def test_reference_distortion_kl_rate_and_elbo_match_the_official_model():
    reference = reference_run()
    d, out = reference['d'], reference['out']
    torch.testing.assert_close(out['distortion'], d['distortion'], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['kl'], d['kl_per_layer'], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out['rate'], d['rate'], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reference['elbo'], d['elbo'], rtol=1e-5, atol=1e-6)


def test_reference_gradients_of_the_elbo_match_the_official_model():
    reference = reference_run()
    grads = reference['d']['grads']
    params = dict(reference['vae'].named_parameters())
    assert len(grads) == len(params) == 317
    for name, g in grads.items():
        p = params[hvae_name(name, g)]
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=lambda m: f'{name}: {m}')


def test_reference_unconditional_pass_matches_the_official_model():
    reference = reference_run()
    torch.testing.assert_close(reference['uncond'], nchw(reference['d']['head_uncond_nhwc']), rtol=1e-5, atol=1e-5)


def test_official_bias_xs_k_is_the_kth_resolution_in_increasing_order():
    reference = reference_run()
    sd = reference['d']['state_dict']
    keys = sorted((k for k in sd if k.startswith('decoder.bias_xs.')), key=lambda k: int(k.rsplit('.', 1)[1]))
    assert [sd[k].shape[-1] for k in keys] == [1, 4, 8, 16, 32]


def test_official_names_map_onto_hvae_names():
    cases = {'encoder.in_conv.weight': 'encoder.stem.weight',
             'encoder.enc_blocks.7.c3.bias': 'encoder.blocks.7.conv3.bias',
             'decoder.dec_blocks.3.enc.c2.weight': 'decoder.layers.3.posterior.conv2.weight',
             'decoder.dec_blocks.0.prior.c4.bias': 'decoder.layers.0.prior.conv4.bias',
             'module.decoder.dec_blocks.12.resnet.c1.weight': 'decoder.layers.12.resblock.conv1.weight',
             'decoder.dec_blocks.2.z_proj.weight': 'decoder.layers.2.z_proj.weight',
             'decoder.out_net.out_conv.bias': 'decoder.head.bias',
             'decoder.gain': 'decoder.gain'}
    for official, ours in cases.items():
        assert convert.official_name(official) == ours


def test_load_official_vdvae_accepts_a_module_prefix_and_rejects_missing_misshapen_or_extra_tensors():
    reference = reference_run()
    sd = reference['d']['state_dict']
    config = reference['d']['config']
    prefixed = convert.load_official_vdvae(model.VAE(config), {f'module.{k}': v for k, v in sd.items()})
    for name, p in prefixed.named_parameters():
        assert torch.equal(p, reference['vae'].state_dict()[name]), name
    missing = {k: v for k, v in sd.items() if k != 'decoder.out_net.out_conv.bias'}
    with pytest.raises(RuntimeError, match='decoder.head.bias'):
        convert.load_official_vdvae(model.VAE(config), missing)
    misshapen = {**sd, 'decoder.dec_blocks.4.enc.c1.weight': torch.zeros(8, 64, 3, 3)}
    with pytest.raises(RuntimeError, match=re.escape('decoder.layers.4.posterior.conv1.weight')):
        convert.load_official_vdvae(model.VAE(config), misshapen)
    extra = {**sd, 'decoder.dec_blocks.99.z_proj.weight': torch.zeros(32, 4, 1, 1)}
    with pytest.raises(RuntimeError, match='decoder.layers.99.z_proj.weight'):
        convert.load_official_vdvae(model.VAE(config), extra)
