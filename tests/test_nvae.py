"""
The official attentive VAE, number for number (nvae.py): hvae loaded with the official weights of
../shared/data/reference/attentive_reference_small.npz reproduces its per-image nll, per-layer KL,
loss, L2 penalty, BatchNorm statistics and every gradient, in train and in eval mode; the paper's
models have their official parameter counts; the new parts match their closed forms.
"""
import functools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import convert  # noqa: E402
import nvae  # noqa: E402
from attention import DecoderAttention, EncoderAttention, NonLocalBlock, attend, depth_attention  # noqa: E402
from conftest import DATA  # noqa: E402
from layers import FactorizedReduce, WNConv2d, tf_same_pad  # noqa: E402

REFERENCE = DATA / 'reference' / 'attentive_reference_small.npz'
# every fixture of the official model in the folder is checked the same way (a second configuration
# dropped in beside the first, attentive_reference_*.npz, is picked up)
FIXTURES = sorted({REFERENCE.name} | {p.name for p in REFERENCE.parent.glob('attentive_reference*.npz')})
D = 3072


def nchw(a):
    return torch.as_tensor(np.asarray(a)).permute(0, 3, 1, 2).double()


def fixture_weights(d):
    keys = list(d['param_keys']) + list(d['bn_stat_names'])
    paths = dict(zip(d['param_keys'], d['param_paths']))
    paths.update(zip(d['bn_stat_names'], d['bn_stat_paths']))
    return {k: d['w/' + k] for k in keys}, paths


@functools.lru_cache(maxsize=None)
def reference_run(mode, fixture=REFERENCE.name, device='cpu', dtype=torch.float64):
    """The fixture, and hvae's outputs, loss and gradients on it in `mode` ('train' or 'eval'),
    float64 on the CPU unless told, built from the fixture's own flags and loaded by object path."""
    path = REFERENCE.parent / fixture
    if not path.exists():
        pytest.fail(f'reference data not found: looked for {path} (set HVAE_DATA)')
    d = dict(np.load(path))
    config = convert.official_attentive_config(str(d['config_flags']))
    vae = nvae.NVAE(config)
    weights, paths = fixture_weights(d)
    mapped = convert.load_official_attentive(vae, weights, paths)
    vae = vae.to(device, dtype).train(mode == 'train')
    get = lambda k: nchw(d[k]).to(device, dtype) if k in d else None   # no log-scale noise: no keys
    x = get('x_scaled_nhwc')
    L = config['num_layers']
    eps = [nchw(d[f'noise/eps_{i}'][0]).to(device, dtype) for i in range(L)]
    noise = [(get(f'noise/noise_logscale_prior_{i}') if i else None, get(f'noise/noise_logscale_posterior_{i}'))
             for i in range(L)]
    out = vae(x, x, eps, noise)
    penalty = vae.l2_penalty()
    loss = (out['distortion'] * D).mean() + (out['rate'] * D).mean() + penalty   # official loss, beta = 1
    loss.backward()
    return dict(d=d, vae=vae, out=out, loss=loss, penalty=penalty, mapped=mapped, config=config)


def rel(a, b):
    a, b = torch.as_tensor(a).detach().cpu().double(), torch.as_tensor(np.asarray(b)).double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize('fixture', FIXTURES)
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_reference_nll_and_kl_per_layer_match_the_official_model(mode, fixture):
    r = reference_run(mode, fixture)
    assert rel(r['out']['distortion'].detach() * D, r['d'][f'{mode}/nll']) < 1e-5
    assert rel(r['out']['kl'].detach(), r['d'][f'{mode}/kl_per_layer']) < 1e-5
    assert rel(r['out']['rate'].detach() * D, r['d'][f'{mode}/kl_sum']) < 1e-5


@pytest.mark.parametrize('fixture', FIXTURES)
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_reference_loss_and_l2_penalty_match_the_official_model(mode, fixture):
    r = reference_run(mode, fixture)
    assert rel(r['loss'].detach(), r['d'][f'{mode}/loss']) < 1e-5
    assert rel(r['penalty'].detach(), r['d'][f'{mode}/reg_loss']) < 1e-5


