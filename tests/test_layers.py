"""
Specification of layers.py: the bottleneck block, diagonal Gaussians, the discretized mixture of
logistics and the Bernoulli likelihood. Facts: ../shared/DESIGN.md sections 1.2, 1.4 and 1.5.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
import torch.nn.functional as F

import layers


def sigmoid(a):
    return 1.0 / (1.0 + math.exp(-a))


# -----------------------------------------------------------------------------
# the bottleneck residual block

def test_conv_is_same_padded_with_zero_bias_and_optionally_zero_weight():
    c = layers.conv(3, 5, 3)
    assert c.kernel_size == (3, 3) and c.padding == (1, 1)
    assert torch.equal(c.bias, torch.zeros(5))
    assert c.weight.abs().sum() > 0
    assert layers.conv(3, 5, 1).padding == (0, 0)
    z = layers.conv(3, 5, 1, zero_weight=True)
    assert torch.equal(z.weight, torch.zeros(5, 3, 1, 1)) and torch.equal(z.bias, torch.zeros(5))
    assert z(torch.randn(2, 3, 4, 4)).shape == (2, 5, 4, 4)


def test_block_middle_convs_are_3x3_above_resolution_2_and_1x1_at_or_below():
    for res, k in ((32, 3), (4, 3), (3, 3), (2, 1), (1, 1)):
        b = layers.Block(8, 2, 6, res)
        assert (b.conv1.kernel_size, b.conv2.kernel_size, b.conv3.kernel_size, b.conv4.kernel_size) == \
               ((1, 1), (k, k), (k, k), (1, 1)), res
        assert (b.conv1.in_channels, b.conv1.out_channels, b.conv2.out_channels, b.conv4.out_channels) == (8, 2, 2, 6)


def test_block_is_pre_activation_gelu_bottleneck_with_residual_add():
    torch.manual_seed(0)
    b = layers.Block(8, 3, 8, res=5)
    with torch.no_grad():
        for c in (b.conv1, b.conv2, b.conv3, b.conv4):
            c.bias.normal_()  # biases start at zero; make them count
    x = torch.randn(2, 8, 5, 5)
    f = x
    for c in (b.conv1, b.conv2, b.conv3, b.conv4):
        f = F.conv2d(F.gelu(f), c.weight, c.bias, padding=c.kernel_size[0] // 2)
    torch.testing.assert_close(b(x), x + f, rtol=0, atol=1e-6)
    b.residual = False
    torch.testing.assert_close(b(x), f, rtol=0, atol=1e-6)


def test_block_keeps_the_spatial_size_and_zero_last_makes_it_identity_or_zero():
    x = torch.randn(3, 6, 7, 7)
    res = layers.Block(6, 2, 6, 7, zero_last=True)
    assert torch.equal(res.conv4.weight, torch.zeros_like(res.conv4.weight))
    assert torch.equal(res(x), x)                     # x + 0
    nonres = layers.Block(6, 2, 10, 7, residual=False, zero_last=True)
    assert torch.equal(nonres(x), torch.zeros(3, 10, 7, 7))
    assert layers.Block(6, 2, 6, 7)(x).shape == x.shape


@pytest.mark.parametrize('r, res', [(1, 4), (4, 8), (8, 32), (5, 5)])
def test_upsample_equals_nearest_interpolate_and_its_gradient_sums_each_block(r, res):
    t = torch.randn(2, 3, r, r, requires_grad=True)
    up = layers.upsample(t, res)
    assert torch.equal(up, F.interpolate(t, size=(res, res)))
    g = torch.randn(2, 3, res, res)
    up.backward(g)
    f = res // r
    assert torch.allclose(t.grad, g.unflatten(3, (r, f)).unflatten(2, (r, f)).sum((3, 5)), atol=1e-6)


def test_upsample_keeps_channels_last():
    t = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    up = layers.upsample(t, 16)
    assert up.is_contiguous(memory_format=torch.channels_last) and not up.is_contiguous()
    assert torch.equal(up, F.interpolate(t.contiguous(), size=(16, 16)))


@pytest.mark.parametrize('down', [2, 4])
def test_block_down_average_pools_after_the_residual_add(down):
    torch.manual_seed(1)
    pooled = layers.Block(4, 2, 4, 8, down=down)
    torch.manual_seed(1)
    plain = layers.Block(4, 2, 4, 8)
    x = torch.randn(2, 4, 8, 8)
    out = pooled(x)
    assert out.shape == (2, 4, 8 // down, 8 // down)
    torch.testing.assert_close(out, F.avg_pool2d(plain(x), down), rtol=0, atol=0)


def test_block_scale_multiplies_only_the_last_conv_weight():
    s = math.sqrt(1 / 43)
    torch.manual_seed(3)
    unscaled = layers.Block(8, 2, 8, 4, scale=1.0)
    torch.manual_seed(3)
    scaled = layers.Block(8, 2, 8, 4, scale=s)
    assert torch.equal(scaled.conv4.weight, unscaled.conv4.weight * s)
    assert not torch.equal(scaled.conv4.weight, unscaled.conv4.weight)
    for name in ('conv1', 'conv2', 'conv3'):
        assert torch.equal(getattr(scaled, name).weight, getattr(unscaled, name).weight)
    assert torch.equal(scaled.conv4.bias, torch.zeros(8))


# -----------------------------------------------------------------------------
# diagonal Gaussians

def test_gaussian_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(0)
    z, mean, logsig = torch.randn(3, 1000, generator=g, dtype=torch.float64) * torch.tensor([[3.], [1.], [1.5]], dtype=torch.float64)
    expected = torch.distributions.Normal(mean, logsig.exp()).log_prob(z)
    torch.testing.assert_close(layers.gaussian_log_prob(z, mean, logsig), expected, rtol=1e-12, atol=1e-12)


def test_gaussian_sample_is_mean_plus_sigma_times_eps():
    mean, logsig, eps = torch.tensor([0.5, -2.0]), torch.tensor([0.0, math.log(3.0)]), torch.tensor([1.5, -0.5])
    torch.testing.assert_close(layers.gaussian_sample(mean, logsig, eps), torch.tensor([2.0, -3.5]))
    torch.manual_seed(0)
    z = layers.gaussian_sample(torch.full((200_000,), 1.5), torch.full((200_000,), math.log(0.5)))
    assert abs(z.mean().item() - 1.5) < 0.01 and abs(z.std().item() - 0.5) < 0.005


# (mean_q, logsig_q, mean_p, logsig_p) pairs with KLs between about 0.1 and 3 nats
KL_CASES = torch.tensor([[0.0, 0.0, 1.0, 0.0],
                         [0.5, -1.0, -0.3, 0.2],
                         [-1.0, 0.7, 0.4, -0.1],
                         [2.0, -0.5, 0.0, 0.0]], dtype=torch.float64)


def test_gaussian_kl_matches_its_closed_form_and_torch_distributions():
    mq, lq, mp, lp = KL_CASES.T
    assert layers.gaussian_kl(mq[:1], lq[:1], mp[:1], lp[:1]).item() == pytest.approx(0.5)  # unit shift: 1/2
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mq, lq.exp()),
                                                 torch.distributions.Normal(mp, lp.exp()))
    torch.testing.assert_close(layers.gaussian_kl(mq, lq, mp, lp), expected, rtol=1e-12, atol=1e-12)


def test_gaussian_kl_equals_a_monte_carlo_estimate_within_one_percent():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for mq, lq, mp, lp in KL_CASES.tolist():
        z = mq + math.exp(lq) * torch.randn(n, generator=g, dtype=torch.float64)
        full = lambda v: torch.full_like(z, v)
        mc = (layers.gaussian_log_prob(z, full(mq), full(lq)) - layers.gaussian_log_prob(z, full(mp), full(lp))).mean()
        kl = layers.gaussian_kl(*(torch.tensor(v, dtype=torch.float64) for v in (mq, lq, mp, lp)))
        assert abs(mc.item() / kl.item() - 1) < 0.01, (mq, lq, mp, lp, mc.item(), kl.item())


def test_gaussian_kl_is_zero_for_identical_distributions():
    m, l = torch.randn(1000) * 3, torch.randn(1000) * 2
    torch.testing.assert_close(layers.gaussian_kl(m, l, m, l), torch.zeros(1000), rtol=0, atol=1e-6)
    m, l = m.double(), l.double()
    torch.testing.assert_close(layers.gaussian_kl(m, l, m, l), torch.zeros(1000, dtype=torch.float64), rtol=0, atol=1e-12)


def test_gaussian_kl_gradients_are_finite_and_analytic():
    mq, lq, mp, lp = (c.clone().requires_grad_() for c in KL_CASES.T)
    layers.gaussian_kl(mq, lq, mp, lp).sum().backward()
    for t in (mq, lq, mp, lp):
        assert torch.isfinite(t.grad).all()
    with torch.no_grad():
        vq, vp, d = torch.exp(2 * lq), torch.exp(2 * lp), mq - mp
        torch.testing.assert_close(mq.grad, d / vp)
        torch.testing.assert_close(mp.grad, -d / vp)
        torch.testing.assert_close(lq.grad, vq / vp - 1)
        torch.testing.assert_close(lp.grad, 1 - (vq + d ** 2) / vp)


# -----------------------------------------------------------------------------
# discretized mixture of logistics

def pack(logits, means, log_scales, coeffs):
    """Per-pixel parameters -> the 10M channels of the head.
    logits (P, M); means, log_scales, raw coeffs (P, 3, M) -> (P, 10M)."""
    P = logits.shape[0]
    return torch.cat([logits, torch.stack([means, log_scales, coeffs], 2).reshape(P, -1)], 1)


def log_probs(params, target, bits=8):
    """params (P, 10M), target (P or 1, N, 3) -> dmol_log_prob of each (parameter set, target), (P, N)."""
    P, C = params.shape
    N = target.shape[1]
    p = params.reshape(P, C, 1, 1).expand(P, C, 1, N)
    t = target.permute(0, 2, 1).reshape(-1, 3, 1, N).expand(P, 3, 1, N)
    return layers.dmol_log_prob(p, t, bits)[:, 0]


def grid(bits):
    levels = 2 ** bits - 1
    return torch.arange(levels + 1) * 2 / levels - 1


def hand_log_prob(logits, means, log_scales, coeffs, x, bits=8):
    """One pixel by hand (DESIGN.md 1.5). logits [M]; means, log_scales, coeffs [3][M]; x [3]."""
    h = 1 / (2 ** bits - 1)
    total = 0.0
    norm = math.log(sum(math.exp(a) for a in logits))
    for m in range(len(logits)):
        c = [math.tanh(coeffs[i][m]) for i in range(3)]
        mu = [means[0][m], means[1][m] + c[0] * x[0], means[2][m] + c[1] * x[0] + c[2] * x[1]]
        p = math.exp(logits[m] - norm)
        for i in range(3):
            s = math.exp(max(log_scales[i][m], -7.0))
            if x[i] == -1:
                p *= sigmoid((x[i] - mu[i] + h) / s)
            elif x[i] == 1:
                p *= 1 - sigmoid((x[i] - mu[i] - h) / s)
            else:
                delta = sigmoid((x[i] - mu[i] + h) / s) - sigmoid((x[i] - mu[i] - h) / s)
                if delta < 1e-5:  # underflow guard: the density at the bin centre times the bin width 2h
                    e = math.exp(-abs(x[i] - mu[i]) / s)
                    delta = e / (s * (1 + e) ** 2) * 2 * h
                p *= delta
        total += p
    return math.log(total)


def test_dmol_split_reads_logits_then_means_log_scales_coeffs_per_colour():
    M = 2
    params = torch.arange(10 * M, dtype=torch.float32).reshape(1, 10 * M, 1, 1) / 10 - 0.55
    logits, means, log_scales, coeffs = layers.dmol_split(params)
    assert logits.flatten().tolist() == params.flatten()[:2].tolist()
    flat = params.flatten()
    for c in range(3):
        base = M + 3 * M * c
        torch.testing.assert_close(means[0, c].flatten(), flat[base:base + M])
        torch.testing.assert_close(log_scales[0, c].flatten(), flat[base + M:base + 2 * M].clamp(min=-7))
        torch.testing.assert_close(coeffs[0, c].flatten(), torch.tanh(flat[base + 2 * M:base + 3 * M]))


def test_dmol_log_scales_are_clamped_at_minus_7():
    base = pack(torch.zeros(1, 1), torch.tensor([[[0.1], [0.0], [-0.2]]]),
                torch.full((1, 3, 1), -7.0), torch.zeros(1, 3, 1))
    lower = pack(torch.zeros(1, 1), torch.tensor([[[0.1], [0.0], [-0.2]]]),
                 torch.full((1, 3, 1), -12.0), torch.zeros(1, 3, 1))
    x = torch.tensor([[[0.1, 0.0, -0.2], [0.1 + 2 / 255, 0.0, -0.2]]])
    assert torch.equal(log_probs(base, x), log_probs(lower, x))


def test_dmol_nll_matches_a_hand_computation_at_interior_and_edge_values():
    # M = 1: pixel 0 has R interior, G at the -1 edge, B at the +1 edge; pixel 1 the other way round
    means = [[0.1], [0.3], [0.6]]
    log_scales = [[-2.0], [-1.0], [-0.5]]
    coeffs = [[0.7], [-1.2], [0.4]]
    pixels = [[153 / 127.5 - 1, -1.0, 1.0], [1.0, 64 / 127.5 - 1, -1.0]]
    expected = -sum(hand_log_prob([0.0], means, log_scales, coeffs, x) for x in pixels)
    params = pack(torch.zeros(1, 1, dtype=torch.float64), torch.tensor([means], dtype=torch.float64),
                  torch.tensor([log_scales], dtype=torch.float64), torch.tensor([coeffs], dtype=torch.float64))
    image_params = params.reshape(1, 10, 1, 1).expand(1, 10, 1, 2)
    target = torch.tensor(pixels, dtype=torch.float64).T.reshape(1, 3, 1, 2)
    nll = layers.dmol_nll(image_params, target)
    assert nll.shape == (1,)
    assert nll.item() == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(nll, -layers.dmol_log_prob(image_params, target).sum((1, 2)))


def test_dmol_mixture_log_prob_matches_a_hand_computation():
    logits = [0.5, -1.0, 2.0]
    means = [[0.1, -0.4, 0.9], [0.0, 0.2, -0.8], [0.5, -0.5, 0.3]]
    log_scales = [[-2.0, -3.0, -1.0], [-1.5, -2.5, -0.5], [-2.2, -1.0, -4.0]]
    coeffs = [[0.3, -0.9, 1.5], [0.2, 0.0, -0.7], [-1.1, 0.6, 0.1]]
    params = pack(torch.tensor([logits], dtype=torch.float64), torch.tensor([means], dtype=torch.float64),
                  torch.tensor([log_scales], dtype=torch.float64), torch.tensor([coeffs], dtype=torch.float64))
    pixels = [[0.2, -1.0, 1.0], [-0.4 + 2 / 255, 0.0 + 4 / 255, -0.6], [1.0, 1.0, 1.0]]
    pixels = [[round((v + 1) * 127.5) / 127.5 - 1 for v in x] for x in pixels]   # onto the 8-bit grid
    got = log_probs(params, torch.tensor([pixels], dtype=torch.float64))[0]
    for i, x in enumerate(pixels):
        assert got[i].item() == pytest.approx(hand_log_prob(logits, means, log_scales, coeffs, x), rel=1e-9)


def test_dmol_5bit_uses_half_bins_of_1_over_31():
    means, log_scales, coeffs = [[0.05], [-0.2], [0.4]], [[-1.5], [-2.0], [-1.0]], [[0.5], [0.5], [-0.5]]
    x = [2 * 19 / 31 - 1, 2 * 5 / 31 - 1, 1.0]
    params = pack(torch.zeros(1, 1, dtype=torch.float64), *(torch.tensor([v], dtype=torch.float64)
                                                            for v in (means, log_scales, coeffs)))
    got = log_probs(params, torch.tensor([[x]], dtype=torch.float64), bits=5)[0, 0]
    assert got.item() == pytest.approx(hand_log_prob([0.0], means, log_scales, coeffs, x, bits=5), rel=1e-9)


def test_dmol_underflowing_bins_fall_back_to_the_density_times_the_bin_width():
    # R: logistic at 0 with scale 0.05, target -0.6: the bin holds ~1e-6 < 1e-5 of the mass
    s, x, h = 0.05, 51 / 127.5 - 1, 1 / 255                                    # x = -0.6
    exact = sigmoid((x + h) / s) - sigmoid((x - h) / s)
    assert exact < 1e-5
    mid = x / s
    fallback = mid - math.log(s) - 2 * math.log1p(math.exp(mid)) - math.log(127.5)   # log pdf(x) + log(2/255)
    # G and B pinned: their logistics sit far beyond the +1 edge, so p(G = B = 1) = 1
    params = pack(torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[[0.0], [50.0], [50.0]]], dtype=torch.float64),
                  torch.tensor([[[math.log(s)], [0.0], [0.0]]], dtype=torch.float64), torch.zeros(1, 3, 1, dtype=torch.float64))
    got = log_probs(params, torch.tensor([[[x, 1.0, 1.0]]], dtype=torch.float64))[0, 0].item()
    assert got == pytest.approx(fallback, rel=1e-9)
    # the midpoint rule on an exponential tail is off by sinh(h/s)/(h/s) - 1 = (h/s)^2/6 ~ 1e-3
    assert math.exp(got) == pytest.approx(exact, rel=2e-3)


def random_dmol(P, M, seed, dtype=torch.float32):
    """P >= 2 random parameter sets; sets 0 and 1 put their means near -1 and 1 so the edge bins carry mass."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(P, M, generator=g) * 2
    means = torch.rand(P, 3, M, generator=g) * 2.4 - 1.2
    means[0], means[1] = -0.98, 0.99
    log_scales = torch.rand(P, 3, M, generator=g) * 5.5 - 5
    coeffs = torch.randn(P, 3, M, generator=g) * 1.5
    return [t.to(dtype) for t in (logits, means, log_scales, coeffs)]


