"""
The top-down hierarchical VAE: the very deep VAE (Child 2020), number for number as openai/vdvae.
Facts: ../shared/DESIGN.md sections 1.1 to 1.6. The official attentive VAE and its NVAE baseline
are their own network in nvae.py; `build(config)` below makes either.

A bottom-up encoder keeps one activation per resolution; a top-down decoder of stochastic layers
walks from the coarsest resolution to the image. Layer l reads the decoder state x at its
resolution and the encoder activation there:
    posterior q(z_l | x, acts) and prior p(z_l | x) are diagonal Gaussians,
    x <- resblock(x + prior_extra + z_proj(z_l)),
and the loss is the negative ELBO, distortion + rate, in nats per dimension.
"""
import math
import re
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layers import (Block, conv, upsample, randn_as, gaussian_sample, gaussian_kl, gaussian_log_prob, dmol_nll,
                    dmol_sample, bernoulli_nll, bernoulli_sample, to_uint8, dmol_channel_log_probs,
                    bernoulli_channel_log_probs)

# hyperparameters a config may leave out (names as in the reference code)
DEFAULTS = dict(model='vdvae', bottleneck_multiple=0.25, num_mixtures=10, image_channels=3,
                no_bias_above=64, bits=8, likelihood='dmol', pad=0, custom_width='')
REQUIRED = ('width', 'zdim', 'enc_blocks', 'dec_blocks', 'image_size')


# -----------------------------------------------------------------------------
# layout strings (DESIGN.md 1.1): "32x11,32d2,16x6" for the encoder, "1x1,4m1,4x2" for the decoder

def parse_layout(layout, kind):
    """-> list of (resolution, k) per block; k is the pool factor (encoder `RdK`), the mixin
    resolution (decoder `RmM`), or None."""
    letter = 'd' if kind == 'enc' else 'm'
    blocks = []
    for token in layout.split(','):
        m = re.fullmatch(rf'(\d+)(?:x(\d+)|{letter}(\d+))?', token.strip())
        if m is None or int(m[1]) < 1 or (m[2] is not None and int(m[2]) < 1):
            forms = 'RxN, RdK or R' if kind == 'enc' else 'RxN, RmM or R'
            raise ValueError(f"bad token '{token}' in {kind}_blocks '{layout}': expected {forms}")
        res = int(m[1])
        if m[2] is not None:
            blocks += [(res, None)] * int(m[2])
        else:
            blocks.append((res, int(m[3]) if m[3] else None))
    return blocks


def check_layouts(config):
    """Raise a one-line ValueError unless the encoder walks down from the image size and every
    decoder layer has an encoder activation at its resolution and ends at the image size."""
    size = config['image_size']
    enc, dec = parse_layout(config['enc_blocks'], 'enc'), parse_layout(config['dec_blocks'], 'dec')
    res = size
    have = {size}
    for r, down in enc:
        if r != res:
            raise ValueError(f"enc_blocks '{config['enc_blocks']}': block at {r} where the activation is {res}x{res}")
        if down:
            if res % down:
                raise ValueError(f"enc_blocks '{config['enc_blocks']}': {res} is not divisible by {down}")
            res //= down
        have.add(res)
    seen = set()
    for r, mixin in dec:
        if r not in have:
            raise ValueError(f"dec_blocks '{config['dec_blocks']}': no encoder activation at {r}x{r} (encoder has {sorted(have)})")
        if mixin is not None and (mixin not in seen or r % mixin):
            raise ValueError(f"dec_blocks '{config['dec_blocks']}': {r}m{mixin} mixes in a resolution not decoded before")
        seen.add(r)
    if dec[-1][0] != size:
        raise ValueError(f"dec_blocks '{config['dec_blocks']}' ends at {dec[-1][0]}x{dec[-1][0]}, not the image size {size}")


