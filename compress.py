"""
Lossless compression with a trained hierarchical VAE: bits-back coding on an ANS stack
(BB-ANS, Townsend et al. 2019; Bit-Swap, Kingma et al. 2019; HiLLoC, Townsend et al. 2020).

  python compress.py ckpt.pt a.png b.png photos/ -o out.hvz     # images and folders of images
  python compress.py ckpt.pt --decompress out.hvz -o restored/   # PNGs under their names, bit-exact
  python compress.py ckpt.pt --dataset cifar10 --split test --n 1000 --data_root ../shared/data
                       # measure: bits/dim written against the ELBO, PNG and WebP; images/s

A VAE gives p(x) = sum_z p(x|z) p(z) but no way to code x with -log p(x) bits. Bits back does it
with -log p(x|z) - log p(z) + log q(z|x) bits per image on average, the negative ELBO: the coder is
a stack, so the encoder can first *decode* z from the bits already on it under q(z|x) (taking bits
off the stack), then encode x under p(x|z) and z under p(z). The decoder pops z and x, re-computes
q(z|x) from the decoded x and pushes z back under it: the bits it took are back on the stack for
the next image. Here z runs through the model's stochastic layers top to bottom; each z_l is coded on
a grid in units of its prior's standard deviation (GRID_STEP), so both sides compute the same
discrete distributions and run the network on the same grid values. The first images have no bits
under them to pop: a seeded random stack gives them "initial bits", paid once per file and
reported apart. Only this file imports the entropy coder, constriction (see the README).
"""
import argparse
import hashlib
import io
import json
import math
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
from model import get_device, load_checkpoint, model_from_checkpoint, model_inputs

try:
    import constriction
    from importlib.metadata import version
    CONSTRICTION_VERSION = version('constriction')
except ImportError:
    constriction = CONSTRICTION_VERSION = None

MAGIC, VERSION = b'\x89HVZ\r\n\x1a\n', 1
GRID_STEP = 1 / 16     # the latent grid, in prior standard deviations (README: its measured cost)
GRID_RANGE = 32 * 16   # grid points each side of the prior mean: +-32 prior sigmas
WINDOW = 8 * 16        # the posterior is coded on +-8 prior sigmas about its mean (see grid_posterior)
BATCH = 32             # tiles per network pass once the stack holds enough bits
PRECISION = 24         # constriction's probabilities are multiples of 2^-24: a pop takes <= 24 bits


class Models:
    """The entropy models, built once (constriction's vectorised models take per-symbol parameters)."""
    def __init__(self):
        if constriction is None:
            raise ValueError('compress.py needs constriction: pip install constriction')
        m = constriction.stream.model
        self.gaussian = m.QuantizedGaussian(-WINDOW, WINDOW)                          # posterior: mean, std per symbol
        self.prior = m.QuantizedGaussian(-GRID_RANGE, GRID_RANGE, 0.0, 1 / GRID_STEP)  # prior, in its own units
        self.categorical = m.Categorical(perfect=False)                               # pixels: a table per symbol
        self.low_bits = m.Uniform(8)                                                  # 5-bit models: bits 0..2


# -----------------------------------------------------------------------------
# timing: the network against the coder

