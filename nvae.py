"""
The NVAE-style network of the official attentive VAE (Apostolopoulou et al., "Deep Attentive
Variational Inference", ICLR 2022; github:ifiaposto/Deep_Attentive_VI at e1077aa), and its
baseline without attention (the official NVAE configuration): the same code with the attention
widths set to 0. Facts: ../shared/ATTENTIVE.md (section numbers below are that file's).

official: model/vae.py DeepVAE. A preprocessing tower takes the image to e_L (B, E, h, w) at half
resolution; one encoder tower per layer walks bottom-up e_j = T^enc_j(e_{j+1}); the top-down pass
starts from a learned constant (layer 0) and, for i >= 1, runs
    t_i = T^dec_i(W[s_{i-1}, z_{i-1}])          (merge conv, then the decoder tower)
the prior reads the (attended) state, the posterior the (attended) encoder features merged with
the prior's input, both diagonal Gaussians with bounded parameters; a final merge, a postprocess
tower and a 3x3 head give the likelihood's parameters. The loss is in nats per image plus the
Keras L2 penalty (section 6): mean(distortion * D) + mean(rate * D) + l2_penalty(), D = C H W.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import ChannelNorm, DecoderAttention, EncoderAttention, NonLocalBlock
from layers import Tower, WNConv2d, deep_vae_init_, rand_as, randn_as, to_uint8

# the official 16-layer CIFAR-10 attentive VAE (ATTENTIVE.md sections 0 and 11); hvae names
DEFAULTS = dict(model='nvae', image_size=32, image_channels=3, pad=0, likelihood='dmol', num_mixtures=5, bits=8,
                num_layers=16, zdim=20,
                preproc_filters=128, preproc_scales=(0, -2), postproc_scales=(2, 0), dec_filters=128,
                enc_tower_blocks=2, dec_tower_blocks=2, num_nodes=2,
                preproc_nonlocal=True, enc_nonlocal=True, dec_nonlocal=True, postproc_nonlocal=False,
                merge_decoder_nonlocal=False, merge_encoder_nonlocal=False, nonlocal_width=32,
                enc_key=20, dec_key=20, enc_layer_norm=True, dec_layer_norm=True, trainable_scales=False,
                posterior_bounds=(-5.0, 5.0), prior_bounds=(-1.0, 5.0), posterior_noise=0.001, prior_noise=0.001)
# the official NVAE baseline (section 11): no attention, no non-local blocks, no log-scale noise
BASELINE = dict(DEFAULTS, preproc_nonlocal=False, enc_nonlocal=False, dec_nonlocal=False, enc_key=0, dec_key=0,
                enc_layer_norm=False, dec_layer_norm=False,
                prior_bounds=(-5.0, 5.0), posterior_noise=-1.0, prior_noise=-1.0)

LAMBDA = 1.5e-4        # official: lambda_reg of every weight-norm conv, bias, batch norm, non-local scale
KERAS_L2 = 0.01        # official oddity: a plain 'l2' string reaches Keras, whose default lambda is 0.01 (8.4)


# -----------------------------------------------------------------------------
# small cells (official: layers/resnet.py Conv2D as a head, ConcatConv2D, Conv2DSum)

class Head(nn.Module):
    """official: Conv2D with head defaults (no batch norm): n times (activation, conv); all but the
    last conv are 1x1 keeping the width, the last has kernel k and c_out channels."""

    def __init__(self, c_in, c_out, k, n=1, elu=True):
        super().__init__()
        self.convs = nn.ModuleList([WNConv2d(c_in, c_in, 1) for _ in range(n - 1)] + [WNConv2d(c_in, c_out, k)])
        self.elu = elu

    def forward(self, x):
        for conv in self.convs:
            x = conv(F.elu(x) if self.elu else x)
        return x


class ConcatConv(nn.Module):
    """official: ConcatConv2D: a 1x1 conv with bias of concat[a, b] (then a non-local block, if any)."""

    def __init__(self, c_in, c_out, nonlocal_width=0):
        super().__init__()
        self.conv = WNConv2d(c_in, c_out, 1)
        self.nonlocal_block = NonLocalBlock(c_out, nonlocal_width) if nonlocal_width else None

    def forward(self, a, b):
        x = self.conv(torch.cat([a, b], 1))
        return x if self.nonlocal_block is None else self.nonlocal_block(x)


class ConvSum(nn.Module):
    """official: Conv2DSum: conv_b(b) + conv_a(a), 1x1 with bias; when the output keeps a's width
    the conv on a is the identity (the baseline); then a non-local block, if any."""

    def __init__(self, c_a, c_b, c_out, nonlocal_width=0):
        super().__init__()
        self.conv_a = WNConv2d(c_a, c_out, 1) if c_out != c_a else None   # official: _conv2d_layer_a (encoder side)
        self.conv_b = WNConv2d(c_b, c_out, 1)                             # official: _conv2d_layer (prior input)
        self.nonlocal_block = NonLocalBlock(c_out, nonlocal_width) if nonlocal_width else None

    def forward(self, a, b):
        x = (a if self.conv_a is None else self.conv_a(a)) + self.conv_b(b)
        return x if self.nonlocal_block is None else self.nonlocal_block(x)


# -----------------------------------------------------------------------------
# bounded diagonal Gaussians (official: stat_tools/gaussian_diag.py; ATTENTIVE.md 4)

def bound(x, low, high):
    """b tanh(x / 2b) if |low| = |high| = b, else a smoothstep on [low, high] with flat tails
    (zero gradient outside)."""
    if abs(low) == abs(high):
        return abs(low) * torch.tanh(x / (2 * abs(low)))
    t = ((x - low) / (high - low)).clamp(0, 1)   # official oddity: flat outside [low, high], no gradient there (8.8)
    return low + (high - low) * t * t * (3 - 2 * t)


def gaussian(mu, log_sigma, bounds):
    """raw (mu, l) -> (loc, sigma): loc = 5 tanh(mu / 10), sigma = exp(bounded l) + 0.01."""
    return 5 * torch.tanh(mu / 10), torch.exp(bound(log_sigma, *bounds)) + 0.01


def kl_gaussians(q, p):
    """KL(q || p) per element of two (loc, sigma) pairs, analytic."""
    (mq, sq), (mp, sp) = q, p
    return torch.log(sp) - torch.log(sq) + (sq ** 2 + (mq - mp) ** 2) / (2 * sp ** 2) - 0.5


def log_normal(z, loc, sigma):
    return -0.5 * math.log(2 * math.pi) - torch.log(sigma) - 0.5 * ((z - loc) / sigma) ** 2


# -----------------------------------------------------------------------------
# the likelihood (official: stat_tools/discretized_logistic_mixture.py; ATTENTIVE.md 5)

def dmol_params(params, M):
    """(B, 10M, H, W) -> logits (B, M, H, W); means, log-scales (B, 3, M, H, W); coefficients
    (B, 3, M, H, W) (G on R, B on R, B on G). official oddity: after the M logits, each mixture's 9
    entries start with its 3 coefficients, and the other 6M numbers, in (mixture, entry) order, are
    reshaped to (3 colours, 2M): M means then M log-scales per colour (not VDVAE's layout)."""
    B, _, H, W = params.shape
    logits = params[:, :M]
    rest = params[:, M:].reshape(B, M, 9, H, W)
    coeffs = torch.tanh(rest[:, :, :3]).transpose(1, 2)                      # (B, 3, M, H, W)
    other = rest[:, :, 3:].reshape(B, 3, 2 * M, H, W)
    return logits, other[:, :, :M], other[:, :, M:].clamp(min=-7.0), coeffs


def logistic_bin_log_prob(x, mean, log_scale):
    """log P(bin of x) of a discretized logistic on the 8-bit grid of [-1, 1]."""
    centered, inv_s = x - mean, torch.exp(-log_scale)
    plus_in, min_in = inv_s * (centered + 1 / 255), inv_s * (centered - 1 / 255)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_scale - 2 * F.softplus(mid_in)
    interior = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - math.log(127.5))
    # official oddity: the top edge is tested with x > 0.99, not 0.999: pixel 254 (0.9922) is scored
    # as the open top bin P(X > 253.5), as if it were 255 (8.1)
    return torch.where(x < -0.999, plus_in - F.softplus(plus_in), torch.where(x > 0.99, -F.softplus(min_in), interior))