@pytest.mark.parametrize('fixture', FIXTURES)
def test_reference_batchnorm_moving_statistics_after_the_train_pass_match(fixture):
    r = reference_run('train', fixture)
    state = r['vae'].state_dict()
    for key, path in zip(r['d']['bn_stat_names'], r['d']['bn_stat_paths']):
        expected = torch.as_tensor(r['d']['bn_after_train/' + key]).double()
        assert (state[convert.hvae_name(path)] - expected).abs().max() < 1e-5 * max(1.0, float(expected.abs().max())), path


@pytest.mark.parametrize('fixture', FIXTURES)
def test_eval_pass_leaves_the_batchnorm_statistics_alone(fixture):
    r = reference_run('eval', fixture)
    state = r['vae'].state_dict()
    for key, path in zip(r['d']['bn_stat_names'], r['d']['bn_stat_paths']):
        assert torch.equal(state[convert.hvae_name(path)], torch.as_tensor(r['d']['w/' + key]).double())


def near_zero(path, mode):
    """The gradients the fixture README lists as zero up to round-off: every non-local key-conv bias,
    and in train mode the conv bias and log-gain of the first node of every residual block."""
    if path.endswith('key_conv.layer.bias'):
        return True
    first_node = ('_nodes.0._conv2d_layers.0.' in path or '_nodes.0._output_layers.0._conv2d_layers.0.' in path)
    return mode == 'train' and first_node and path.endswith(('layer.bias', 'log_g'))


def check_gradients(r, mode, tol=1e-4):
    """Every trainable gradient against the official one: relative error under `tol`, or under `tol`
    of the total norm for those the fixture README lists as zero up to round-off."""
    d, params = r['d'], dict(r['vae'].named_parameters())
    grads = {k: d[f'{mode}/grad/{k}'] for k in d['param_keys']}
    total = math.sqrt(sum(float((np.asarray(g, np.float64) ** 2).sum()) for g in grads.values()))
    checked = 0
    for key, path, trainable in zip(d['param_keys'], d['param_paths'], d['param_trainable_tf23']):
        name = r['mapped'][key]
        if not trainable:                 # the depth-wise scales: held at 1, not hvae parameters
            assert name is None
            continue
        ours, ref = params[name].grad.cpu().double(), convert.to_torch_layout(name, grads[key]).double()
        err = float((ours - ref).norm())
        if near_zero(path, mode):
            assert err < tol * total, path
        else:
            assert err / max(float(ref.norm()), 1e-5 * total) < tol, path
        checked += 1
    assert checked == len(params) == int(d['param_trainable_tf23'].sum())


@pytest.mark.parametrize('fixture', FIXTURES)
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_reference_every_gradient_matches_the_official_model(mode, fixture):
    check_gradients(reference_run(mode, fixture), mode)


@pytest.mark.parametrize('fixture', FIXTURES)
def test_reference_model_has_the_official_trainable_count(fixture):
    r = reference_run('eval', fixture)
    n = sum(p.numel() for p in r['vae'].parameters())
    # trainable in TF 2.15 (270,654 for the small fixture) less the depth-wise scales that TF 2.3 never trained
    untrained = sum(1 for t in r['d']['param_trainable_tf23'] if not t)
    assert n == int(r['d']['n_params_trainable']) - untrained
    if fixture == REFERENCE.name:
        assert n == 270_649


# -----------------------------------------------------------------------------
# the paper's models: exact parameter counts from a meta-device build (ATTENTIVE.md 9 and 12)