def widths(config):
    """Channels at resolution r: `width`, unless `custom_width` ('512:32,256:64,...', the reference's
    custom_width_str) names r. -> function of r."""
    named = {}
    for item in filter(None, str(config['custom_width']).replace(' ', '').split(',')):
        m = re.fullmatch(r'(\d+):(\d+)', item)
        if m is None or int(m[2]) < 1:
            raise ValueError(f"custom_width '{config['custom_width']}': '{item}' is not resolution:width")
        named[int(m[1])] = int(m[2])
    return lambda r: named.get(r, config['width'])


def scale_depth(dec_blocks, depth):
    """Rebuild a decoder layout with `depth` stochastic layers: one at each resolution, the rest
    spread in the layout's proportions (largest remainder), same resolutions and mixins."""
    blocks = parse_layout(dec_blocks, 'dec')
    resolutions = list(dict.fromkeys(r for r, _ in blocks))        # in decoding order
    if depth < len(resolutions):
        raise ValueError(f"--depth {depth} is below the {len(resolutions)} resolutions of '{dec_blocks}'")
    counts = [sum(r == q for q, _ in blocks) for r in resolutions]
    spare, extra = depth - len(resolutions), [c - 1 for c in counts]
    total = sum(extra) or 1
    share = [spare * e / total if sum(extra) else spare / len(extra) for e in extra]
    n = [int(s) for s in share]
    for i in sorted(range(len(n)), key=lambda i: n[i] - share[i])[:spare - sum(n)]:
        n[i] += 1
    tokens, prev = [], None
    for r, k in zip(resolutions, n):
        tokens.append(f'{r}m{prev}' if prev else f'{r}')
        tokens += [f'{r}x{k}'] if k else []
        prev = r
    return ','.join(tokens)