def pinned(means, colours):
    """Move the logistics of the given colours far beyond the +1 edge: p(x_c = 1 | ...) = 1."""
    means = means.clone()
    means[:, colours] = 50.0
    return means


@pytest.mark.parametrize('M', [1, 3])
def test_dmol_8bit_probabilities_sum_to_one_for_R_then_G_given_R_then_B_given_R_and_G(M):
    P = 3
    logits, means, log_scales, coeffs = random_dmol(P, M, seed=M)
    v = grid(8)
    ones = torch.ones(256)
    # R: with G and B pinned at 1, the joint is p(R)
    params_r = pack(logits, pinned(means, [1, 2]), log_scales, coeffs)
    log_p_r = log_probs(params_r, torch.stack([v, ones, ones], 1)[None])            # (P, 256)
    torch.testing.assert_close(log_p_r.exp().double().sum(1), torch.ones(P, dtype=torch.float64), rtol=0, atol=1e-4)
    assert log_p_r[0, 0].exp() > 0.01 and log_p_r[1, -1].exp() > 0.01              # the edge bins hold mass
    # G given R: with B pinned, sum over G of p(r, G) = p(r) for each of the 256 values r
    params_rg = pack(logits, pinned(means, [2]), log_scales, coeffs)
    r, gg = torch.meshgrid(v, v, indexing='ij')
    targets = torch.stack([r.flatten(), gg.flatten(), torch.ones(256 * 256)], 1)[None]
    log_p_rg = log_probs(params_rg, targets).reshape(P, 256, 256)                  # (P, r, G)
    torch.testing.assert_close(torch.logsumexp(log_p_rg, 2), log_p_r, rtol=0, atol=1e-4)
    # B given R and G: sum over B of p(r, g, B) = p(r, g) for 64 pairs (r, g), the four corners included
    params = pack(logits, means, log_scales, coeffs)
    g = torch.Generator().manual_seed(10 + M)
    ri = torch.cat([torch.tensor([0, 0, 255, 255]), torch.randint(0, 256, (60,), generator=g)])
    gi = torch.cat([torch.tensor([0, 255, 0, 255]), torch.randint(0, 256, (60,), generator=g)])
    rr, bb = v[ri].repeat_interleave(256), v.repeat(64)
    targets = torch.stack([rr, v[gi].repeat_interleave(256), bb], 1)[None]
    log_p = log_probs(params, targets).reshape(P, 64, 256)
    torch.testing.assert_close(torch.logsumexp(log_p, 2), log_p_rg[:, ri, gi], rtol=0, atol=1e-4)


