"""
Building blocks shared by both models: the bottleneck residual block of the very deep VAE,
diagonal Gaussians parameterised by (mean, log-sigma), and the two likelihoods (the discretized
mixture of logistics for colour images, Bernoulli for binary ones).
Facts: ../shared/DESIGN.md sections 1.2, 1.4 and 1.5.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# -----------------------------------------------------------------------------
# the bottleneck residual block (VDVAE section 3, DESIGN.md 1.2)

def conv(c_in, c_out, k, zero_weight=False):
    """A k x k conv with 'same' padding, zero bias, PyTorch's default weight init."""
    c = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    nn.init.zeros_(c.bias)
    if zero_weight:
        nn.init.zeros_(c.weight)
    return c


def upsample(t, res):
    """Nearest-neighbour upsampling of (B, C, r, r) to (B, C, res, res), res a multiple of r.
    Same values as F.interpolate(mode='nearest'); written as expand + reshape because its backward
    is a plain sum, which torch.compile's CPU code generator handles (its lowering of
    interpolate's backward fails on 1x1 -> 4x4 with torch 2.13). Keeps a channels-last input
    channels-last."""
    B, C, r, _ = t.shape
    if r == res:
        return t
    f = res // r
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        nhwc = t.permute(0, 2, 3, 1)[:, :, None, :, None].expand(B, r, f, r, f, C)    # (B, r, f, r, f, C)
        return nhwc.reshape(B, res, res, C).permute(0, 3, 1, 2)
    return t[:, :, :, None, :, None].expand(B, C, r, f, r, f).reshape(B, C, res, res)


class Block(nn.Module):
    """GELU -> 1x1 -> GELU -> 3x3 -> GELU -> 3x3 -> GELU -> 1x1, optionally x + f(x), then an
    optional average pool. The middle convs are 1x1 at resolution <= 2. The last conv is zeroed
    (zero_last) or its weight multiplied by `scale` (sqrt(1/N) for the residual towers).
    With c_out > c_in the residual covers the first c_in channels and the rest pass as they are
    (the attentive VAE's keys and queries); `mixer` is an optional module applied to the
    bottleneck features after the first conv (the attentive VAE's non-local block)."""

    def __init__(self, c_in, c_mid, c_out, res, residual=True, zero_last=False, scale=1.0, down=None,
                 mixer=None):
        super().__init__()
        k = 3 if res > 2 else 1
        self.conv1 = conv(c_in, c_mid, 1)
        self.conv2 = conv(c_mid, c_mid, k)
        self.conv3 = conv(c_mid, c_mid, k)
        self.conv4 = conv(c_mid, c_out, 1, zero_weight=zero_last)
        with torch.no_grad():
            self.conv4.weight.mul_(scale)
        self.residual, self.down, self.mixer = residual, down, mixer

    def forward(self, x, activated=False):
        """activated: x is already gelu(input) (a non-residual block whose caller shares the GELU)."""
        h = self.conv1(x if activated else F.gelu(x))
        if self.mixer is not None:
            h = self.mixer(h)
        h = self.conv2(F.gelu(h))
        h = self.conv3(F.gelu(h))
        h = self.conv4(F.gelu(h))
        if self.residual:
            c = x.shape[1]
            out = x + h if h.shape[1] == c else torch.cat([x + h[:, :c], h[:, c:]], 1)
        else:
            out = h
        if self.down:  # the encoder's `RdK` blocks pool after the residual add
            out = F.avg_pool2d(out, self.down)
        return out


# -----------------------------------------------------------------------------
# diagonal Gaussians, parameterised by (mean, log-sigma), elementwise

def randn_as(t):
    """N(0, I) noise of t's shape, drawn in NCHW order whatever t's memory format (randn_like
    follows it): a channels-last model draws the same numbers as the plain one."""
    return torch.randn(t.shape, dtype=t.dtype, device=t.device)


def rand_as(t):
    """U(0, 1) noise of t's shape, in NCHW order (as randn_as)."""
    return torch.rand(t.shape, dtype=t.dtype, device=t.device)


