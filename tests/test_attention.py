"""The attentive VAE (attention.py and its routing in model.py): attention is a distribution over
depth, the prior only looks back, the posterior only looks towards the data, gates at 0 give the
local model, and the non-local block is a permutation-equivariant residual."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from attention import NonLocal, depth_attention  # noqa: E402
from layers import dmol_nll  # noqa: E402
from model import VAE  # noqa: E402

# a small single-scale attentive VAE (the paper's shape): 4 layers at 4x4 after one downsample
SINGLE = dict(model='attentive', width=16, zdim=3, key_width=5, image_size=8, num_mixtures=2,
              enc_blocks='8x1,8d2,4x4', dec_blocks='4x4', post_upsample=2, nonlocal_res='4', nonlocal_width=4)
# and a multi-scale one (the `cpu` layout's shape)
MULTI = dict(SINGLE, enc_blocks='8x1,8d2,4x2,4d4,1x1', dec_blocks='1x1,4m1,4x1,8m4', post_upsample=1,
             nonlocal_res='4,8')


def build(config, gate=0.3, seed=0):
    """A model whose gates are open and whose zero-initialised convs are perturbed (as the
    reference data does), so that every path matters."""
    torch.manual_seed(seed)
    vae = VAE(config)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.fill_(gate) if name.endswith('gate') else p.add_(0.05 * torch.randn_like(p))
    return vae


def inputs(config, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, config['image_size'], config['image_size'], generator=g)
    return x, x.clamp(-1, 1)


def prior_outputs(vae, run):
    """Run `run()` and return each layer's prior-block output (mean, log-sigma, state update)."""
    seen = []
    hooks = [l.prior.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
             for l in vae.decoder.layers]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_depth_attention_weights_sum_to_one_over_depth_at_every_pixel():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 3, 4), torch.randn(2, 7, 5, 3, 4), torch.randn(2, 7, 6, 3, 4)
    out, alpha = depth_attention(q, k, v, torch.tensor(1.7))
    assert alpha.shape == (2, 7, 3, 4) and (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(1), torch.ones(2, 3, 4))
    # pixel (1, 2) of image 1 by hand: softmax_j(a q . k_j), then sum_j alpha_j v_j
    scores = 1.7 * (q[1, :, 1, 2] @ k[1, :, :, 1, 2].T)
    torch.testing.assert_close(out[1, :, 1, 2], torch.softmax(scores, 0) @ v[1, :, :, 1, 2])


@pytest.mark.parametrize('config', [SINGLE, MULTI], ids=['single-scale', 'multi-scale'])
def test_prior_of_layer_l_ignores_everything_of_later_layers(config):
    vae = build(config)
    x, target = inputs(config)
    L = len(vae.decoder.layers)
    latents = vae.posterior_latents(x)
    run = lambda: vae.decoder.generate(2, latents=latents)
    base = prior_outputs(vae, run)
    for j in range(1, L - 1):
        changed = build(config)
        with torch.no_grad():                       # perturb every weight of layer j and its latent
            for p in changed.decoder.layers[j].parameters():
                p.add_(0.5 * torch.randn_like(p))
        moved = [z.clone() for z in latents]
        moved[j] = moved[j] + 1.0
        after = prior_outputs(changed, lambda: changed.decoder.generate(2, latents=moved))
        for l in range(j):                          # the priors of the layers before j: unchanged
            torch.testing.assert_close(after[l], base[l], rtol=0, atol=0)
        assert not torch.allclose(after[j + 1], base[j + 1])


def test_layer_l_own_key_is_not_in_its_sequence():
    vae = build(SINGLE)
    x, _ = inputs(SINGLE)
    latents = vae.posterior_latents(x)
    run = lambda: vae.decoder.generate(2, latents=latents)
    base = prior_outputs(vae, run)
    d, w = SINGLE['key_width'], SINGLE['width']
    for l in range(1, len(vae.decoder.layers) - 1):
        # layer l's key k_l is emitted by layer l-1's cell: its last d channels (eq. 4)
        def bump_key(m, i, o):
            o = o.clone()
            o[:, w + d:] += 3.0 * torch.randn_like(o[:, w + d:])   # not a constant: LayerNorm removes those
            return o
        h = vae.decoder.layers[l - 1].resblock.register_forward_hook(bump_key)
        after = prior_outputs(vae, run)
        h.remove()
        torch.testing.assert_close(after[l], base[l], rtol=0, atol=0)
        assert not torch.allclose(after[l + 1], base[l + 1])
    # layer 0's key is a learned tensor; layer 1 attends over layer 0 alone (weight 1 whatever the
    # key), layer 2 is the first to weigh it against another
    with torch.no_grad():
        vae.decoder.first_key.add_(3.0 * torch.randn_like(vae.decoder.first_key))
    after = prior_outputs(vae, run)
    for l in (0, 1):
        torch.testing.assert_close(after[l], base[l], rtol=0, atol=0)
    assert not torch.allclose(after[2], base[2])