def test_dmol_5bit_joint_over_all_32_cubed_values_sums_to_one():
    P = 3
    params = pack(*random_dmol(P, 3, seed=5))
    v = grid(5)
    r, g, b = torch.meshgrid(v, v, v, indexing='ij')
    targets = torch.stack([r.flatten(), g.flatten(), b.flatten()], 1)[None]
    total = log_probs(params, targets, bits=5).double().exp().sum(1)
    torch.testing.assert_close(total, torch.ones(P, dtype=torch.float64), rtol=0, atol=1e-4)


def test_dmol_half_the_mass_of_a_logistic_on_an_edge_bin_boundary_is_one_bit():
    for bits in (8, 5):
        h = 1 / (2 ** bits - 1)
        params = pack(torch.zeros(1, 1), torch.tensor([[[1 - h], [1 - h], [-1 + h]]]),
                      torch.zeros(1, 3, 1), torch.zeros(1, 3, 1))
        lp = log_probs(params, torch.tensor([[[1.0, 1.0, -1.0]]]), bits)
        assert (-lp / 3 / math.log(2)).item() == pytest.approx(1.0, abs=1e-6)   # bits per dim


def dmol_image_params(logits, means, log_scales, coeffs, n):
    """One parameter set repeated over n pixels of a (1, 10M, 1, n) head output."""
    p = pack(logits, means, log_scales, coeffs)
    return p.reshape(1, -1, 1, 1).repeat(1, 1, 1, n)