ATTENTIVE_CIFAR = ('--hparams=layer_latent_shape=[16,16,20],num_layers=16,data_distribution=discretized_logistic_mixture '
                   '--encoder_attention_hparams=key_dim=20,query_dim=20,use_layer_norm=True '
                   '--decoder_attention_hparams=key_dim=20,query_dim=20,use_layer_norm=True '
                   '--decoder_hparams=scale=[0,0],use_nonlocal=True,nonlocop_hparams=[key_dim=32,query_dim=32],num_blocks=2,num_filters=128 '
                   '--encoder_hparams=scale=[0,0],use_nonlocal=True,nonlocop_hparams=[key_dim=32,query_dim=32],num_blocks=2,num_filters=128 '
                   '--preproc_encoder_hparams=scale=[0,-2],use_nonlocal=True,nonlocop_hparams=[key_dim=32,query_dim=32],num_blocks=2,num_filters=128 '
                   '--postproc_decoder_hparams=scale=[2,0],num_blocks=2,num_filters=128 '
                   '--posterior_hparams=log_scale_upper_bound=5,log_scale_low_bound=-5,noise_stddev=0.001 '
                   '--prior_hparams=log_scale_upper_bound=5,log_scale_low_bound=-1.0,noise_stddev=0.001')
NVAE_CIFAR = ('--hparams=layer_latent_shape=[16,16,20],num_layers=16,data_distribution=discretized_logistic_mixture '
              '--decoder_hparams=scale=[0,0],num_blocks=2,num_filters=128 '
              '--encoder_hparams=scale=[0,0],num_blocks=2,num_filters=128 '
              '--preproc_encoder_hparams=scale=[0,-2],num_blocks=2,num_filters=128 '
              '--postproc_decoder_hparams=scale=[2,0],num_blocks=2,num_filters=128 '
              '--posterior_hparams=log_scale_upper_bound=5,log_scale_low_bound=-5 '
              '--prior_hparams=log_scale_upper_bound=5,log_scale_low_bound=-5.0')


OMNIGLOT = ('--dataset=omniglot --hparams=layer_latent_shape=[16,16,20],num_layers=15,num_proc_blocks=1,data_distribution=bernoulli '
            '--decoder_attention_hparams=key_dim=8,query_dim=8,use_layer_norm=True '
            '--encoder_attention_hparams=key_dim=8,query_dim=8,use_layer_norm=False '
            '--merge_encoder_hparams=use_nonlocal=True,nonlocop_hparams=[key_dim=8,query_dim=8] '
            '--merge_decoder_hparams=use_nonlocal=True,nonlocop_hparams=[key_dim=8,query_dim=8] '
            '--decoder_hparams=scale=[0,0],num_blocks=2,num_filters=32 '
            '--encoder_hparams=scale=[0,0],num_blocks=2,num_filters=32 '
            '--preproc_encoder_hparams=scale=[0,0,-2],num_nodes=2,num_blocks=3,num_filters=32 '
            '--postproc_decoder_hparams=scale=[2,0,0],num_nodes=2,use_nonlocal=True,nonlocop_hparams=[key_dim=8,query_dim=8],num_blocks=3,num_filters=32 '
            '--posterior_hparams=log_scale_upper_bound=5,log_scale_low_bound=-5 '
            '--prior_hparams=log_scale_upper_bound=5,log_scale_low_bound=-5')


def meta_count(config):
    with torch.device('meta'):
        return sum(p.numel() for p in nvae.NVAE(config).parameters() if p.requires_grad)


def test_paper_attentive_model_has_118974679_trainable_parameters():
    # DeepVAE.count_params' 118,966,422 - the 31 depth-wise scales + the 8,288 model-level LayerNorms
    assert meta_count(convert.official_attentive_config(ATTENTIVE_CIFAR)) == 118_974_679
    assert meta_count(nvae.DEFAULTS) == 118_974_679


def test_paper_nvae_baseline_has_79206420_trainable_parameters():
    assert meta_count(convert.official_attentive_config(NVAE_CIFAR)) == 79_206_420
    assert meta_count(nvae.BASELINE) == 79_206_420