def posterior_offsets(vae, x, latents, perturb=None):
    """Each layer's posterior offsets with every latent fixed, optionally adding 1 to encoder
    feature `perturb` (index into the 4x4 features, data -> top)."""
    seen = []
    hooks = [l.posterior_attention.register_forward_hook(
        lambda m, i, o: seen.append(torch.cat(o, 1).detach().clone())) for l in vae.decoder.layers]
    if perturb is not None:   # 4x4 feature m is the output of encoder block m + 1 ('8x1,8d2,4x4')
        hooks.append(vae.encoder.blocks[perturb + 1].register_forward_hook(lambda m, i, o: o + 1.0))
    try:
        vae.decoder(vae.encoder(x), latents=latents)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_posterior_of_layer_l_only_sees_encoder_features_closer_to_the_data():
    vae = build(SINGLE)
    x, _ = inputs(SINGLE)
    latents = vae.posterior_latents(x)
    base = posterior_offsets(vae, x, latents)
    pairs = [l.pair for l in vae.decoder.layers]
    assert pairs == [4, 3, 2, 1]            # the top layer reads the deepest of the 5 features
    for m in range(5):
        after = posterior_offsets(vae, x, latents, perturb=m)
        for l, pair in enumerate(pairs):
            if m > pair:                     # a deeper feature than layer l's own: not seen
                torch.testing.assert_close(after[l], base[l], rtol=0, atol=0)
            else:
                assert not torch.allclose(after[l], base[l])


@pytest.mark.parametrize('config', [SINGLE, MULTI], ids=['single-scale', 'multi-scale'])
def test_with_every_gate_at_zero_the_elbo_equals_the_model_without_attention(config):
    vae = build(config, gate=0.0)
    x, target = inputs(config)
    eps = [torch.randn(2, config['zdim'], l.res, l.res) for l in vae.decoder.layers]

    def nelbo(attend):
        params, _, kls = vae.decoder(vae.encoder(x), eps, attend=attend)
        return dmol_nll(params, target) + sum(k.sum((1, 2, 3)) for k in kls)

    torch.testing.assert_close(nelbo(True), nelbo(False), rtol=0, atol=0)
    # and the path is real: open gates change the ELBO
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith('decoder.layers.2.prior_attention.gate'):
                p.fill_(0.5)
    assert not torch.allclose(nelbo(True), nelbo(False))


def test_non_local_block_is_equivariant_to_a_permutation_of_pixels():
    torch.manual_seed(0)
    block = NonLocal(6, 4)
    with torch.no_grad():
        block.gate.fill_(0.7)
        block.scale.fill_(1.3)
    x = torch.randn(2, 6, 5, 4)
    perm = torch.randperm(20)
    shuffle = lambda t: t.flatten(2)[:, :, perm].reshape(t.shape)
    torch.testing.assert_close(block(shuffle(x)), shuffle(block(x)))
    # and by hand at one pixel: x + gamma * softmax(a q . k) v
    q, k, v = (c(x).flatten(2)[0] for c in (block.query, block.key, block.value))   # (C', HW)
    alpha = torch.softmax(1.3 * q[:, 7] @ k, 0)
    torch.testing.assert_close(block(x).flatten(2)[0, :, 7], x.flatten(2)[0, :, 7] + 0.7 * (v @ alpha))


def test_non_local_block_is_the_identity_with_its_gate_at_zero_and_gradients_reach_gate_and_scale():
    block = NonLocal(6, 4)
    x = torch.randn(2, 6, 5, 4)
    assert torch.equal(block(x), x)                        # gate starts at 0
    with torch.no_grad():
        block.gate.fill_(0.5)
    (block(x) ** 2).sum().backward()
    for p in (block.gate, block.scale):
        assert p.grad is not None and p.grad.abs() > 0 and torch.isfinite(p.grad)


def test_attentive_model_trains_samples_and_keeps_given_latents():
    vae = build(MULTI, gate=0.1)
    x, target = inputs(MULTI, n=3)
    out = vae(x, target)
    (out['distortion'] + out['rate']).mean().backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    images = vae.sample(3, 0.7)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    latents = vae.posterior_latents(x)[:2]
    seen = []
    hooks = [l.z_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].clone())) for l in vae.decoder.layers]
    vae.sample(3, 1.0, latents=latents)
    for h in hooks:
        h.remove()
    for given, used in zip(latents, seen):
        assert torch.equal(given, used)


def test_bottleneck_attentive_preset_at_depth_16_keeps_its_layout():
    config = train.make_config(train.parse_args(['--preset', 'attentive_bottleneck_cifar10', '--depth', '16']))
    assert config['preset'] == 'attentive_bottleneck_cifar10' and config['model'] == 'attentive'
    with torch.device('meta'):
        vae = VAE(config)
    assert len(vae.decoder.layers) == 16 and {l.res for l in vae.decoder.layers} == {16}
    assert [l.pair for l in vae.decoder.layers] == list(range(16, 0, -1))
    assert sum(p.numel() for p in vae.parameters()) == 9_867_212
    assert sum(isinstance(m, NonLocal) for m in vae.modules()) == 32   # every 16x16 residual cell
    # --model overrides the preset's model
    local = train.make_config(train.parse_args(['--preset', 'attentive_bottleneck_cifar10', '--model', 'vdvae']))
    assert local['model'] == 'vdvae' and local['preset'] == 'attentive_bottleneck_cifar10'


def test_bottleneck_attentive_recipe_schedules():
    config = train.make_config(train.parse_args(['--preset', 'attentive_bottleneck_cifar10']))
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