def run(module, *args, recompute=False):
    """module(*args); with `recompute` (--grad_checkpoint) its activations are not kept for the
    backward pass but recomputed there (same numbers, same random draws, less memory)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# -----------------------------------------------------------------------------
# encoder (DESIGN.md 1.3)

class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        w, blocks, W = config['width'], parse_layout(config['enc_blocks'], 'enc'), widths(config)
        self.widths, self.grad_checkpoint = W, False
        self.stem = conv(config['image_channels'], w, 3)   # as the reference: `width`, whatever custom_width says
        self.blocks = nn.ModuleList([Block(W(r), int(W(r) * config['bottleneck_multiple']), W(r), r, down=down,
                                           scale=math.sqrt(1 / len(blocks))) for r, down in blocks])

    def forward(self, x):
        """x: (B, C, H, W) normalised image -> {resolution: its last activation (B, w_r, r, r)}."""
        x = self.stem(x)
        acts = {x.shape[-1]: x}
        for block in self.blocks:
            x = run(block, x, recompute=self.grad_checkpoint)
            if x.shape[1] < self.widths(x.shape[-1]):   # into a wider resolution: zero channels (reference pad_channels)
                x = nn.functional.pad(x, (0, 0, 0, 0, 0, self.widths(x.shape[-1]) - x.shape[1]))
            acts[x.shape[-1]] = x
        return acts


# -----------------------------------------------------------------------------
# decoder (DESIGN.md 1.4)

class DecoderLayer(nn.Module):
    """One stochastic layer at resolution `res` (openai/vdvae: DecBlock)."""

    def __init__(self, config, res, mixin, n_layers):
        super().__init__()
        w, z = widths(config)(res), config['zdim']
        mid = int(w * config['bottleneck_multiple'])
        self.res, self.mixin, self.zdim, self.width = res, mixin, z, w
        scale = math.sqrt(1 / n_layers)
        self.posterior = Block(2 * w, mid, 2 * z, res, residual=False)
        self.prior = Block(w, mid, 2 * z + w, res, residual=False, zero_last=True)  # starts at N(0, I)
        self.z_proj = conv(z, w, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(scale)
        self.resblock = Block(w, mid, w, res, scale=scale)

    def prior_params(self, x, x_act=None):
        """-> prior mean, log-sigma (B, z, r, r) and the state x plus the prior's update.
        x_act: gelu(x), when the caller has it (the posterior reads it too)."""
        x_act = F.gelu(x) if x_act is None else x_act
        mean_p, logsig_p, update = self.prior(x_act, activated=True).split([self.zdim, self.zdim, self.width], 1)
        return mean_p, logsig_p, x + update

    def posterior_params(self, x_act, acts_act):
        """-> posterior mean, log-sigma (B, z, r, r) from gelu(state) and {res: gelu(encoder
        activation)}: gelu(cat[x, a]) = cat[gelu x, gelu a], one GELU shared with the prior and one
        per resolution shared by its layers (same numbers as the reference, less work)"""
        return self.posterior(torch.cat([x_act, acts_act[self.res]], 1), activated=True).chunk(2, 1)

    def emit(self, x, z):
        """x <- resblock(x + z_proj(z))"""
        return self.resblock(x + self.z_proj(z))

    def forward(self, x, acts_act, eps=None, z=None, sampled_kl=False):
        """Posterior pass, acts_act = Decoder.activated(acts): z_l ~ q (or the given z) -> new
        state, z, elementwise KL(q || p): analytic, or with sampled_kl the one-sample log q(z|x) - log p(z) at the drawn z (its
        expectation is the KL; importance weights need it at the z that the likelihood saw)."""
        x_act = F.gelu(x)
        mean_p, logsig_p, x_new = self.prior_params(x, x_act)
        mean_q, logsig_q = self.posterior_params(x_act, acts_act)
        if z is None:
            z = gaussian_sample(mean_q, logsig_q, eps)
        q, p = (mean_q.float(), logsig_q.float()), (mean_p.float(), logsig_p.float())  # fp32 under autocast
        if sampled_kl:
            kl = gaussian_log_prob(z.float(), *q) - gaussian_log_prob(z.float(), *p)
        else:
            kl = gaussian_kl(*q, *p)
        return self.emit(x_new, z), z, kl

    def generate(self, x, temperature=1.0, eps=None, z=None):
        """Prior pass: z_l ~ p with sigma multiplied by the temperature, unless z is given."""
        mean_p, logsig_p, x_new = self.prior_params(x)
        if z is None:
            eps = randn_as(mean_p) if eps is None else eps
            z = gaussian_sample(mean_p, logsig_p, eps * temperature)
        return self.emit(x_new, z), z


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        w, layout = config['width'], parse_layout(config['dec_blocks'], 'dec')
        self.out_res, self.grad_checkpoint = layout[-1][0], False
        self.layers = nn.ModuleList([DecoderLayer(config, r, mixin, len(layout)) for r, mixin in layout])
        # learned starting state per resolution (zeros above no_bias_above)
        resolutions = sorted({r for r, _ in layout})
        self.state = nn.ParameterDict({str(r): nn.Parameter(torch.zeros(1, widths(config)(r), r, r))
                                       for r in resolutions if r <= config['no_bias_above']})
        self.gain = nn.Parameter(torch.ones(1, w, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, w, 1, 1))
        out = 10 * config['num_mixtures'] if config['likelihood'] == 'dmol' else config['image_channels']
        self.head = conv(w, out, 1)

    def layer_input(self, xs, layer, n, like):
        """The state at the layer's resolution, plus the nearest-upsampled coarser state for `RmM`."""
        x = xs.get(layer.res)
        if x is None:
            x = like.new_zeros(n, layer.width, layer.res, layer.res)
        if layer.mixin is not None:   # a wider coarse state gives its first channels (as the reference)
            x = x + upsample(xs[layer.mixin][:, :layer.width], layer.res)
        return x

    def activated(self, acts):
        """{res: gelu(encoder activation)}: the posteriors' first GELU, once per resolution, not per layer."""
        return {r: F.gelu(acts[r]) for r in {layer.res for layer in self.layers}}

    def start(self, n):
        """The starting states {resolution: (n, w, r, r)}."""
        return {int(r): s.expand(n, -1, -1, -1) for r, s in self.state.items()}

    def output(self, x):
        """Final per-channel gain and bias, then the 1x1 likelihood head: (B, out, H, W)."""
        return self.head(x * self.gain + self.bias)

    def forward(self, acts, eps=None, latents=None, sampled_kl=False):
        """Posterior pass over encoder activations -> head params, per-layer z and KL lists (the KL
        analytic, or sampled at z: see DecoderLayer.forward)."""
        n = acts[self.out_res].shape[0]
        xs, zs, kls, acts_act = self.start(n), [], [], self.activated(acts)
        for i, layer in enumerate(self.layers):
            x = self.layer_input(xs, layer, n, acts[layer.res])
            given = latents[i] if latents is not None and i < len(latents) else None
            xs[layer.res], z, kl = run(layer, x, acts_act, eps[i] if eps is not None else None, given, sampled_kl,
                                       recompute=self.grad_checkpoint)
            zs.append(z)
            kls.append(kl)
        return self.output(xs[self.out_res]), zs, kls

    def generate(self, n, temperature=1.0, eps=None, latents=None):
        """Prior pass: temperature is a number or one per layer; latents, if given, fix z of the
        first len(latents) layers. -> head params (n, out, H, W)."""
        xs = self.start(n)
        for i, layer in enumerate(self.layers):
            t = temperature[i] if isinstance(temperature, (list, tuple)) else temperature
            x = self.layer_input(xs, layer, n, self.gain)
            given = latents[i] if latents is not None and i < len(latents) else None
            xs[layer.res], _ = layer.generate(x, t, eps[i] if eps is not None else None, given)
        return self.output(xs[self.out_res])