def test_dmol_sample_with_tiny_scale_returns_clamped_autoregressive_means():
    # logistic noise is at most e^-7 * log((1 - 1e-5) / 1e-5) away from the mean (scale clamped at e^-7)
    d = math.exp(-7) * math.log((1 - 1e-5) / 1e-5) * (1 + 1e-6)
    raw = torch.tensor([[[math.atanh(0.5)], [math.atanh(-0.5)], [math.atanh(0.25)]]])
    n = 2000
    torch.manual_seed(0)
    # pixel kind 1: R clamps to 1 exactly; g = 0.2 + 0.5 * 1; b = -0.3 - 0.5 * 1 + 0.25 * g
    x = layers.dmol_sample(dmol_image_params(torch.zeros(1, 1), torch.tensor([[[1.5], [0.2], [-0.3]]]),
                                             torch.full((1, 3, 1), -10.0), raw, n))
    assert x.shape == (1, 3, 1, n)
    r, g, b = x[0, :, 0]
    assert torch.equal(r, torch.ones(n))
    assert (g - 0.7).abs().max() <= d
    assert (b - (-0.8 + 0.25 * 0.7)).abs().max() <= d + 0.25 * d
    # pixel kind 2: R clamps to -1, G = clamp(5 - 0.5 * -1) = 1, b = -0.2 - 0.5 * -1 + 0.25 * 1
    x = layers.dmol_sample(dmol_image_params(torch.zeros(1, 1), torch.tensor([[[-3.0], [5.0], [-0.2]]]),
                                             torch.full((1, 3, 1), -7.0), raw, n))
    r, g, b = x[0, :, 0]
    assert torch.equal(r, -torch.ones(n)) and torch.equal(g, torch.ones(n))
    assert (b - 0.55).abs().max() <= d