def gaussian_sample(mean, logsigma, eps=None):
    """Reparameterised draw z = mean + sigma * eps; eps ~ N(0, I) unless given."""
    if eps is None:
        eps = randn_as(mean)
    return mean + torch.exp(logsigma) * eps


def gaussian_kl(mean_q, logsig_q, mean_p, logsig_p):
    """KL(q || p) per element, analytic, no clamps (DESIGN.md 1.4 step 5)."""
    return (-0.5 + logsig_p - logsig_q
            + 0.5 * (torch.exp(2 * logsig_q) + (mean_q - mean_p) ** 2) * torch.exp(-2 * logsig_p))


def gaussian_log_prob(z, mean, logsigma):
    """log N(z; mean, sigma^2) per element."""
    return -0.5 * math.log(2 * math.pi) - logsigma - 0.5 * ((z - mean) * torch.exp(-logsigma)) ** 2


# -----------------------------------------------------------------------------
# discretized mixture of logistics (PixelCNN++, as in VDVAE; DESIGN.md 1.5)
# params: (B, 10M, H, W) = M mixture logits, then for each colour c in (R, G, B):
# M means, M log-scales, M raw coefficients. Targets live in [-1, 1].

def dmol_split(params, n_colours=3):
    """-> logits (B, M, H, W); means, log_scales, coeffs each (B, 3, M, H, W)."""
    B, C, H, W = params.shape
    M = C // (3 * n_colours + 1)
    logits = params[:, :M]
    rest = params[:, M:].reshape(B, n_colours, 3, M, H, W)
    means, log_scales, coeffs = rest.unbind(2)
    return logits, means, log_scales.clamp(min=-7.0), torch.tanh(coeffs)


def logistic_bin_log_prob(x, means, log_scales, bits=8):
    """log P(bin of x) under logistics discretised to the 2^bits bins of [-1, 1], the edge bins
    open to infinity; elementwise (broadcasting). dmol_log_prob and the codec's per-symbol tables
    (dmol_channel_log_probs) share it, so that the codec codes under the model's own likelihood."""
    levels = 2 ** bits - 1
    half_bin = 1.0 / levels                                                    # 1/255 or 1/31
    centered = x - means
    inv_s = torch.exp(-log_scales)
    plus_in = inv_s * (centered + half_bin)
    min_in = inv_s * (centered - half_bin)
    log_cdf_plus = plus_in - F.softplus(plus_in)                               # log sigmoid(plus_in): x = -1 edge
    log_one_minus_cdf_min = -F.softplus(min_in)                                # log (1 - sigmoid(min_in)): x = 1 edge
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    # interior bins: log of the CDF difference, or log pdf(mid) * bin width where that underflows
    log_interior = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                               log_pdf_mid - math.log(levels / 2))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_interior))


def dmol_log_prob(params, target, bits=8):
    """log p(x) of every pixel, joint over the colours: (B, H, W), in nats.
    target (B, 3, H, W) on the grid 2k/(2^bits - 1) - 1."""
    logits, means, log_scales, coeffs = dmol_split(params)
    x = target.unsqueeze(2)                                                    # (B, 3, 1, H, W)
    r, g = x[:, 0], x[:, 1]
    # channel-autoregressive means on the ground truth: mu_G += c0 x_R; mu_B += c1 x_R + c2 x_G
    means = torch.stack([means[:, 0],
                         means[:, 1] + coeffs[:, 0] * r,
                         means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g], 1)  # (B, 3, M, H, W)
    log_probs = logistic_bin_log_prob(x, means, log_scales, bits)              # (B, 3, M, H, W)
    log_probs = log_probs.sum(1) + F.log_softmax(logits, 1)                   # (B, M, H, W)
    return torch.logsumexp(log_probs, 1)                                       # (B, H, W)


def dmol_nll(params, target, bits=8):
    """-log p(x) per image, summed over pixels and colours: (B,) nats."""
    return -dmol_log_prob(params, target, bits).sum((1, 2))