# -----------------------------------------------------------------------------
# the VAE

class VAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        missing = [k for k in REQUIRED if k not in config]
        if missing:
            raise ValueError(f'model config lacks {missing}')
        self.config = {**DEFAULTS, **config}
        if self.config['model'] == 'attentive':
            raise ValueError("model 'attentive' (hvae's bottleneck attentive variant) was removed: the attentive "
                             "VAE is the official one, model 'nvae' (--preset attentive_cifar10, attentive_cpu)")
        if self.config['model'] != 'vdvae':
            raise ValueError(f"model must be 'vdvae' (or 'nvae', built by model.build), not {self.config['model']!r}")
        if self.config['likelihood'] not in ('dmol', 'bernoulli'):
            raise ValueError(f"likelihood must be 'dmol' or 'bernoulli', not {self.config['likelihood']!r}")
        check_layouts(self.config)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def set_grad_checkpoint(self, on=True):
        """Recompute each encoder block and decoder layer in the backward pass (torch.utils.checkpoint)."""
        self.encoder.grad_checkpoint = self.decoder.grad_checkpoint = on
        return self

    def crop(self, t):
        """Drop the padding (e.g. MNIST 28 -> 32) before the likelihood."""
        p = self.config['pad']
        return t[..., p:t.shape[-2] - p, p:t.shape[-1] - p] if p else t

    def nll(self, params, target):
        """-log p(x | z) per image, (B,) nats, over the unpadded image."""
        params, target = self.crop(params), self.crop(target)
        if self.config['likelihood'] == 'dmol':
            return dmol_nll(params.float(), target.float(), self.config['bits'])
        return bernoulli_nll(params.float(), target.float())

    def forward(self, x, target, eps=None, sampled_kl=False):
        """x: encoder input, target: likelihood target, both (B, C, H, W); eps: optional noise per
        layer (z = mean_q + sigma_q * eps). -> per image: distortion and rate in nats/dim (their sum
        is the negative ELBO), kl (B, L) in nats per layer. With sampled_kl each layer's KL is
        log q(z|x) - log p(z) at the drawn z, so -(distortion + rate) * dims is the log importance
        weight log p(x|z) + log p(z) - log q(z|x) of that z (the one-sample Monte Carlo ELBO)."""
        params, _, kls = self.decoder(self.encoder(x), eps, sampled_kl=sampled_kl)
        dims = self.crop(target[:1]).numel()
        distortion = self.nll(params, target) / dims
        kl = torch.stack([k.float().sum((1, 2, 3)) for k in kls], 1)   # (B, L)
        return dict(distortion=distortion, rate=kl.sum(1) / dims, kl=kl)

    @torch.no_grad()
    def posterior_latents(self, x):
        """Latents of every layer drawn from the posterior of images x: list of (B, z, r, r)."""
        return self.decoder(self.encoder(x))[1]

    # the interface of a lossless codec (compress.py): the walk with a chosen z per layer, and the
    # likelihood of every symbol value
    @torch.no_grad()
    def top_down(self, x, pick, n=None):
        """Walk the stochastic layers top to bottom; layer l continues with
        z = pick(l, (mean_p, sigma_p), (mean_q, sigma_q) or None), each (B, z, r, r). x: encoder
        input (B, C, H, W), or None for n images (no posterior). -> head params (B, out, H, W)."""
        dec = self.decoder
        acts_act = dec.activated(self.encoder(x)) if x is not None else None
        n = len(x) if x is not None else n
        xs = dec.start(n)
        for i, layer in enumerate(dec.layers):
            h = dec.layer_input(xs, layer, n, dec.gain)
            h_act = F.gelu(h)
            mean_p, logsig_p, h_new = layer.prior_params(h, h_act)
            posterior = None
            if acts_act is not None:
                mean_q, logsig_q = layer.posterior_params(h_act, acts_act)
                posterior = (mean_q, torch.exp(logsig_q))
            z = pick(i, (mean_p, torch.exp(logsig_p)), posterior)
            xs[layer.res] = layer.emit(h_new, z)
        return dec.output(xs[dec.out_res])

    def pixel_log_probs(self, params, x, c):
        """log p(x_c = v | z, x_<c) of every value v of channel c over the unpadded image:
        (B, H, W, K), K = 2^bits (mixture of logistics) or 2 (Bernoulli). x: likelihood target;
        its channels >= c are not read. Summed over the channels at the true values: -nll."""
        params, x = self.crop(params).float(), self.crop(x).float()
        if self.config['likelihood'] == 'dmol':
            return dmol_channel_log_probs(params, x, c, self.config['bits'])
        return bernoulli_channel_log_probs(params[:, c])

    @torch.no_grad()
    def sample(self, n, temperature=1.0, latents=None):
        """Images (n, C, H, W) uint8 from the prior (first layers fixed to `latents` if given)."""
        params = self.crop(self.decoder.generate(n, temperature, latents=latents)).float()
        if self.config['likelihood'] == 'dmol':
            return to_uint8(dmol_sample(params, self.config['bits']), self.config['bits'])
        return to_uint8(bernoulli_sample(params))