def colour_means(means, coeffs, x):
    """Channel-autoregressive means on the true colours x (B, 3, 1, H, W): mu_G + c0 x_R,
    mu_B + c1 x_R + c2 x_G."""
    r, g = x[:, 0], x[:, 1]
    return torch.stack([means[:, 0], means[:, 1] + coeffs[:, 0] * r,
                        means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g], 1)


def dmol_nll(params, target, M):
    """-log p(x | z) per image, (B,) nats; target (B, 3, H, W) = 2 x / 255 - 1."""
    logits, means, log_scales, coeffs = dmol_params(params, M)
    x = target.unsqueeze(2)                                                   # (B, 3, 1, H, W)
    log_probs = logistic_bin_log_prob(x, colour_means(means, coeffs, x), log_scales).sum(1)
    return -torch.logsumexp(log_probs + F.log_softmax(logits, 1), 1).sum((1, 2))


def dmol_channel_log_probs(params, x, c, M):
    """(B, H, W, 256): log p(x_c = k | x_<c) for every k, the mixture weighted by how well each
    component explains the true colours < c, so that summing the chosen values over c gives
    log p(x). With the 0.99 top edge, the 256 probabilities sum to 1 + p(x_c = 255) (value 254's
    bin X > 253.5 contains 255's X > 254.5), not to 1."""
    logits, means, log_scales, coeffs = dmol_params(params, M)
    xt = x.unsqueeze(2)                                                       # (B, 3, 1, H, W)
    mean = colour_means(means, coeffs, xt)                                    # (B, 3, M, H, W)
    weight = F.log_softmax(logits, 1)
    if c:
        weight = weight + logistic_bin_log_prob(xt[:, :c], mean[:, :c], log_scales[:, :c]).sum(1)
    k = torch.arange(256, dtype=params.dtype, device=params.device) * 2 / 255 - 1
    lp = logistic_bin_log_prob(k, mean[:, c, ..., None], log_scales[:, c, ..., None])   # (B, M, H, W, 256)
    return torch.logsumexp(weight[..., None] + lp, 1) - torch.logsumexp(weight, 1)[..., None]