def dmol_channel_log_probs(params, target, c, bits=8):
    """log p(x_c = v | x_<c) of every value v of colour c, (B, H, W, 2^bits), in nats: the model's
    joint mixture (dmol_log_prob) read as a chain over the colours, with the mixture weights
    updated by the true earlier colours, p(m | x_<c) ~ pi_m prod_{c' < c} p(x_c' | m). The bin
    masses are differences of the mixture's CDF at the bin edges, a table for all values at once
    (dmol_log_prob's formula per value is ~10x slower); they agree with dmol_log_prob to float32
    rounding (absolute 1e-7 in a mass: below the coder's 2^-24 resolution), and summed over the
    colours at the true values they telescope to it. Colours >= c of target are never read (a
    decoder has not decoded them yet)."""
    logits, means, log_scales, coeffs = dmol_split(params)
    x = target[:, :c].unsqueeze(2)                                             # (B, c, 1, H, W)
    # the channel-autoregressive means, as in dmol_log_prob
    if c == 0:
        mean = means[:, 0]
    elif c == 1:
        mean = means[:, 1] + coeffs[:, 0] * x[:, 0]
    else:
        mean = means[:, 2] + coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]
    weights = F.log_softmax(logits, 1)                                          # (B, M, H, W)
    if c > 0:
        earlier = torch.stack([means[:, 0], means[:, 1] + coeffs[:, 0] * x[:, 0]][:c], 1)
        weights = weights + logistic_bin_log_prob(x, earlier, log_scales[:, :c], bits).sum(1)
    weights = torch.softmax(weights, 1)                                         # p(m | x_<c)
    levels = 2 ** bits - 1
    edges = torch.arange(levels + 2, device=params.device, dtype=params.dtype) * 2 / levels - 1 - 1 / levels
    edges[0], edges[-1] = -math.inf, math.inf                                  # the edge bins are open
    inv_s = torch.exp(-log_scales[:, c])
    out = []
    for b in range(len(params)):   # one image at a time: (M, H, W, K) is large
        s = inv_s[b, ..., None]
        cdf = torch.addcmul(-mean[b, ..., None] * s, s, edges).sigmoid_()                 # (M, H, W, K + 1)
        cdf = torch.einsum('mhw,mhwk->hwk', weights[b], cdf)      # the mixture's CDF: mix, then difference
        out.append(cdf[..., 1:] - cdf[..., :-1])                                       # (H, W, K)
    return torch.log(torch.stack(out).clamp(min=1e-30))


def bernoulli_channel_log_probs(logits):
    """log p(x = 0), log p(x = 1) of every pixel of one channel's logits (B, H, W) -> (B, H, W, 2)."""
    return torch.stack([-F.softplus(logits), -F.softplus(-logits)], -1)