def test_omniglot_flags_build_the_official_omniglot_model():
    # DeepVAE.count_params' 7,873,624 (README 7.87M) - 29 depth-wise scales + 13 model-level LayerNorms
    # over 80 channels; exercises merge-cell and postprocess non-local blocks (the upsampling
    # shortcut's without bias), 3 pre/post blocks, no encoder-side LayerNorms, Bernoulli
    c = convert.official_attentive_config(OMNIGLOT)
    assert (c['likelihood'], c['image_channels'], c['enc_layer_norm'], c['dec_layer_norm']) == ('bernoulli', 1, False, True)
    assert meta_count(c) == 7_873_624 - 29 + 13 * 2 * 80


def test_flags_of_the_paper_models_give_the_presets():
    c = convert.official_attentive_config(ATTENTIVE_CIFAR)
    for k, v in nvae.DEFAULTS.items():
        assert c.get(k, v) == v, k
    b = convert.official_attentive_config(NVAE_CIFAR)
    for k, v in nvae.BASELINE.items():
        assert b.get(k, v) == v, k


def test_trainable_scales_flag_adds_one_parameter_per_depthwise_attention():
    config = dict(nvae.DEFAULTS, trainable_scales=True)
    assert meta_count(config) == 118_974_679 + 31


# -----------------------------------------------------------------------------
# closed forms of the new parts

def test_weight_norm_kernel_is_direction_over_its_norm_times_exp_log_gain_and_starts_at_v_e001():
    torch.manual_seed(0)
    conv = WNConv2d(5, 7, 3)
    v = conv.v.detach()
    norm = v.flatten(1).norm(dim=1)
    # official init: log g = log ||v|| + 0.01, so the effective kernel starts at v e^0.01
    torch.testing.assert_close(conv.log_g.detach(), torch.log(norm) + 0.01)
    torch.testing.assert_close(conv.kernel().detach(), v * math.exp(0.01))
    with torch.no_grad():
        conv.log_g.fill_(0.3)
    torch.testing.assert_close(conv.kernel().detach(), v / norm.view(-1, 1, 1, 1) * math.exp(0.3))
    # DeepVaeInit: U(-sqrt(0.99 / fan_in), +sqrt(0.99 / fan_in)), fan_in 45 for the kernel, 7 for the bias
    assert v.abs().max() <= math.sqrt(0.99 / 45) and conv.bias.abs().max() <= math.sqrt(0.99 / 7)
    big = WNConv2d(64, 64, 3)
    assert big.v.abs().max() > 0.95 * math.sqrt(0.99 / 576)


def test_fused_weight_norm_and_l2_penalty_have_the_plain_formulas_gradients():
    torch.manual_seed(0)
    conv = WNConv2d(5, 7, 3).double()
    g = torch.randn(7, 5, 3, 3, dtype=torch.float64)
    fused = torch.autograd.grad((conv.kernel() * g).sum(), (conv.v, conv.log_g))
    v = conv.v
    plain = v * torch.rsqrt((v ** 2).sum((1, 2, 3), keepdim=True)) * torch.exp(conv.log_g).view(-1, 1, 1, 1)
    for a, b in zip(fused, torch.autograd.grad((plain * g).sum(), (conv.v, conv.log_g))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the penalty's one autograd node: value and gradient of sum_k lambda_k sum(w_k^2)
    weights = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((3, 4), (5,), ())]
    lambdas = [0.3, 2e-4, 1.5]
    ours = nvae.L2Penalty.apply(lambdas, *weights)
    theirs = sum(lam * (w ** 2).sum() for lam, w in zip(lambdas, weights))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(3 * ours, weights), torch.autograd.grad(3 * theirs, weights)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_tf_same_padding_at_stride_2_pads_nothing_before_and_one_after():
    x = torch.arange(16.).view(1, 1, 4, 4)
    p = tf_same_pad(x, 3, 2)
    assert p.shape == (1, 1, 5, 5)
    assert torch.equal(p[..., :4, :4], x) and p[..., 4, :].abs().sum() == 0 and p[..., :, 4].abs().sum() == 0
    assert tf_same_pad(x, 3, 1).shape == (1, 1, 6, 6)              # stride 1: one on each side
    conv = WNConv2d(1, 1, 3, 2, bias=False)
    out = conv(x)                                                    # output (0, 0) reads rows/cols 0..2
    torch.testing.assert_close(out[0, 0, 0, 0], (conv.kernel()[0, 0] * x[0, 0, :3, :3]).sum())