def dmol_sample(params, M):
    """official: DiscretizedLogisticMixture.sample: Gumbel-max mixture choice, logistic draw,
    channel-autoregressive on the drawn colours, each clamped to [-1, 1] -> (B, 3, H, W)."""
    logits, means, log_scales, coeffs = dmol_params(params, M)
    u = rand_as(logits).clamp(1e-5, 1 - 1e-5)
    k = torch.argmax(logits - torch.log(-torch.log(u)), 1, keepdim=True)      # (B, 1, H, W)
    pick = lambda t: torch.gather(t, 2, k.unsqueeze(1).expand(-1, 3, -1, -1, -1)).squeeze(2)
    means, log_scales, coeffs = pick(means), pick(log_scales), pick(coeffs)
    u = rand_as(means).clamp(1e-5, 1 - 1e-5)
    x = means + torch.exp(log_scales) * (torch.log(u) - torch.log1p(-u))
    r = x[:, 0].clamp(-1, 1)
    g = (x[:, 1] + coeffs[:, 0] * r).clamp(-1, 1)
    b = (x[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g).clamp(-1, 1)
    return torch.stack([r, g, b], 1)


# -----------------------------------------------------------------------------
# widths (official: DeepVAE.__init__, VariationalLayer; ATTENTIVE.md 0 "derived widths")

def widths(c):
    """-> dict of the channel counts: F stem, E encoder feature, V its values, G decoder filters,
    S the decoder state, cell(i) the decoder cell output of layer i, h the latent resolution."""
    down = 2 ** sum(s < 0 for s in c['preproc_scales'])
    Ke, Kd, L = c['enc_key'], c['dec_key'], c['num_layers']
    V, G = c['preproc_filters'] * down, c['dec_filters'] * down
    stem = c['preproc_filters'] + Ke // down
    E = stem * down
    S = G + Ke            # the state includes the encoder query slice (8.7)
    cell = lambda i: S + Kd * ((i > 0) + (i < L - 1))
    return dict(stem=stem, E=E, V=V if Ke else E, S=S, cell=cell, h=c['image_size'] // down, down=down)


def fp32_or_better(t):
    """The likelihood in fp32 under bf16 autocast, in float64 when the model is float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def nonlocal_maker(c, on):
    return (lambda ch, bias=True: NonLocalBlock(ch, c['nonlocal_width'], bias)) if on else (lambda ch, bias=True: None)


# -----------------------------------------------------------------------------
# one stochastic layer (official: model/variational_layer.py VariationalLayer)

class Layer(nn.Module):
    def __init__(self, c, i):
        super().__init__()
        w, Z, L = widths(c), c['zdim'], c['num_layers']
        self.i, self.zdim, self.last = i, Z, i == L - 1
        self.S, self.V, self.Ke, self.Kd = w['S'], w['V'], c['enc_key'], c['dec_key']
        self.prior_noise, self.posterior_noise = c['prior_noise'], c['posterior_noise']
        self.prior_bounds, self.posterior_bounds = tuple(c['prior_bounds']), tuple(c['posterior_bounds'])
        self.encoder = Tower(w['E'], [0] * c['enc_tower_blocks'], c['num_nodes'], nonlocal_maker(c, c['enc_nonlocal']))
        post_in = w['V'] + self.Ke if self.Ke else w['E']
        if i == 0:
            # official: tfp.layers.VariableLayer (1, h, w, cell), DeepVaeInit with Keras' fan_in h * w
            self.constant = nn.Parameter(deep_vae_init_(torch.empty(1, w['cell'](0), w['h'], w['h']), w['h'] ** 2))
            self.posterior = Head(post_in, 2 * Z, 3, n=2, elu=True)      # official: init_posterior
        else:
            self.merge_decoder = ConcatConv(w['S'] + Z, w['cell'](i), c['nonlocal_width'] * c['merge_decoder_nonlocal'])
            self.decoder = Tower(w['cell'](i), [0] * c['dec_tower_blocks'], c['num_nodes'], nonlocal_maker(c, c['dec_nonlocal']))
            self.prior = Head(w['S'], 2 * Z, 1, n=1, elu=True)
            self.merge_encoder = ConvSum(w['V'], w['S'], post_in, c['nonlocal_width'] * c['merge_encoder_nonlocal'])
            self.posterior = Head(post_in, 2 * Z, 3, n=1, elu=False)
            if self.Kd:
                self.decoder_attention = DecoderAttention(w['S'], c['dec_layer_norm'], c['trainable_scales'])
        if self.Ke:
            self.encoder_attention = EncoderAttention(w['V'], c['enc_layer_norm'], c['trainable_scales'])

    def cell(self, contexts, z_prev, n):
        """-> the state s (B, S, h, w), key, query (or None): official call_decoder/compute_context"""
        if self.i == 0:
            return self.constant.expand(n, -1, -1, -1), None, None    # c_0 = the constant; its last Kd channels: layer 0's key
        s_prev = contexts[-1][:, :self.S]                               # the newest context's value
        t = self.decoder(self.merge_decoder(s_prev, z_prev))
        if not self.Kd:
            return t, None, None
        if self.last:
            s, query = t.split([self.S, self.Kd], 1)
            return s, None, query
        return t.split([self.S, self.Kd, self.Kd], 1)

    def prior_params(self, prior_in, noise):
        mu, log_sigma = self.prior(prior_in).chunk(2, 1)
        if noise is not None:
            log_sigma = log_sigma + self.prior_noise * noise        # official: GaussianNoise in training only
        return mu, log_sigma

    def posterior_input(self, feats, prior_in, enc_query):
        """feats: the encoder features [e_i, .., e_L] -> the posterior head's input"""
        if not self.Ke:
            return feats[0] if self.i == 0 else self.merge_encoder(feats[0], prior_in)
        u, key = feats[0].split([self.V, self.Ke], 1)
        if self.i > 0:
            u, key = self.merge_encoder(u, prior_in).split([self.V, self.Ke], 1)
        h = self.encoder_attention(enc_query, u, key, feats[1:])
        return torch.cat([h, key], 1)

    def forward(self, feats, contexts, z_prev, n, pick, noise=(None, None)):
        """One top-down step (official: VariationalLayer.infer / generate). feats: [e_i, .., e_L] or
        None (prior only); contexts: c_0 .. c_{i-1}; pick(i, prior, posterior) -> z.
        -> z, the new context c_i"""
        s, key, query = self.cell(contexts, z_prev, n)
        enc_query = s[:, :self.Ke]   # official oddity: the encoder query is the state's first K channels, before R(s) (8.7)
        prior_in = s
        if self.i > 0 and self.Kd:
            s, prior_in = self.decoder_attention(s, query, contexts)
        raw_p, prior = None, None
        if self.i > 0:
            raw_p = self.prior_params(prior_in, noise[0])
            prior = gaussian(*raw_p, self.prior_bounds)
        posterior = None
        if feats is not None:
            d_mu, d_l = self.posterior(self.posterior_input(feats, prior_in, enc_query)).chunk(2, 1)
            if noise[1] is not None:
                d_l = d_l + self.posterior_noise * noise[1]
            if raw_p is not None:                                        # residual posterior in raw space (NVAE)
                d_mu, d_l = raw_p[0] + d_mu, raw_p[1] + d_l
            posterior = gaussian(d_mu, d_l, self.posterior_bounds)
        if prior is None:                                                # layer 0: N(0, I), no + 0.01
            ref = posterior[0] if posterior is not None else s[:, :self.zdim]
            prior = (torch.zeros_like(ref), torch.ones_like(ref))
        z = pick(self.i, prior, posterior)
        if not self.Kd:
            return z, prior_in
        return z, (s if self.i == 0 or self.last else torch.cat([s, key], 1))


# -----------------------------------------------------------------------------
# the VAE (official: model/vae.py DeepVAE, model/data_layer.py DataLayer)

class NVAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = {**DEFAULTS, **config}
        if c['num_layers'] < 2:
            raise ValueError('the NVAE-style model needs num_layers >= 2')
        if c['likelihood'] not in ('dmol', 'bernoulli'):
            raise ValueError(f"likelihood must be 'dmol' or 'bernoulli', not {c['likelihood']!r}")
        w = widths(c)
        self.preprocess = Tower(c['image_channels'], c['preproc_scales'], c['num_nodes'],
                                nonlocal_maker(c, c['preproc_nonlocal']), stem=w['stem'])
        self.layers = nn.ModuleList([Layer(c, i) for i in range(c['num_layers'])])
        if c['dec_key']:
            # official: DeepVAE._ctx_layer_norm[i], i >= 2 (0 and 1 are created but never called)
            self.context_norms = nn.ModuleDict({str(i): ChannelNorm(w['cell'](0)) for i in range(2, c['num_layers'])})
        # official: DeepVAE._merge_decoder, built from merge_decoder_hparams (with its non-local block, if any)
        self.merge = ConcatConv(w['S'] + c['zdim'], w['S'], c['nonlocal_width'] * c['merge_decoder_nonlocal'])
        self.postprocess = Tower(w['S'], c['postproc_scales'], c['num_nodes'], nonlocal_maker(c, c['postproc_nonlocal']))
        out = 10 * c['num_mixtures'] if c['likelihood'] == 'dmol' else c['image_channels']
        self.head = Head(self.postprocess.c_out, out, 3, n=1, elu=True)

    def encode(self, x):
        """x (B, C, H, W) -> [e_0, .., e_L], e_L the preprocessing output, e_0 the deepest."""
        feats = [self.preprocess(x)]
        for layer in reversed(self.layers):
            feats.insert(0, layer.encoder(feats[0]))
        return feats

    def walk(self, feats, pick, n, noise=None):
        """The top-down pass (official: DeepVAE.encode, then the final merge and the data layer).
        noise: per layer (prior, posterior) standard-normal log-scale noise, or None."""
        contexts, z = [], None
        for i, layer in enumerate(self.layers):
            if i >= 2 and self.config['dec_key']:   # official oddity: c_{i-2} normalised once, value and key jointly (8.6)
                contexts[i - 2] = self.context_norms[str(i)](contexts[i - 2])
            z, context = layer(None if feats is None else feats[i:], contexts, z, n, pick,
                               noise[i] if noise is not None else (None, None))
            contexts.append(context)
        return self.head(self.postprocess(self.merge(contexts[-1], z)))

    def top_down(self, x, pick, n=1):
        """Eval-mode semantics (no log-scale noise): at layer l, z = pick(l, prior, posterior),
        prior and posterior (mean, sigma) pairs (B, Z, h, w) (posterior None when x is None, then
        the batch is n; layer 0's prior N(0, 1)) -> the likelihood head's params (B, out, H, W)."""
        if x is None:
            return self.walk(None, pick, n)
        return self.walk(self.encode(x), pick, x.shape[0])

    def draw_noise(self, logscale_noise, ref):
        """Train mode: the given (prior or None, posterior) pairs, or fresh N(0, 1) where None."""
        c, L = self.config, len(self.layers)
        given = logscale_noise if logscale_noise is not None else [(None, None)] * L
        out = []
        for i, (p, q) in enumerate(given):
            p = (p if p is not None else randn_as(ref)) if i > 0 and c['prior_noise'] > 0 else None
            q = (q if q is not None else randn_as(ref)) if c['posterior_noise'] > 0 else None
            out.append((p, q))
        return out

    def set_grad_checkpoint(self, on=True):
        """Recompute every residual tower (preprocessing, encoder, decoder, postprocessing) in the
        backward pass instead of keeping its activations; the batch-norm statistics move once."""
        for m in self.modules():
            if isinstance(m, Tower):
                m.grad_checkpoint = on
        return self

    def crop(self, t):
        p = self.config['pad']
        return t[..., p:t.shape[-2] - p, p:t.shape[-1] - p] if p else t

    def nll(self, params, target):
        """-log p(x | z) per image, (B,) nats."""
        params, target = fp32_or_better(self.crop(params)), fp32_or_better(self.crop(target))
        if self.config['likelihood'] == 'dmol':
            return dmol_nll(params, target, self.config['num_mixtures'])
        return F.binary_cross_entropy_with_logits(params, target, reduction='none').sum((1, 2, 3))   # target in {0, 1}

    def forward(self, x, target, eps=None, logscale_noise=None, sampled_kl=False):
        """x, target: (B, C, H, W), both 2 x / 255 - 1 (binary images: x = 2 b - 1, target b in {0, 1},
        as the official scores the raw bits; model.model_inputs); eps: one posterior noise tensor per layer
        (z = loc_q + sigma_q eps); logscale_noise: train mode only, per layer (prior or None for
        layer 0, posterior) standard-normal noise (B, Z, h, w), drawn where None. -> per image
        distortion and rate in nats/dim and kl (B, L) nats (with sampled_kl log q(z) - log p(z))."""
        feats = self.encode(x)
        n = x.shape[0]
        noise = self.draw_noise(logscale_noise, feats[0][:, :self.config['zdim']]) if self.training else None
        kls = []

        def pick(i, prior, posterior):
            e = eps[i] if eps is not None else randn_as(posterior[0])
            z = posterior[0] + posterior[1] * e
            q, p = [tuple(map(fp32_or_better, d)) for d in (posterior, prior)]   # the KL in fp32 under autocast
            if sampled_kl:
                kls.append((log_normal(fp32_or_better(z), *q) - log_normal(fp32_or_better(z), *p)).sum((1, 2, 3)))
            else:
                kls.append(kl_gaussians(q, p).sum((1, 2, 3)))
            return z

        params = self.walk(feats, pick, n, noise)
        dims = self.crop(target[:1]).numel()
        kl = torch.stack(kls, 1).float()
        return dict(distortion=self.nll(params, target) / dims, rate=kl.sum(1) / dims, kl=kl)

    def pixel_log_probs(self, params, x, c):
        """(B, H, W, K) log-probabilities of every value of channel c given the true channels < c of
        x (target scale): K = 256 (dmol; they sum to 1 + p(255), the 0.99 edge) or 2 (Bernoulli)."""
        params, x = fp32_or_better(self.crop(params)), fp32_or_better(self.crop(x))
        if self.config['likelihood'] == 'dmol':
            return dmol_channel_log_probs(params, x, c, self.config['num_mixtures'])
        logit = params[:, c]
        return torch.stack([F.logsigmoid(-logit), F.logsigmoid(logit)], -1)

    @torch.no_grad()
    def posterior_latents(self, x):
        """Latents of every layer drawn from the posterior of x: list of (B, Z, h, w)."""
        zs = []
        self.top_down(x, lambda i, p, q: zs.append(q[0] + q[1] * randn_as(q[0])) or zs[-1])
        return zs

    @torch.no_grad()
    def sample(self, n, temperature=1.0, latents=None):
        """Images (n, C, H, W) uint8 from the prior, sigma times the temperature (a number or one
        per layer); the first len(latents) layers fixed to `latents` if given."""
        def pick(i, prior, posterior):
            if latents is not None and i < len(latents):
                return latents[i]
            t = temperature[i] if isinstance(temperature, (list, tuple)) else temperature
            return prior[0] + prior[1] * t * randn_as(prior[0])
        params = self.crop(self.top_down(None, pick, n)).float()
        if self.config['likelihood'] == 'dmol':
            return to_uint8(dmol_sample(params, self.config['num_mixtures']))
        return to_uint8(torch.bernoulli(torch.sigmoid(params)) * 2 - 1)

    def penalty_lambdas(self):
        """{parameter name: lambda} of the official Keras L2 penalty (ATTENTIVE.md 6)."""
        lambdas = {}
        for name, module in self.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                full = f'{name}.{pname}' if name else pname
                if isinstance(module, (WNConv2d, nn.BatchNorm2d)):
                    lambdas[full] = LAMBDA        # official oddity: the log-gains too, pulling kernel norms to 1 (8.4)
                elif isinstance(module, nn.LayerNorm) or pname in ('gate', 'gamma', 'constant'):
                    lambdas[full] = KERAS_L2      # LayerNorms, gates, non-local gamma, the constant
                elif isinstance(module, NonLocalBlock) and pname == 'scale':
                    lambdas[full] = LAMBDA
                else:
                    lambdas[full] = 0.0           # the depth-wise scales, when trainable: unregularised
        return lambdas

    def l2_penalty(self):
        """sum of lambda * sum(w^2) over the official regularised weights, a scalar tensor."""
        params = dict(self.named_parameters())
        lambdas = [(lam, params[k]) for k, lam in self.penalty_lambdas().items() if lam]
        return L2Penalty.apply([lam for lam, _ in lambdas], *[w for _, w in lambdas])


class L2Penalty(torch.autograd.Function):
    """sum_k lambda_k sum(w_k^2) over many tensors as one autograd node of fused calls, instead of
    four small ops per tensor each way (2,536 tensors in the paper model; 2.3x faster); the value
    within 2e-6 of the plain sum in float32, the gradients equal."""

    @staticmethod
    def forward(ctx, lambdas, *weights):
        ctx.lambdas = lambdas
        ctx.save_for_backward(*weights)
        norms = torch._foreach_norm(weights)                                      # ||w_k||
        terms = torch._foreach_mul(norms, norms)
        torch._foreach_mul_(terms, lambdas)                # Python scalars: no host-to-device copy
        return torch.stack(terms).sum()

    @staticmethod
    def backward(ctx, grad):
        grads = torch._foreach_mul(ctx.saved_tensors, grad)                       # d/dw_k = 2 lambda_k w_k
        torch._foreach_mul_(grads, [2 * lam for lam in ctx.lambdas])
        return (None, *grads)