# -----------------------------------------------------------------------------
# the official attentive VAE and its NVAE baseline live in nvae.py (their own modules); the config
# key model='nvae' names them

from nvae import NVAE  # noqa: E402


def build(config):
    """The network a config names: model 'nvae' -> nvae.NVAE, else the very deep VAE -> VAE."""
    return NVAE(config) if config.get('model') == 'nvae' else VAE(config)


def n_layers(vae):
    """The number of stochastic layers of either network."""
    return len(vae.layers) if isinstance(vae, NVAE) else len(vae.decoder.layers)


def latent_shapes(vae):
    """(z, r, r) of every stochastic layer of either network, top first."""
    if isinstance(vae, NVAE):
        h = vae.config['image_size'] // 2 ** sum(s < 0 for s in vae.config['preproc_scales'])
        return [(vae.config['zdim'], h, h)] * len(vae.layers)
    return [(vae.config['zdim'], l.res, l.res) for l in vae.decoder.layers]


def model_inputs(x, target, config):
    """(encoder input, target) as the network reads them, from data.prepare's pair: the official
    attentive VAE takes its likelihood target 2 x / 255 - 1 (binary images: 2 x - 1) as encoder
    input (ATTENTIVE.md 3.1); the very deep VAE its own normalisation."""
    if config.get('model') != 'nvae':
        return x, target
    return (2 * target - 1 if config['likelihood'] == 'bernoulli' else target), target