def test_factorized_reduce_reads_the_four_shifted_grids():
    torch.manual_seed(0)
    fr = FactorizedReduce(3, 10)
    assert [c.v.shape[0] for c in fr.convs] == [2, 2, 2, 4]
    x = torch.randn(1, 3, 4, 4)
    out = fr(x)
    s = x * torch.sigmoid(x)
    for conv, view, lo, hi in zip(fr.convs, (s, s[..., 1:, 1:], s[..., :, 1:], s[..., 1:, :]), (0, 2, 4, 6), (2, 4, 6, 10)):
        torch.testing.assert_close(out[:, lo:hi], F.conv2d(view, conv.kernel(), conv.bias, 2))


def test_bounds_are_5_tanh_x_over_10_and_a_smoothstep_with_flat_tails():
    x = torch.linspace(-20, 20, 81, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(nvae.bound(x, -5.0, 5.0), 5 * torch.tanh(x / 10))
    y = nvae.bound(x, -1.0, 5.0)
    t = ((x - -1) / 6).clamp(0, 1)
    torch.testing.assert_close(y, -1 + 6 * (3 * t ** 2 - 2 * t ** 3))
    y.sum().backward()
    outside = (x < -1) | (x > 5)
    assert (x.grad[outside] == 0).all() and (x.grad[~outside & (x > -1) & (x < 5)] > 0).all()
    assert float(nvae.bound(torch.tensor(-3.0), -1.0, 5.0)) == -1 and float(nvae.bound(torch.tensor(9.0), -1.0, 5.0)) == 5
    loc, sigma = nvae.gaussian(torch.tensor(3.0), torch.tensor(0.0), (-1.0, 5.0))
    torch.testing.assert_close(loc, 5 * torch.tanh(torch.tensor(0.3)))
    torch.testing.assert_close(sigma, torch.tensor(math.exp(-1 + 6 * (3 / 36 - 2 / 216)) + 0.01))   # 0.58 at 0


def test_likelihood_channel_layout_is_the_official_one():
    # ATTENTIVE.md 5: raw head channel of every (colour, mixture) mean and log-scale, and coefficients
    means = [[8, 9, 10, 11, 12], [21, 22, 26, 27, 28], [37, 38, 39, 40, 44]]
    scales = [[13, 17, 18, 19, 20], [29, 30, 31, 35, 36], [45, 46, 47, 48, 49]]
    coeffs = [[5, 14, 23, 32, 41], [6, 15, 24, 33, 42], [7, 16, 25, 34, 43]]
    params = torch.arange(50.).view(1, 50, 1, 1) / 100
    logits, m, s, c = nvae.dmol_params(params, 5)
    assert torch.equal(logits.flatten(), torch.arange(5.) / 100)
    assert torch.equal(m.flatten(1), torch.tensor(means).float().view(1, 15) / 100)
    assert torch.equal(s.flatten(1), torch.tensor(scales).float().view(1, 15) / 100)
    torch.testing.assert_close(c.flatten(1), torch.tanh(torch.tensor(coeffs).float().view(1, 15) / 100))


def dmol_case(seed=0, B=2, H=3, W=2):
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(B, 50, H, W, generator=g, dtype=torch.float64)
    params[:, 5:].view(B, 5, 9, H, W)[:, :, 3:] *= 0.3                  # means and log-scales near 0
    x = torch.randint(0, 256, (B, 3, H, W), generator=g).double() * 2 / 255 - 1
    x[0, :, 0, 0] = torch.tensor([1.0, 254 * 2 / 255 - 1, -1.0])         # the edges and the 254 oddity
    return params, x


def test_pixel_log_probs_of_the_true_values_sum_to_the_log_likelihood():
    params, x = dmol_case()
    vae = nvae.NVAE(dict(SMALL, num_mixtures=5))
    total = 0
    for c in range(3):
        lp = vae.pixel_log_probs(params, x, c)                          # (B, H, W, 256)
        k = torch.round((x[:, c] + 1) * 255 / 2).long()
        total = total + lp.gather(-1, k[..., None])[..., 0].sum((1, 2))
    torch.testing.assert_close(total, -nvae.dmol_nll(params, x, 5))


def test_pixel_probabilities_sum_to_one_plus_the_top_bin_under_the_0_99_edge():
    """The official top-edge test x > 0.99 scores 254 as P(X > 253.5): the 256 probabilities sum to
    1 + p(255): values 0..254 partition the line (254 takes the whole top, interior bins where
    cdf_delta > 1e-5 as here) and 255's P(X > 254.5) comes on top."""
    params, x = dmol_case()
    for c in range(3):
        p = nvae.dmol_channel_log_probs(params, x, c, 5).exp()
        torch.testing.assert_close(p.sum(-1), 1 + p[..., 255])
        torch.testing.assert_close(p[..., :255].sum(-1), torch.ones_like(p[..., 0]))
        assert (p[..., 254] > p[..., 255]).all()


def test_l2_penalty_of_a_tiny_model_by_hand():
    config = dict(nvae.DEFAULTS, num_layers=2, zdim=2, preproc_filters=4, dec_filters=3, enc_tower_blocks=1, dec_tower_blocks=1,
                  num_nodes=1, nonlocal_width=2, enc_key=2, dec_key=2, image_size=8, num_mixtures=1)
    torch.manual_seed(0)
    vae = nvae.NVAE(config)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    by_hand = 0.0
    for name, p in vae.named_parameters():
        leaf = name.rsplit('.', 1)[-1]
        owner = name.rsplit('.', 2)[-2]
        if leaf in ('v', 'log_g') or (leaf == 'bias' and owner not in ('context_norm', 'newest_norm', 'attended_norm',
                                                                         'feature_norm') and 'context_norms' not in name) \
                or owner == 'bn' or (leaf == 'scale' and owner == 'nonlocal_block'):
            lam = 1.5e-4
        elif leaf in ('weight', 'bias', 'gate', 'gamma', 'constant'):
            lam = 0.01                                                   # LayerNorms, gates, non-local gamma, constant
        else:
            raise AssertionError(name)
        by_hand += lam * float((p.detach().double() ** 2).sum())
    assert abs(float(vae.l2_penalty().detach()) - by_hand) < 1e-6 * by_hand


# -----------------------------------------------------------------------------
# attention: causality and the distribution over depth (carried over from test_attention.py)

SMALL = dict(nvae.DEFAULTS, num_layers=4, zdim=2, preproc_filters=4, dec_filters=3, enc_tower_blocks=1, dec_tower_blocks=1,
             num_nodes=1, nonlocal_width=2, enc_key=2, dec_key=2, image_size=8, num_mixtures=1)


def open_model(config=SMALL, seed=0):
    """Gates open and weights perturbed, so that every path matters."""
    torch.manual_seed(seed)
    vae = nvae.NVAE(config).double().eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.fill_(0.5) if name.endswith(('gate', 'gamma')) else p.add_(0.05 * torch.randn_like(p))
    return vae


def record_priors(vae, x=None, latents=None, n=2):
    seen = []

    def pick(i, prior, posterior):
        seen.append(tuple(t.detach().clone() for t in prior))
        if latents is not None:
            return latents[i]
        return posterior[0] if posterior is not None else prior[0]
    vae.top_down(x, pick, n)
    return seen


def test_depth_attention_weights_sum_to_one_over_depth_at_every_pixel():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 3, 4), torch.randn(2, 7, 5, 3, 4), torch.randn(2, 7, 6, 3, 4)
    out, alpha = depth_attention(q, k, v, 1.0)
    torch.testing.assert_close(alpha.sum(1), torch.ones(2, 3, 4))
    torch.testing.assert_close(out[1, :, 1, 2], torch.softmax(q[1, :, 1, 2] @ k[1, :, :, 1, 2].T, 0) @ v[1, :, :, 1, 2])