def dmol_sample(params, bits=8):
    """Draw images on the [-1, 1] scale, (B, 3, H, W): Gumbel-max mixture choice, logistic draw,
    channel-autoregressive means on the already-sampled colours, each clamped to [-1, 1]."""
    logits, means, log_scales, coeffs = dmol_split(params)
    u = rand_as(logits).clamp(1e-5, 1 - 1e-5)
    k = torch.argmax(logits - torch.log(-torch.log(u)), 1, keepdim=True)       # (B, 1, H, W)
    pick = lambda t: torch.gather(t, 2, k.unsqueeze(1).expand(-1, 3, -1, -1, -1)).squeeze(2)
    means, log_scales, coeffs = pick(means), pick(log_scales), pick(coeffs)    # (B, 3, H, W)
    u = rand_as(means).clamp(1e-5, 1 - 1e-5)
    x = means + torch.exp(log_scales) * (torch.log(u) - torch.log1p(-u))
    r = x[:, 0].clamp(-1, 1)
    g = (x[:, 1] + coeffs[:, 0] * r).clamp(-1, 1)
    b = (x[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g).clamp(-1, 1)
    return torch.stack([r, g, b], 1)


def to_uint8(x, bits=8):
    """[-1, 1] -> uint8 on 0..255 via the nearest level of the 2^bits grid."""
    levels = 2 ** bits - 1
    k = torch.round((x.clamp(-1, 1) + 1) * levels / 2)
    return (k * 255 / levels).round().to(torch.uint8)


# -----------------------------------------------------------------------------
# Bernoulli likelihood for binary images (MNIST, OMNIGLOT); params are logits (B, C, H, W)

def bernoulli_nll(logits, target):
    """-log p(x) per image: (B,) nats; target in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction='none').sum((1, 2, 3))


def bernoulli_sample(logits):
    return torch.bernoulli(torch.sigmoid(logits)) * 2 - 1  # on the [-1, 1] scale like dmol_sample


# -----------------------------------------------------------------------------
# the NVAE-style residual towers of the official attentive VAE (ifiaposto/Deep_Attentive_VI,
# src/layers/resnet.py and weight_norm.py; ../shared/ATTENTIVE.md section 1). NCHW inside.

def deep_vae_init_(t, fan_in):
    """official: layers/util.py DeepVaeInit, variance scaling 0.33, fan_in, uniform:
    U(-sqrt(0.99 / fan_in), +sqrt(0.99 / fan_in))."""
    bound = math.sqrt(3 * 0.33 / fan_in)
    with torch.no_grad():
        return t.uniform_(-bound, bound)


def tf_same_pad(x, k, stride):
    """TensorFlow's 'same' padding: total max((ceil(n / s) - 1) s + k - n, 0) per axis, the smaller
    half before. With stride 2, k = 3 and an even size that is 0 before and 1 after (PyTorch's
    padding=1 would pad both sides and sample other positions)."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):                        # F.pad wants the last axis first
        total = max((-(-n // stride) - 1) * stride + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class WNConv2d(nn.Module):
    """official: layers/weight_norm.py WeightNorm around a Keras Conv2D. Direction v
    (C_out, C_in, k, k), log-gain log_g (C_out,) and bias; effective kernel v / ||v|| exp(log_g),
    the norm per output channel over (C_in, k, k), as tf.nn.l2_normalize."""

    def __init__(self, c_in, c_out, k=1, stride=1, bias=True, padding='same'):
        super().__init__()
        self.k, self.stride, self.padding = k, stride, padding
        self.v = nn.Parameter(deep_vae_init_(torch.empty(c_out, c_in, k, k), c_in * k * k))
        # official oddity: log_g is created as log(||v|| + 0.01), then overwritten at the first call
        # (WeightNorm._init_norm) by log(||v||) + 0.01, so the starting kernel is v * e^0.01
        self.log_g = nn.Parameter(torch.log(self.v.detach().flatten(1).norm(dim=1)) + 0.01)
        self.bias = nn.Parameter(deep_vae_init_(torch.empty(c_out), c_out)) if bias else None  # Keras: a bias' fan_in is its length

    def kernel(self):
        # v / ||v|| e^log_g in one fused op with its own backward (what torch.nn.utils.weight_norm
        # calls): 3.8x faster than the 7 element-wise ops over the paper model's 601 kernels, equal to
        # float rounding; without the 1e-12 floor, which only an all-zero filter would reach
        return torch._weight_norm(self.v, torch.exp(self.log_g).view(-1, 1, 1, 1), 0)

    def forward(self, x):
        if self.padding == 'same':
            x = tf_same_pad(x, self.k, self.stride)
        return F.conv2d(x, self.kernel(), self.bias, self.stride)


def swish(x):
    return x * torch.sigmoid(x)   # tf.nn.swish


class Node(nn.Module):
    """official: layers/resnet.py Conv2D inside a tower: conv(swish(NL(BN(x)))), NL the non-local
    block where the tower has one. With `upsample` the input is first nearest-upsampled x2
    (official: resize_nearest_neighbor, align_corners False), before the batch norm."""

    def __init__(self, c_in, c_out, stride=1, nonlocal_block=None, upsample=False, k=3):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in, eps=1e-5, momentum=0.1)   # Keras momentum 0.9 == PyTorch 0.1
        self.nonlocal_block = nonlocal_block
        self.conv = WNConv2d(c_in, c_out, k, stride)
        self.upsample = upsample

    def forward(self, x):
        if self.upsample:
            x = upsample(x, 2 * x.shape[-1])
        x = self.bn(x)
        if self.nonlocal_block is not None:
            x = self.nonlocal_block(x)
        return self.conv(swish(x))


class FactorizedReduce(nn.Module):
    """official: layers/resnet.py FactorizedReduce, the shortcut of a downsampling block: swish, then
    four 1x1 stride-2 'valid' convs on x, x[1:, 1:], x[:, 1:], x[1:, :] (rows, columns),
    C_out // 4 channels each but the last, which takes the rest; concatenated in that order."""

    def __init__(self, c_in, c_out):
        super().__init__()
        widths = [c_out // 4] * 3 + [c_out - 3 * (c_out // 4)]
        self.convs = nn.ModuleList([WNConv2d(c_in, w, 1, 2, padding='valid') for w in widths])

    def forward(self, x):
        x = swish(x)
        views = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(v) for conv, v in zip(self.convs, views)], 1)


class UpShortcut(nn.Module):
    """official: the shortcut of an upsampling block: bilinear x2 with align_corners True
    (resize_bilinear), then a 1x1 conv without bias and without activation (C -> C/2); a
    non-local block before that conv where the tower has them (official oddity: its convs inherit
    the shortcut's use_bias False)."""

    def __init__(self, c_in, c_out, nonlocal_block=None):
        super().__init__()
        self.nonlocal_block = nonlocal_block
        self.conv = WNConv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True)
        if self.nonlocal_block is not None:
            x = self.nonlocal_block(x)
        return self.conv(x)


class ResBlock(nn.Module):
    """official: layers/resnet.py ResNetBlock: shortcut(x) + 0.1 * f(x), f = `num_nodes` nodes.
    scale 0 keeps the width (identity shortcut); -2 halves the resolution and doubles the width
    (stride-2 first node, FactorizedReduce shortcut); +2 doubles the resolution and halves the
    width (upsampling first node, bilinear shortcut). `nonlocal_block(c)` makes one block for a
    node (or shortcut) of input width c, or None."""

    def __init__(self, c, scale, num_nodes=2, nonlocal_block=lambda c, bias=True: None):
        super().__init__()
        c_out = {0: c, -2: 2 * c, 2: c // 2}[scale]
        self.shortcut = {0: lambda: nn.Identity(), -2: lambda: FactorizedReduce(c, c_out),
                         2: lambda: UpShortcut(c, c_out, nonlocal_block(c, bias=False))}[scale]()
        nodes = [Node(c, c_out, 2 if scale < 0 else 1, nonlocal_block(c), upsample=scale > 0)]
        nodes += [Node(c_out, c_out, 1, nonlocal_block(c_out)) for _ in range(num_nodes - 1)]
        self.nodes = nn.ModuleList(nodes)
        self.c_out = c_out

    def forward(self, x):
        h = x
        for node in self.nodes:
            h = node(h)
        return self.shortcut(x) + 0.1 * h


class Tower(nn.Module):
    """official: layers/resnet.py ResNet: an optional stem (3x3 conv to `stem` channels, no
    activation), then one ResBlock per entry of `scales`. (B, c, H, W) -> (B, c_out, H', W')."""

    def __init__(self, c, scales, num_nodes=2, nonlocal_block=lambda c, bias=True: None, stem=None):
        super().__init__()
        self.stem = WNConv2d(c, stem, 3) if stem else None
        c = stem or c
        blocks = []
        for s in scales:
            blocks.append(ResBlock(c, s, num_nodes, nonlocal_block))
            c = blocks[-1].c_out
        self.blocks = nn.ModuleList(blocks)
        self.c_out = c

    grad_checkpoint = False   # --grad_checkpoint: recompute the tower in the backward pass

    def forward(self, x):
        if self.grad_checkpoint and torch.is_grad_enabled():
            calls = []

            def tower(x):   # the recompute in the backward pass must not move the batch-norm statistics again
                calls.append(x)
                with frozen_batch_norm_statistics(self) if len(calls) > 1 else contextlib.nullcontext():
                    return self.run(x)
            return checkpoint(tower, x, use_reentrant=False)
        return self.run(x)

    def run(self, x):
        if self.stem is not None:
            x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


@contextlib.contextmanager
def frozen_batch_norm_statistics(module):
    """Batch norms inside run as in training, then get their moving statistics (and counters)
    back as they were: a recomputed forward leaves no trace."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