# -----------------------------------------------------------------------------
# checkpoints: a plain dict of tensors and values (written by train.py), readable with weights_only

CHECKPOINT_FORMAT = 1
MODEL_KEYS = tuple(DEFAULTS) + REQUIRED   # the config keys that shape the network


def get_device(name=None):
    """--device -> torch.device (default: cuda where there is one); one line if it cannot be used."""
    try:
        device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError:
        raise ValueError(f'--device {name!r} is not a device (cpu, cuda, cuda:1, ...)') from None
    backend = getattr(torch, device.type, None)
    if device.type != 'cpu' and not (hasattr(backend, 'is_available') and backend.is_available()):
        raise ValueError(f'--device {name}: this machine (or this build of torch {torch.__version__}) has no {device.type}')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f'--device {name}: only {torch.cuda.device_count()} CUDA device(s) here')
    return device


def check_crc(path):
    """torch.load does not verify the zip's CRC-32s: a flipped bit would load as a wrong weight."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):   # not a whole zip: torch.load says what it is
        return
    if bad is not None:
        raise ValueError(f'{path} is corrupt: {bad} does not match its stored checksum (CRC-32)')


def load_checkpoint(path, map_location='cpu'):
    """Read and check a checkpoint; a one-line error names the file and what is wrong."""
    check_crc(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'{path}: no such checkpoint') from None
    except Exception as e:
        message = str(e).split('. ')[0][:120]   # torch's zip reader: "failed finding central directory. This is..."
        cut = ', the file is cut short?' if 'central directory' in message else ''
        raise ValueError(f'{path} is not a readable hvae checkpoint ({type(e).__name__}: {message}{cut})') from None
    if not isinstance(ckpt, dict) or not {'config', 'model', 'format'} <= set(ckpt):
        raise ValueError(f'{path} is not an hvae checkpoint (no config/model/format keys)')
    if ckpt['format'] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt['format']}, this code reads {CHECKPOINT_FORMAT}")
    try:
        with torch.device('meta'):   # shapes only, no memory
            expected = {k: v.shape for k, v in build(ckpt['config']).state_dict().items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path}: its config does not build a model ({e})') from None
    got = {k: v.shape for k, v in ckpt['model'].items()}
    wrong = sorted(set(expected) ^ set(got)) + [k for k in expected if k in got and expected[k] != got[k]]
    if wrong:
        raise ValueError(f'{path}: weights do not match its config ({len(wrong)} tensors differ, e.g. {wrong[0]})')
    for weights in ('model', 'ema'):   # training never saves a non-finite weight (such updates are skipped)
        bad = nonfinite(ckpt.get(weights) or {})
        if bad:
            raise ValueError(f'{path}: {len(bad)} {weights} tensors hold NaN or inf, e.g. {bad[0]}')
    return ckpt


def nonfinite(state):
    """The names of a state dict's tensors that hold NaN or inf."""
    return [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def model_from_checkpoint(ckpt, weights='ema'):
    """Rebuild the network from the checkpoint's own config and load its EMA (or raw) weights."""
    vae = build(ckpt['config'])
    vae.load_state_dict(ckpt[weights] if ckpt.get(weights) is not None else ckpt['model'])
    return vae