def test_prior_of_layer_l_ignores_every_later_layer_and_latent():
    vae = open_model()
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    base = record_priors(vae, latents=latents)
    for j in range(1, 4):
        changed = open_model()
        with torch.no_grad():
            for p in changed.layers[j].parameters():
                p.add_(0.5 * torch.randn_like(p))
        moved = [z + (1.0 if i == j else 0.0) for i, z in enumerate(latents)]
        seen = record_priors(changed, latents=moved)
        for i in range(1, j):                       # layers before j: untouched
            for a, b in zip(base[i], seen[i]):
                torch.testing.assert_close(a, b)
        assert not torch.allclose(base[j][0], seen[j][0])
        only_z = record_priors(vae, latents=moved)             # z_j alone moves priors after j only
        for i in range(1, j + 1):
            torch.testing.assert_close(base[i][0], only_z[i][0])
        if j < 3:
            assert not torch.allclose(base[j + 1][0], only_z[j + 1][0])


def test_posterior_of_layer_l_reads_only_features_closer_to_the_data():
    """Layer l's posterior attends over e_l, .., e_L: the encoder towers of layers < l (which only
    make e_0 .. e_{l-1}) cannot change it."""
    vae = open_model()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    latents = [torch.randn(2, 2, 4, 4, dtype=torch.float64) for _ in range(4)]

    def posteriors(model):
        seen = []
        model.top_down(x, lambda i, p, q: seen.append(q[0].detach().clone()) or latents[i])
        return seen
    base = posteriors(vae)
    changed = open_model()
    with torch.no_grad():
        for p in changed.layers[1].encoder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    seen = posteriors(changed)
    for i in (2, 3):
        torch.testing.assert_close(base[i], seen[i])
    assert not torch.allclose(base[1], seen[1]) and not torch.allclose(base[0], seen[0])