class Clock:
    def __init__(self):
        self.seconds = dict(network=0.0, tables=0.0, coder=0.0)

    def time(self, part, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.seconds[part] += time.perf_counter() - t
        return out


# -----------------------------------------------------------------------------
# the latent grid: z_l = mean_p + sigma_p * GRID_STEP * k, k an integer in [-GRID_RANGE, GRID_RANGE]

def flat(t):
    return t.detach().double().flatten().cpu().numpy()


def grid_posterior(prior, posterior):
    """q(z_l | x, z_<l) in grid units, k = (z - mean_p) / (GRID_STEP sigma_p): a Gaussian of mean
    (mean_q - mean_p) / (GRID_STEP sigma_p) and std sigma_q / (GRID_STEP sigma_p); the prior in these
    units is N(0, 1 / GRID_STEP^2) everywhere. The coder gives every point of a model's range at
    least 2^-24, so a pop lands anywhere in the range with that chance per point: the posterior is
    coded as k - centre on a window of +-WINDOW points about its rounded mean, not on the whole
    range. -> centre (int), the mean and std relative to it."""
    (mean_p, sigma_p), (mean_q, sigma_q) = map(flat, prior), map(flat, posterior)
    unit = GRID_STEP * sigma_p
    mean = (mean_q - mean_p) / unit
    centre = np.clip(np.rint(mean), WINDOW - GRID_RANGE, GRID_RANGE - WINDOW).astype(np.int32)
    return centre, mean - centre, np.maximum(sigma_q / unit, 1e-12)


def on_grid(prior, k):
    """The grid value of the integers k: the z that the network continues with, on both sides."""
    mean_p, sigma_p = prior
    return mean_p + sigma_p * (GRID_STEP * torch.from_numpy(k).to(mean_p).view(mean_p.shape))


# -----------------------------------------------------------------------------
# bits-back coding of one batch of tiles, uint8 (B, C, T, T), `mask` (B, T, T) their visible pixels

class Codec:
    def __init__(self, vae, norm, device):
        self.vae, self.norm, self.device = vae.eval(), norm, device
        self.config = vae.config
        self.models, self.clock = Models(), Clock()

    def prepare(self, tiles):
        """uint8 tiles -> (encoder input, likelihood target) as the network reads them."""
        pair = data.prepare(tiles.to(self.device), self.norm, self.config['bits'], self.config['pad'])
        return model_inputs(*pair, self.config)

    def symbols(self, tiles):
        """uint8 pixels -> the model's symbols: 0/1 (binary), the top 5 bits, or the byte."""
        return tiles // 255 if self.norm['binary'] else tiles >> (8 - self.config['bits'])

    def pixels(self, symbols):
        return symbols * 255 if self.norm['binary'] else symbols << (8 - self.config['bits'])

    def tables(self, params, target, c, mask):
        """P(x_c = v | z, x_<c) for every visible pixel: float64 (N, K)."""
        log_p = self.clock.time('tables', self.vae.pixel_log_probs, params, target, c)
        return np.exp(log_p.double().cpu().numpy()[mask])

    @torch.no_grad()
    def encode(self, coder, tiles, mask):
        """Push one batch: BB-ANS's three steps (the README lines them up with the paper)."""
        coder_time = self.clock.seconds['coder']
        x_in, target = self.prepare(tiles)
        ks = []

        def pick(l, prior, posterior):      # 1. pop z_l ~ Q(z_l | x, z_<l): the bits we get back later
            centre, mean, std = grid_posterior(prior, posterior)
            ks.append(centre + self.clock.time('coder', coder.decode, self.models.gaussian, mean, std))
            return on_grid(prior, ks[-1])

        t, before = time.perf_counter(), coder.num_bits()
        params = self.vae.top_down(x_in, pick)
        self.clock.seconds['network'] += time.perf_counter() - t - (self.clock.seconds['coder'] - coder_time)
        self.popped, self.low_words = before - coder.num_bits(), coder.num_words()   # the stack is lowest here
        symbols = self.symbols(tiles).numpy()
        if self.config['bits'] < 8 and not self.norm['binary']:   # the bits the model does not see, uniform
            low = (tiles & (2 ** (8 - self.config['bits']) - 1)).numpy().transpose(1, 0, 2, 3)[:, mask]
            self.clock.time('coder', coder.encode_reverse, low.ravel().astype(np.int32), self.models.low_bits)
        for c in reversed(range(self.config['image_channels'])):  # 2. push x ~ P(x | z), the last channel first
            probs = self.tables(params, target, c, mask)
            self.clock.time('coder', coder.encode_reverse, symbols[:, c][mask].astype(np.int32),
                            self.models.categorical, probs)
        for k in reversed(ks):                                     # 3. push z ~ P(z), the bottom layer first
            self.clock.time('coder', coder.encode_reverse, k, self.models.prior)

    @torch.no_grad()
    def decode(self, coder, mask):
        """Pop one batch: the three steps mirrored; -> uint8 tiles (B, C, T, T), edges padded."""
        B, C = len(mask), self.config['image_channels']
        ks, coder_time = [], self.clock.seconds['coder']

        def pick_prior(l, prior, posterior):   # 3. pop z_l ~ P(z_l | z_<l), top to bottom
            ks.append(self.clock.time('coder', coder.decode, self.models.prior, prior[0].numel()))
            return on_grid(prior, ks[-1])

        t = time.perf_counter()
        params = self.vae.top_down(None, pick_prior, n=B)
        self.clock.seconds['network'] += time.perf_counter() - t - (self.clock.seconds['coder'] - coder_time)
        symbols = np.zeros((B, C) + mask.shape[1:], np.int64)
        for c in range(C):                      # 2. pop x ~ P(x | z), channel by channel
            _, target = self.prepare(self.pixels(torch.from_numpy(symbols)).to(torch.uint8))
            probs = self.tables(params, target, c, mask)
            symbols[:, c][mask] = self.clock.time('coder', coder.decode, self.models.categorical, probs)
        tiles = self.pixels(symbols)
        if self.config['bits'] < 8 and not self.norm['binary']:
            low = self.clock.time('coder', coder.decode, self.models.low_bits, C * int(mask.sum()))
            view = tiles.transpose(1, 0, 2, 3)
            view[:, mask] |= low.reshape(C, -1)
        tiles = torch.from_numpy(pad_edges(tiles.astype(np.uint8), mask))
        posteriors = []

        def pick_posterior(l, prior, posterior):   # q(z_l | x, z_<l) again, now that x is known
            posteriors.append(grid_posterior(prior, posterior))
            return on_grid(prior, ks[l])

        t = time.perf_counter()
        self.vae.top_down(self.prepare(tiles)[0], pick_posterior)
        self.clock.seconds['network'] += time.perf_counter() - t
        for k, (centre, mean, std) in reversed(list(zip(ks, posteriors))):   # 1. push z back: the bits are returned
            self.clock.time('coder', coder.encode_reverse, k - centre, self.models.gaussian, mean, std)
        return tiles


# -----------------------------------------------------------------------------
# images <-> tiles of the model's size

def tile_size(config):
    return config['image_size'] - 2 * config['pad']


def to_tiles(pixels, T):
    """uint8 (C, H, W) -> (n, C, T, T) row-major tiles, the edge tiles padded by repeating the last
    row and column (the decoder re-creates the padding from the decoded pixels), and the visible
    mask of each (n, T, T)."""
    C, H, W = pixels.shape
    ny, nx = -(-H // T), -(-W // T)
    padded = np.pad(pixels, ((0, 0), (0, ny * T - H), (0, nx * T - W)), mode='edge')
    tiles = padded.reshape(C, ny, T, nx, T).transpose(1, 3, 0, 2, 4).reshape(-1, C, T, T)
    mask = np.zeros((ny, T, nx, T), bool)
    mask.reshape(ny * T, nx * T)[:H, :W] = True
    return tiles, mask.transpose(0, 2, 1, 3).reshape(-1, T, T)


def from_tiles(tiles, H, W):
    n, C, T, _ = tiles.shape
    ny, nx = -(-H // T), -(-W // T)
    return tiles.reshape(ny, nx, C, T, T).transpose(2, 0, 3, 1, 4).reshape(C, ny * T, nx * T)[:, :H, :W]


def pad_edges(tiles, mask):
    """Fill each tile's invisible part as to_tiles does: repeat the last visible row and column."""
    for tile, m in zip(tiles, mask):
        h, w = int(m[:, 0].sum()), int(m[0].sum())
        tile[:] = np.pad(tile[:, :h, :w], ((0, 0), (0, tile.shape[1] - h), (0, tile.shape[2] - w)), mode='edge')
    return tiles


def read_image(path, channels, binary):
    """An image file -> uint8 (C, H, W) and the mode to write it back in ('L' or 'RGB'). Palette and
    greyscale images become RGB as data.py converts them; what cannot be coded exactly is refused."""
    try:
        with Image.open(path) as img:
            img.load()
            mode, transparent = img.mode, 'A' in img.mode or 'transparency' in img.info
            if mode not in ('1', 'L', 'P', 'RGB', 'RGBA', 'LA', 'PA'):
                raise ValueError(f'{path}: {mode} images are not supported (8-bit greyscale, palette or RGB only)')
            if transparent and (np.array(img.convert('RGBA'))[..., 3] != 255).any():
                raise ValueError(f'{path}: has transparent pixels; the model codes opaque images only')
            rgb = np.array(img.convert('RGB')).transpose(2, 0, 1)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f'{path}: not a readable image ({type(e).__name__}: {e})') from None
    grey = (rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all()
    if channels == 1 and not grey:
        raise ValueError(f'{path}: a colour image; this model codes greyscale images')
    if binary and not np.isin(rgb, (0, 255)).all():
        raise ValueError(f'{path}: has grey levels; this binary model codes black-and-white images (0 or 255) only')
    out_mode = 'L' if mode in ('1', 'L', 'LA') else 'RGB'
    return np.ascontiguousarray(rgb[:channels]), out_mode


def write_image(pixels, mode, path):
    """uint8 (C, H, W) -> a PNG, through a temp file and a rename."""
    array = pixels[0] if mode == 'L' else np.broadcast_to(pixels, (3,) + pixels.shape[1:]).transpose(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    Image.fromarray(np.ascontiguousarray(array), mode).save(tmp, format='PNG')
    os.replace(tmp, path)


def gather_inputs(paths):
    """Files and folders -> [(name, path)], names unique (a folder's images keep their relative path)."""
    items = []
    for p in map(Path, paths):
        if p.is_dir():
            found = data.list_images(p)
            if not found:
                raise ValueError(f'{p}: no png/jpg/jpeg/webp images in this folder')
            items += [(str(f.relative_to(p).with_suffix('.png')), f) for f in found]
        elif p.exists():
            items.append((p.with_suffix('.png').name, p))
        else:
            raise FileNotFoundError(f'{p}: no such file or folder')
    names = [n for n, _ in items]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f'two inputs would decompress to the same name {dup!r}; compress them separately')
    return items


# -----------------------------------------------------------------------------
# a whole file: the stack, the batches, the initial bits

def seed_words(n):
    """The bottom of the stack: n reproducible random words (RandomState's stream is frozen)."""
    words = np.random.RandomState(0).randint(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    words[-1] |= 1   # a valid ANS head
    return words


@torch.no_grad()
def latent_dims(vae):
    """Latent symbols per tile: one network pass on the prior means."""
    dims = []
    vae.top_down(None, lambda l, prior, posterior: dims.append(prior[0].numel()) or prior[0], n=1)
    return sum(dims)


def encode_all(codec, tiles, masks, batch=BATCH, borrow=1, progress=None):
    """Code every tile, in batches that grow as the stack fills: a batch pops about `pop` bits per
    tile before it pushes any, so its size is limited to what the stack holds beyond the seed plus
    `borrow` tiles' worth (the initial bits). -> payload words, batch sizes, stack statistics."""
    n_seed = PRECISION * latent_dims(codec.vae) * max(borrow, 1) // 32 + 64
    seed = seed_words(n_seed)
    coder = constriction.stream.stack.AnsCoder(seed)
    sizes, start, lowest, pop = [], 0, n_seed, None
    while start < len(tiles):
        if pop is None:
            size = 1
        else:
            room = (coder.num_bits() - 32 * n_seed) + borrow * pop
            size = int(max(1, min(batch, room // (1.1 * pop), len(tiles) - start)))
        codec.encode(coder, torch.from_numpy(tiles[start:start + size]), masks[start:start + size])
        lowest, pop = min(lowest, codec.low_words), max(pop or 0, codec.popped / size)
        if lowest <= 2:   # cannot happen: the seed holds 24 bits (the most a pop takes) per latent of `borrow` tiles
            raise RuntimeError('the seeded stack ran dry; compress again with a larger --borrow')
        sizes.append(size)
        start += size
        if progress:
            progress(start, coder.num_bits() - 32 * n_seed)
    words = coder.get_compressed()
    untouched = max(0, lowest - 2)   # the seed words below the lowest point are never read: left out
    assert np.array_equal(words[:untouched], seed[:untouched])
    return words[untouched:], sizes, dict(seed_words=n_seed, untouched=untouched,
                                          initial_bits=32 * (n_seed - untouched),
                                          payload_bits=32 * (len(words) - n_seed))


def decode_all(codec, payload, masks, sizes, n_seed, untouched):
    """The batches in reverse order (a stack); the stack must end as its seed."""
    seed = seed_words(n_seed)
    coder = constriction.stream.stack.AnsCoder(np.concatenate([seed[:untouched], payload]))
    ends = np.cumsum(sizes)
    out = [None] * len(sizes)
    for i in reversed(range(len(sizes))):
        out[i] = codec.decode(coder, masks[ends[i] - sizes[i]:ends[i]])
    if not np.array_equal(coder.get_compressed(), seed):
        raise ValueError('the decoded stack does not end at its seed: the file or the model differs from the encoder\'s')
    return torch.cat(out).numpy()


# -----------------------------------------------------------------------------
# the file: MAGIC, version, header (JSON), payload (little-endian 32-bit words), SHA-256 of all before

def fingerprint(vae):
    """SHA-256 of the model config and the weights the codec runs (a different model decodes garbage)."""
    h = hashlib.sha256(json.dumps(vae.config, sort_keys=True).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def environment(device):
    """What must match between the encoder and the decoder for bit-identical distributions."""
    kind = torch.device(device).type
    return dict(torch=torch.__version__, numpy=np.__version__, constriction=CONSTRICTION_VERSION,
                device=kind if kind != 'cuda' else f'cuda ({torch.cuda.get_device_name(device)})',
                machine=platform.machine())


def pixels_hash(images):
    h = hashlib.sha256()
    for pixels in images:
        h.update(np.ascontiguousarray(pixels, np.uint8).tobytes())
    return h.hexdigest()


def write_file(path, header, payload):
    """Atomically: a temp file, then a rename (a failure leaves no partial file)."""
    head = json.dumps(header).encode()
    body = MAGIC + struct.pack('<II', VERSION, len(head)) + head + struct.pack('<Q', len(payload))
    body += payload.astype('<u4').tobytes()
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            f.write(body + hashlib.sha256(body).digest())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_file(path):
    """-> header, payload words; one-line errors for anything but an intact file of this version."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f'{path}: cannot read ({e.strerror})') from None
    if not raw.startswith(MAGIC):
        raise ValueError(f'{path} is not an hvae compressed file (wrong magic bytes)')
    if len(raw) < len(MAGIC) + 8 + 8 + 32:
        raise ValueError(f'{path} is truncated')
    version, n_head = struct.unpack_from('<II', raw, len(MAGIC))
    if version != VERSION:
        raise ValueError(f'{path} has format version {version}; this compress.py reads version {VERSION}')
    at = len(MAGIC) + 8
    if hashlib.sha256(raw[:-32]).digest() != raw[-32:]:
        size = at + n_head + 8 + 4 * struct.unpack_from('<Q', raw, at + n_head)[0] + 32 if len(raw) >= at + n_head + 8 else None
        if size is None or len(raw) < size:   # the header's own word count says how long the file was
            raise ValueError(f'{path} is truncated ({len(raw):,} bytes' + (f' of {size:,})' if size else ')'))
        raise ValueError(f'{path} is corrupt (its checksum does not match)')
    header = json.loads(raw[at:at + n_head])
    (n_words,) = struct.unpack_from('<Q', raw, at + n_head)
    payload = np.frombuffer(raw, '<u4', n_words, at + n_head + 8).astype(np.uint32)
    return header, payload


# -----------------------------------------------------------------------------
# compress, decompress

def input_norm(ckpt, data_root=None):
    """The encoder input's shift and scale as the run trained with: the checkpoint's record of
    them, else data.py's for the fixed datasets, else recomputed from the training images. Binary
    (dynamically binarised) data is what a Bernoulli likelihood models."""
    config = ckpt['config']
    binary = config.get('likelihood') == 'bernoulli'
    record = ckpt.get('dataset')
    if record:
        return dict(shift=record['shift'], scale=record['scale'], binary=binary)
    if config['dataset'] == 'cifar10':
        return dict(shift=-120.63838, scale=1 / 64.16736, binary=binary)
    if config['dataset'] == 'mnist':
        return dict(shift=0.0, scale=1.0, binary=binary)
    info = data.load_run_dataset(dict(config, data_root=data_root or config['data_root']))
    return dict(shift=info['shift'], scale=info['scale'], binary=binary)


def compress(codec, images, modes, names, batch=BATCH, borrow=1, progress=None):
    """uint8 (C, H, W) images -> header, payload, stack statistics."""
    T = tile_size(codec.config)
    tiles, masks = zip(*(to_tiles(p, T) for p in images))
    words, sizes, stats = encode_all(codec, np.concatenate(tiles), np.concatenate(masks), batch, borrow, progress)
    header = dict(checkpoint=codec.fingerprint, config=codec.config, weights=codec.weights, norm=codec.norm,
                  images=[dict(name=n, height=p.shape[1], width=p.shape[2], mode=m) for n, p, m in zip(names, images, modes)],
                  tile=T, batches=sizes, grid=dict(step=GRID_STEP, range=GRID_RANGE, window=WINDOW), seed_words=stats['seed_words'],
                  untouched=stats['untouched'], threads=torch.get_num_threads(), pixels_sha256=pixels_hash(images),
                  **environment(codec.device))
    return header, words, stats


def check_header(header, codec, path):
    """The decoder must compute the encoder's distributions: same model, same software and device."""
    if header['checkpoint'] != codec.fingerprint:
        raise ValueError(f"{path} was written with another model (fingerprint {header['checkpoint'][:12]}, "
                         f"{header['weights']} weights; this checkpoint's {codec.weights} weights: {codec.fingerprint[:12]})")
    here = environment(codec.device)
    wrong = [f'{k} {header[k]} (here {here[k]})' for k in here if header[k] != here[k]]
    if wrong:
        raise ValueError(f"{path} was written with {', '.join(wrong)}; decode it with the same")
    if header['grid'] != dict(step=GRID_STEP, range=GRID_RANGE, window=WINDOW):
        raise ValueError(f"{path} uses the latent grid {header['grid']}; this compress.py codes on another")


def decompress(codec, header, payload, path):
    """-> [(name, uint8 (C, H, W), mode)], checked against the encoder's pixel checksum."""
    check_header(header, codec, path)
    torch.set_num_threads(header['threads'])   # the encoder's: kernels may split work by thread count
    T = header['tile']
    masks = np.concatenate([to_tiles(np.zeros((1, im['height'], im['width']), np.uint8), T)[1] for im in header['images']])
    if len(masks) != sum(header['batches']):
        raise ValueError(f'{path}: its header is inconsistent ({len(masks)} tiles, batches for {sum(header["batches"])})')
    try:
        tiles = decode_all(codec, payload, masks, header['batches'], header['seed_words'], header['untouched'])
    except (ValueError, KeyError, RuntimeError, OverflowError) as e:   # constriction refuses an impossible stack
        raise ValueError(f'{path} does not decode with this model ({str(e)[:100]})') from None
    images, at = [], 0
    for im in header['images']:
        n = -(-im['height'] // T) * -(-im['width'] // T)
        images.append(from_tiles(tiles[at:at + n], im['height'], im['width']))
        at += n
    if pixels_hash(images) != header['pixels_sha256']:
        raise ValueError(f'{path}: the decoded pixels do not match the checksum of the originals; '
                         f'this machine computes the model differently from the encoder\'s')
    return [(im['name'], p, im['mode']) for im, p in zip(header['images'], images)]


def safe_name(name):
    p = Path(name)
    if p.is_absolute() or '..' in p.parts or not p.parts:
        raise ValueError(f'refusing to write outside the output folder: {name!r}')
    return p


# -----------------------------------------------------------------------------
# measurement: the figures of the README table

def lossless_bits(images, fmt):
    """Bits of each image saved alone by Pillow: PNG at its smallest, lossless WebP at its slowest."""
    total = 0
    for p in images:
        buf = io.BytesIO()
        img = Image.fromarray(p[0] if len(p) == 1 else p.transpose(1, 2, 0))
        img.save(buf, 'PNG', optimize=True) if fmt == 'png' else img.save(buf, 'WEBP', lossless=True, quality=100, method=6)
        total += 8 * buf.tell()
    return total


@torch.no_grad()
def negative_elbo_bits(codec, images):
    """The model's negative ELBO (analytic KL, one posterior draw for the distortion), bits per image."""
    torch.manual_seed(0)
    total = 0.0
    for i in range(0, len(images), 100):
        x_in, target = codec.prepare(torch.from_numpy(images[i:i + 100]))
        out = codec.vae(x_in, target)
        total += ((out['distortion'] + out['rate']).double().sum() * codec.vae.crop(target[:1]).numel()).item()
    return total / math.log(2)


def measure(codec, ckpt, args):
    info = data.load_dataset(args.dataset, args.data_root or codec.config['data_root'], codec.config['image_size'], False)
    data.check_fits(info, codec.config, args.dataset)
    split = info[args.split]
    if len(split) < args.n:
        raise ValueError(f'--n {args.n}: the {args.split} split holds {len(split)} images')
    images = split[:args.n].numpy()
    dims, mode = images[0].size * len(images), 'L' if images.shape[1] == 1 else 'RGB'
    names = [f'{args.split}-{i:05d}.png' for i in range(len(images))]
    elbo = negative_elbo_bits(codec, images)
    png, webp = lossless_bits(images, 'png'), lossless_bits(images, 'webp')
    progress = Progress('compress', 1, images[0].size, len(images))
    t = time.perf_counter()
    header, words, stats = compress(codec, list(images), [mode] * len(images), names, args.batch_size, args.borrow, progress)
    t_enc, enc, codec.clock = time.perf_counter() - t, codec.clock.seconds, Clock()
    t = time.perf_counter()
    decoded = decompress(codec, header, words, 'the measurement')
    t_dec, dec = time.perf_counter() - t, codec.clock.seconds
    if not all(np.array_equal(p, q) for (_, p, _), q in zip(decoded, images)):
        raise ValueError('decoded images differ from the originals')   # the checksum makes this unreachable
    if args.out:
        write_file(args.out, header, words)
    payload, initial = stats['payload_bits'], stats['initial_bits']
    split_time = lambda s, total: ', '.join(f'{k} {v:.1f}s' for k, v in s.items()) + f', other {total - sum(s.values()):.1f}s'
    print('\n'.join([
        f"{len(images)} {args.dataset} {args.split} images; {args.checkpoint} ({codec.weights} weights, step {ckpt.get('step')}); "
        f"{header['device']}, {torch.get_num_threads()} threads, torch {torch.__version__}, constriction {CONSTRICTION_VERSION}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"model negative ELBO              {elbo / dims:.4f} bits/dim",
        f"compress.py payload              {payload / dims:.4f} bits/dim ({100 * (payload / elbo - 1):+.2f}% against the ELBO; "
        f"latent grid {GRID_STEP:g} prior sigmas)",
        f"compress.py initial bits         {initial:,} bits once per file ({initial / dims:.4f} bits/dim over these images)",
        f"compress.py file                 {8 * (len(words) * 4) / dims:.4f} bits/dim ({4 * len(words):,} bytes of stack, "
        f"{len(header['batches'])} batches of up to {max(header['batches'])} tiles)",
        f"PNG (Pillow, optimize)           {png / dims:.4f} bits/dim",
        f"WebP lossless (Pillow, method 6) {webp / dims:.4f} bits/dim",
        f"compress   {len(images) / t_enc:7.1f} images/s ({t_enc:.1f}s: {split_time(enc, t_enc)})",
        f"decompress {len(images) / t_dec:7.1f} images/s ({t_dec:.1f}s: {split_time(dec, t_dec)})"]))


# -----------------------------------------------------------------------------
# the command line

class Progress:
    """images/s and bits/dim so far on stderr: in place on a terminal, else every 30 s."""
    def __init__(self, what, tiles_per_image, dims_per_tile, total):
        self.what, self.per, self.dims, self.total = what, tiles_per_image, dims_per_tile, total
        self.t0 = self.last = time.time()
        self.every = 1.0 if sys.stderr.isatty() else 30.0

    def __call__(self, tiles, net_bits):
        now, done = time.time(), tiles >= self.total
        if now - self.last < self.every and not done:
            return
        self.last = now
        images = tiles / self.per
        line = (f'{self.what}: {images:.0f}/{self.total / self.per:.0f} images, {images / (now - self.t0):.1f} images/s, '
                f'{net_bits / (tiles * self.dims):.4f} bits/dim so far (initial bits apart)')
        print(line, end='\n' if done or not sys.stderr.isatty() else '\r', file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint')
    p.add_argument('inputs', nargs='*', help='images and folders of images to compress')
    p.add_argument('-o', '--out', help='the .hvz file to write, or with --decompress the folder for the PNGs')
    p.add_argument('--decompress', metavar='FILE', help='decode this .hvz file')
    p.add_argument('--dataset', choices=('cifar10', 'mnist', 'imagenet32', 'imagenet64'), help='measure on a dataset split')
    p.add_argument('--split', default='test', choices=('train', 'valid', 'test'))
    p.add_argument('--n', type=int, default=1000, help='images of --split to measure on')
    p.add_argument('--data_root', help="default: the training run's")
    p.add_argument('--weights', choices=('ema', 'model'), default='ema')
    p.add_argument('--batch_size', type=int, default=BATCH, help='largest batch of tiles per network pass')
    p.add_argument('--borrow', type=int, default=1, help="tiles' worth of initial bits the first batches may take")
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, help='torch threads (written in the file; decoding uses the same)')
    args = p.parse_intermixed_args(argv)   # images may follow the options too
    modes = bool(args.inputs) + bool(args.decompress) + bool(args.dataset)
    if modes != 1:
        raise ValueError('give images to compress, --decompress FILE, or --dataset to measure (exactly one)')
    if args.inputs and not args.out:
        raise ValueError('-o out.hvz is required when compressing')
    if args.decompress and not args.out:
        raise ValueError('-o FOLDER is required with --decompress')
    if args.out and not args.decompress:
        check_out_file(args.out, args.inputs)
    if args.decompress and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f'-o {args.out} is a file; with --decompress -o names the folder for the PNGs')
    if args.batch_size < 1 or args.borrow < 1 or args.n < 1:
        raise ValueError('--batch_size, --borrow and --n must be at least 1')
    args.device = get_device(args.device)
    return args


def refuse_existing(path):
    """Never a lost file: as gzip without -f, an output that exists is not replaced."""
    if os.path.lexists(path):
        raise ValueError(f'{path} already exists: remove it or choose another -o')


def check_out_file(out, inputs):
    """The .hvz to write: in an existing folder, not a folder, not one of the inputs, not there yet."""
    path = Path(out)
    if not path.resolve().parent.is_dir():
        raise ValueError(f'{out}: its folder does not exist')
    if path.is_dir():
        raise ValueError(f'-o {out} is a folder; -o names the .hvz file to write')
    if path.exists() and any(Path(p).exists() and os.path.samefile(path, p) for p in inputs):
        raise ValueError(f'-o {out} is one of the inputs; choose another -o')
    refuse_existing(path)


def make_codec(args, norm=None):
    ckpt = load_checkpoint(args.checkpoint, map_location='cpu')
    vae = model_from_checkpoint(ckpt, args.weights).float().to(args.device)
    codec = Codec(vae, norm or input_norm(ckpt, args.data_root), args.device)
    codec.fingerprint, codec.weights = fingerprint(vae), args.weights
    return codec, ckpt


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if args.decompress:
        header, payload = read_file(args.decompress)
        out = Path(args.out)
        for im in header['images']:   # before any decoding
            refuse_existing(out / safe_name(im['name']))
        codec, _ = make_codec(args, header['norm'])   # the encoder's input normalisation
        t = time.perf_counter()
        images = decompress(codec, header, payload, args.decompress)
        for name, pixels, mode in images:
            write_image(pixels, mode, out / safe_name(name))
        print(f'wrote {len(images)} PNGs to {out} ({len(images) / (time.perf_counter() - t):.1f} images/s)')
        return
    codec, ckpt = make_codec(args)
    if args.dataset:
        return measure(codec, ckpt, args)
    C, binary = codec.config['image_channels'], codec.norm['binary']
    items = gather_inputs(args.inputs)
    read = [read_image(path, C, binary) for _, path in items]
    images, modes = [p for p, _ in read], [m for _, m in read]
    T = tile_size(codec.config)
    n_tiles = sum(-(-p.shape[1] // T) * -(-p.shape[2] // T) for p in images)
    # bits/dim of the images, not of their padded tiles: their dimensions spread over the tiles
    progress = Progress('compress', n_tiles / len(images), sum(p.size for p in images) / n_tiles, n_tiles)
    header, words, stats = compress(codec, images, modes, [n for n, _ in items], args.batch_size, args.borrow, progress)
    write_file(args.out, header, words)
    dims = sum(p.size for p in images)
    print(f"wrote {args.out}: {len(images)} images, {os.path.getsize(args.out):,} bytes; "
          f"payload {stats['payload_bits'] / dims:.4f} bits/dim + initial bits {stats['initial_bits']:,} "
          f"({stats['initial_bits'] / dims:.4f} bits/dim)")


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:   # bad input, an unwritable output: one line
        sys.exit(f'error: {e}')