def test_dmol_sample_picks_the_mixture_component_with_a_dominant_logit():
    d = math.exp(-7) * math.log((1 - 1e-5) / 1e-5) * (1 + 1e-6)
    means = torch.tensor([[[-0.5, 0.5], [-0.5, 0.5], [-0.5, 0.5]]])
    small, zero = torch.full((1, 3, 2), -7.0), torch.zeros(1, 3, 2)
    torch.manual_seed(0)
    for logits, value in (([0.0, 30.0], 0.5), ([30.0, 0.0], -0.5)):
        x = layers.dmol_sample(dmol_image_params(torch.tensor([logits]), means, small, zero, 5000))
        assert (x - value).abs().max() <= d
    # and in proportion to softmax(logits) otherwise (three components: with two, a Gumbel of the
    # wrong sign would still give the right odds, the difference of two Gumbels being symmetric)
    means = torch.tensor([[[-0.5, 0.0, 0.5]] * 3])
    probs = torch.tensor([0.2, 0.3, 0.5])
    x = layers.dmol_sample(dmol_image_params(probs.log()[None], means, torch.full((1, 3, 3), -7.0),
                                             torch.zeros(1, 3, 3), 60_000))
    picked = torch.round(x[0, 0, 0] * 2).long() + 1                      # -0.5, 0, 0.5 -> 0, 1, 2
    freq = torch.bincount(picked, minlength=3).float() / 60_000
    assert (freq - probs).abs().max() < 0.01, freq