def test_gates_at_zero_give_the_model_without_depth_attention():
    """With both gates closed the attended terms vanish: the prior and posterior inputs are R(s) and
    R(u), whatever the other layers' contexts and features hold."""
    torch.manual_seed(0)
    att = DecoderAttention(6)
    s, q = torch.randn(2, 6, 3, 3), torch.randn(2, 2, 3, 3)
    contexts = [torch.randn(2, 8, 3, 3) for _ in range(3)]
    s1, prior_in = att(s, q, contexts)
    torch.testing.assert_close(prior_in, s1)
    torch.testing.assert_close(s1, s + F.gelu(att.context_norm(s), approximate='tanh'))
    enc = EncoderAttention(6)
    u, key = torch.randn(2, 6, 3, 3), torch.randn(2, 2, 3, 3)
    torch.testing.assert_close(enc(q, u, key, [torch.randn(2, 8, 3, 3)]), u + F.gelu(enc.feature_norm(u), approximate='tanh'))


def test_non_local_block_is_a_permutation_equivariant_residual():
    torch.manual_seed(0)
    block = NonLocalBlock(6, 3)
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(2, 6, 4, 4)
    perm = torch.randperm(16)
    out = block(x).flatten(2)[..., perm]
    torch.testing.assert_close(out, block(x.flatten(2)[..., perm].view(2, 6, 4, 4)).flatten(2))
    with torch.no_grad():
        block.gamma.zero_()
    torch.testing.assert_close(block(x), x)