def test_dmol_sample_draws_R_with_the_probabilities_of_dmol_log_prob():
    logits, means, log_scales, coeffs = (t[2:] for t in random_dmol(3, 2, seed=7))   # set 2: random means
    n = 200_000
    torch.manual_seed(0)
    x = layers.dmol_sample(dmol_image_params(logits, means, log_scales, coeffs, n), bits=5)
    level = torch.round(layers.to_uint8(x[0, 0, 0], bits=5).float() * 31 / 255).long()
    freq = torch.bincount(level, minlength=32).float() / n
    v = grid(5)
    prob = log_probs(pack(logits, pinned(means, [1, 2]), log_scales, coeffs),
                     torch.stack([v, torch.ones(32), torch.ones(32)], 1)[None], bits=5)[0].exp()
    assert (freq - prob).abs().max() < 0.006


def test_to_uint8_maps_the_grid_to_its_levels_and_clamps():
    k = torch.arange(256)
    assert torch.equal(layers.to_uint8(k / 127.5 - 1), k.to(torch.uint8))
    assert layers.to_uint8(torch.tensor([-1.0, 1.0])).tolist() == [0, 255]
    assert layers.to_uint8(torch.tensor([-3.0, 2.5])).tolist() == [0, 255]
    assert layers.to_uint8(k / 127.5 - 1 + 0.4 / 127.5).tolist() == k.clamp(max=255).tolist()
    assert layers.to_uint8((k[:-1] / 127.5 - 1) + 0.6 / 127.5).tolist() == (k[:-1] + 1).tolist()
    j = torch.arange(32)
    assert torch.equal(layers.to_uint8(2 * j / 31 - 1, bits=5), torch.round(j * 255 / 31).to(torch.uint8))
    assert layers.to_uint8(torch.zeros(2, 3)).dtype == torch.uint8


# -----------------------------------------------------------------------------
# Bernoulli likelihood

def test_bernoulli_nll_matches_a_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.0, 3.5, -0.25, 1.0], dtype=torch.float64).reshape(1, 1, 2, 3)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64).reshape(1, 1, 2, 3)
    expected = -(math.log(sigmoid(2.0)) + math.log(1 - sigmoid(-1.0)) + math.log(sigmoid(0.0))
                 + math.log(1 - sigmoid(3.5)) + math.log(1 - sigmoid(-0.25)) + math.log(sigmoid(1.0)))
    nll = layers.bernoulli_nll(logits.expand(2, 1, 2, 3), target.expand(2, 1, 2, 3))
    assert nll.shape == (2,)
    torch.testing.assert_close(nll, torch.full((2,), expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_bernoulli_sample_is_plus_minus_one_with_the_sigmoid_probability():
    torch.manual_seed(0)
    x = layers.bernoulli_sample(torch.tensor([50.0, -50.0]).reshape(1, 1, 1, 2))
    assert x.flatten().tolist() == [1.0, -1.0]
    x = layers.bernoulli_sample(torch.full((1, 1, 100, 400), math.log(0.3 / 0.7)))
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    assert abs((x > 0).float().mean().item() - 0.3) < 0.01