def test_attend_on_cpu_gives_sdpas_numbers_and_gradients():
    # the plain product replaces SDPA on CPU for speed only: same values, same gradients
    torch.manual_seed(0)
    qkv = [torch.randn(3, 64, w, dtype=torch.float64, requires_grad=True) for w in (4, 4, 6)]
    ours, theirs = attend(*qkv), F.scaled_dot_product_attention(*qkv, scale=1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, qkv, g), torch.autograd.grad(theirs, qkv, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # no 1/sqrt(d): the weights are softmax(q . k)
    q, k = qkv[0].detach()[:1, :1], qkv[1].detach()[:1]
    torch.testing.assert_close(attend(q, k, torch.eye(64, dtype=torch.float64)[None]), torch.softmax(q @ k.mT, -1))


def test_sample_and_posterior_latents_keep_their_contracts():
    vae = open_model().float()
    images = vae.sample(3, temperature=0.5)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    zs = vae.posterior_latents(x)
    assert len(zs) == 4 and all(z.shape == (2, 2, 4, 4) for z in zs)
    fixed = vae.sample(2, latents=zs[:2])
    assert fixed.shape == (2, 3, 8, 8)


def test_top_down_hands_pick_prior_and_posterior_and_uses_its_z():
    vae = open_model()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    calls = []

    def pick(i, prior, posterior):
        calls.append(i)
        if i == 0:
            assert torch.equal(prior[0], torch.zeros_like(prior[0])) and torch.equal(prior[1], torch.ones_like(prior[1]))
        assert (prior[1] > 0).all() and (posterior[1] > 0).all() and posterior[0].shape == (2, 2, 4, 4)
        return posterior[0]
    params = vae.top_down(x, pick)
    assert calls == [0, 1, 2, 3] and params.shape == (2, 10, 8, 8)
    # the same z through forward in eval mode (eps = 0) gives the same likelihood
    out = vae(x, x, eps=[torch.zeros(2, 2, 4, 4, dtype=torch.float64)] * 4)
    torch.testing.assert_close(out['distortion'] * 192, vae.nll(params, x))


def test_model_py_builds_either_network_by_name():
    import model
    with torch.device('meta'):
        assert isinstance(model.build(dict(SMALL)), nvae.NVAE)
        assert model.n_layers(model.build(dict(SMALL))) == 4


def test_bernoulli_likelihood_scores_the_bits_and_reads_them_as_2b_minus_1():
    import model
    config = dict(SMALL, likelihood='bernoulli', image_channels=1)
    torch.manual_seed(0)
    vae = nvae.NVAE(config).double()
    bits = torch.bernoulli(torch.full((2, 1, 8, 8), 0.3, dtype=torch.float64))
    x, target = model.model_inputs(bits, bits.clone(), config)
    assert torch.equal(x, 2 * bits - 1) and torch.equal(target, bits)
    params = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    expected = -(bits * F.logsigmoid(params) + (1 - bits) * F.logsigmoid(-params)).sum((1, 2, 3))
    torch.testing.assert_close(vae.nll(params, target), expected)
    lp = vae.pixel_log_probs(params, target, 0)                       # (B, H, W, 2)
    torch.testing.assert_close(lp.gather(-1, bits[:, 0].long()[..., None])[..., 0].sum((1, 2)), -expected)
    out = vae(x, target)
    assert out['distortion'].shape == (2,) and torch.isfinite(out['distortion']).all()


def test_official_flags_hvae_cannot_build_are_refused():
    for flags in ('--encoder_hparams=use_se=True', '--decoder_hparams=nonlocop_hparams=[subsample=True]',
                  '--hparams=num_proc_blocks=2', '--decoder_attention_hparams=key_dim=8,query_dim=4'):
        with pytest.raises(ValueError):
            convert.official_attentive_config(flags)
    convert.official_attentive_config(ATTENTIVE_CIFAR + ' --train_hparams=num_gpus=4,batch_size=40')   # run flags pass


@pytest.mark.parametrize('config', [nvae.DEFAULTS, nvae.BASELINE], ids=['attentive', 'baseline'])
def test_paper_models_run_forward_and_top_down_on_the_meta_device(config):
    with torch.device('meta'):
        vae = nvae.NVAE(config)
        x = torch.empty(2, 3, 32, 32)
        out = vae(x, x)
        assert out['distortion'].shape == (2,) and out['kl'].shape == (2, 16) and vae.l2_penalty().shape == ()
        assert vae.eval().top_down(None, lambda i, p, q: p[0], 2).shape == (2, 50, 32, 32)
