"""
From the official codes to hvae: their parameter names, configs and weights, and the command that
turns an official very deep VAE state dict (openai/vdvae's released *-model-ema.th files) into an
hvae checkpoint, so that sample.py, evaluate.py and compress.py run on the official models.

  python convert.py cifar10-seed0-iter-900000-model-ema.th --preset cifar10 -o vdvae-cifar10.pt
  python convert.py imagenet32-iter-1700000-model-ema.th --preset imagenet32 -o vdvae-imagenet32.pt

Any train.py flag that shapes the model or names its data may follow the preset (e.g. --data_root,
or the widths of a smaller model). The weights go into both the model and the EMA slots; the config
is the preset's with the flags over it. The official attentive VAE's run.py flags and weights
(TensorFlow layouts) map onto nvae.py's network below; the tests load the official fixtures so.
"""
import argparse
import os
import re
import sys

import numpy as np
import torch

import data
import figures
import train
from model import VAE, CHECKPOINT_FORMAT, MODEL_KEYS, nonfinite


# -----------------------------------------------------------------------------
# weights of the official code (openai/vdvae) -> hvae

def official_name(name):
    """Map one parameter name of the official model onto hvae's, e.g.
    decoder.dec_blocks.3.enc.c2.weight -> decoder.layers.3.posterior.conv2.weight."""
    name = name.removeprefix('module.')
    name = re.sub(r'\.c(\d)\.', r'.conv\1.', name)
    for old, new in (('encoder.in_conv.', 'encoder.stem.'), ('encoder.enc_blocks.', 'encoder.blocks.'),
                     ('decoder.dec_blocks.', 'decoder.layers.'), ('.enc.', '.posterior.'),
                     ('.resnet.', '.resblock.'), ('decoder.out_net.out_conv.', 'decoder.head.')):
        name = name.replace(old, new)
    return name


def load_official_vdvae(vae, state_dict):
    """Load a state dict of the official code into `vae` (strict: every tensor must match)."""
    mapped = {}
    for name, t in state_dict.items():
        if re.fullmatch(r'(module\.)?decoder\.bias_xs\.\d+', name):   # the starting state of resolution r
            mapped[f'decoder.state.{t.shape[-1]}'] = t
        else:
            mapped[official_name(name)] = t
    vae.load_state_dict(mapped, strict=True)
    return vae


# -----------------------------------------------------------------------------
# the official run.py flags -> hvae's config (ATTENTIVE.md 0 and 11)

def split_top(s, sep=','):
    """Split on `sep` outside brackets: 'a=[1,2],b=3' -> ['a=[1,2]', 'b=3']."""
    parts, depth, cur = [], 0, ''
    for ch in s:
        depth += (ch == '[') - (ch == ']')
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    return parts + [cur] if cur else parts


def parse_group(value):
    """'scale=[0,-2],use_nonlocal=True,nonlocop_hparams=[key_dim=32]' -> dict of python values."""
    out = {}
    for item in split_top(value):
        k, _, v = item.partition('=')
        v = v.strip()
        if v.startswith('[') and '=' in v:
            out[k.strip()] = parse_group(v[1:-1])
        elif v.startswith('['):
            out[k.strip()] = [int(float(t)) for t in split_top(v[1:-1])]   # official oddity: every list flag becomes integers (8.10)
        elif v in ('True', 'False'):
            out[k.strip()] = v == 'True'
        else:
            try:
                out[k.strip()] = float(v) if any(ch in v for ch in '.e') else int(v)
            except ValueError:
                out[k.strip()] = v
    return out


TOWER = {'scale', 'use_nonlocal', 'nonlocop_hparams', 'num_blocks', 'num_filters', 'num_nodes'}
SUPPORTED = {   # the flags of ATTENTIVE.md 11 (and a few neighbours) that hvae reads
    'hparams': {'layer_latent_shape', 'num_layers', 'data_distribution', 'num_proc_blocks'},
    'encoder_attention_hparams': {'key_dim', 'query_dim', 'use_layer_norm'},
    'decoder_attention_hparams': {'key_dim', 'query_dim', 'use_layer_norm'},
    'encoder_hparams': TOWER, 'decoder_hparams': TOWER, 'preproc_encoder_hparams': TOWER,
    'postproc_decoder_hparams': TOWER,
    'merge_encoder_hparams': {'use_nonlocal', 'nonlocop_hparams'}, 'merge_decoder_hparams': {'use_nonlocal', 'nonlocop_hparams'},
    'posterior_hparams': {'log_scale_upper_bound', 'log_scale_low_bound', 'noise_stddev'},
    'prior_hparams': {'log_scale_upper_bound', 'log_scale_low_bound', 'noise_stddev'},
    'data_dist_hparams': {'num_logistic_mix', 'log_scale_low_bound'},
}


def official_attentive_config(flags):
    """An official run.py flag string (the model flags of ATTENTIVE.md 11; --train_hparams and
    others are ignored) -> hvae config for NVAE. Unset flags take the official defaults (section 0)."""
    groups = {}
    for token in flags.split():
        name, _, value = token.lstrip('-').partition('=')
        groups[name] = parse_group(value) if name.endswith('hparams') else value
    if groups.get('dataset', 'cifar10') not in ('cifar10', 'omniglot', 'mnist'):
        raise ValueError(f"dataset {groups['dataset']!r} is not one hvae reads")
    binary = groups.get('dataset', 'cifar10') != 'cifar10'
    for name, group in groups.items():           # refuse what hvae would silently build otherwise
        allowed = SUPPORTED.get(name)
        if allowed is None:
            continue                             # --dataset, --train_hparams and other run flags
        for key, value in group.items():
            if key not in allowed:
                raise ValueError(f'--{name}: {key}={value} is not supported by hvae')
            if key == 'nonlocop_hparams' and set(value) - {'key_dim', 'query_dim'}:
                raise ValueError(f'--{name}: nonlocop_hparams {value} (only key_dim, query_dim) is not supported by hvae')
    h, enc, dec = groups.get('hparams', {}), groups.get('encoder_attention_hparams'), groups.get('decoder_attention_hparams')
    tower = lambda g: groups.get(g, {})
    if h.get('num_proc_blocks', 1) != 1:
        raise ValueError('num_proc_blocks other than 1 is not supported')
    widths_nl = {tower(g).get('nonlocop_hparams', {}).get('key_dim', 32) for g in
                 ('preproc_encoder_hparams', 'encoder_hparams', 'decoder_hparams', 'postproc_decoder_hparams',
                  'merge_decoder_hparams', 'merge_encoder_hparams') if tower(g).get('use_nonlocal')}
    if len(widths_nl) > 1:
        raise ValueError(f'non-local key widths differ between towers: {sorted(widths_nl)}')
    for g in (enc, dec):
        if g is not None and g.get('query_dim', g.get('key_dim', 20)) != g.get('key_dim', 20):
            raise ValueError('depth-wise attention with query_dim != key_dim is not supported')
    def scales(g, default):
        s = tower(g).get('scale', default)
        return s if isinstance(s, list) else [s] * tower(g).get('num_blocks', 2)
    posterior, prior, data = tower('posterior_hparams'), tower('prior_hparams'), tower('data_dist_hparams')
    if data.get('log_scale_low_bound', -7) != -7:
        raise ValueError('data_dist_hparams: hvae clamps the log-scales at the official -7 only')
    nodes = {tower(g).get('num_nodes', 2) for g in ('preproc_encoder_hparams', 'encoder_hparams', 'decoder_hparams', 'postproc_decoder_hparams')}
    if len(nodes) > 1:
        raise ValueError(f'num_nodes differs between towers: {sorted(nodes)}')
    config = dict(
        model='nvae', image_size=32, image_channels=1 if binary else 3, pad=2 if binary else 0,
        likelihood='bernoulli' if binary or h.get('data_distribution') == 'bernoulli' else 'dmol',
        num_mixtures=data.get('num_logistic_mix', 5), num_layers=h.get('num_layers', 16), zdim=h.get('layer_latent_shape', [16, 16, 20])[-1],
        preproc_filters=tower('preproc_encoder_hparams').get('num_filters', 16),
        preproc_scales=tuple(scales('preproc_encoder_hparams', -2)),
        postproc_scales=tuple(scales('postproc_decoder_hparams', -2)),
        dec_filters=tower('decoder_hparams').get('num_filters', 16),
        enc_tower_blocks=tower('encoder_hparams').get('num_blocks', 2), dec_tower_blocks=tower('decoder_hparams').get('num_blocks', 2),
        num_nodes=nodes.pop(),
        preproc_nonlocal=tower('preproc_encoder_hparams').get('use_nonlocal', False),
        enc_nonlocal=tower('encoder_hparams').get('use_nonlocal', False),
        dec_nonlocal=tower('decoder_hparams').get('use_nonlocal', False),
        postproc_nonlocal=tower('postproc_decoder_hparams').get('use_nonlocal', False),
        merge_decoder_nonlocal=tower('merge_decoder_hparams').get('use_nonlocal', False),
        merge_encoder_nonlocal=tower('merge_encoder_hparams').get('use_nonlocal', False),
        nonlocal_width=widths_nl.pop() if widths_nl else 32,
        enc_key=enc.get('key_dim', 20) if enc is not None else 0, dec_key=dec.get('key_dim', 20) if dec is not None else 0,
        enc_layer_norm=bool(enc and enc.get('use_layer_norm', False)), dec_layer_norm=bool(dec and dec.get('use_layer_norm', False)),
        posterior_bounds=(float(posterior.get('log_scale_low_bound', -5.0)), float(posterior.get('log_scale_upper_bound', 5.0))),
        prior_bounds=(float(prior.get('log_scale_low_bound', -5.0)), float(prior.get('log_scale_upper_bound', 5.0))),
        posterior_noise=float(posterior.get('noise_stddev', -1.0)), prior_noise=float(prior.get('noise_stddev', -1.0)))
    for g in ('encoder_hparams', 'decoder_hparams'):
        if any(scales(g, 0)):
            raise ValueError(f'{g}: the per-layer towers keep their resolution (scale 0)')
    return config


# -----------------------------------------------------------------------------
# official weights (object paths, TF layouts) -> hvae (ATTENTIVE.md; shared/data/reference/README.md)

PATH_RULES = [   # applied in order to an official object path
    (r'^_preproc_encoder\.0\.', 'preprocess.'),
    (r'^_data_layer\._preproc_layer\.0\.', 'postprocess.'),
    (r'^_data_layer\._data_dist\._params_network\._conv2d_layers\.', 'head.convs.'),
    (r'^_merge_decoder\.', 'merge.'),
    (r'^_ctx_layer_norm\.', 'context_norms.'),
    (r'^_latent_layer\.', 'layers.'),
    (r'\._stem_layer\.', '.stem.'),
    (r'\._residual_blocks\.', '.blocks.'),
    (r'\._shortcut\._output_layers\.0\._conv2d_layers\.0\.', '.shortcut.conv.'),     # the upsampling shortcut
    (r'\._shortcut\._output_layers\.0\._nonlocal_layer\.', '.shortcut.nonlocal_block.'),
    (r'\._shortcut\.conv_(\d)\.', lambda m: f'.shortcut.convs.{int(m[1]) - 1}.'),  # FactorizedReduce
    (r'\._nodes\.0\._output_layers\.0\.', '.nodes.0.'),                             # the upsampling node
    (r'\._nodes\.', '.nodes.'),
    (r'\._(prior|posterior)_network\._params_network\._conv2d_layers\.', r'.\1.convs.'),
    (r'\._conv2d_layers\.0\.', '.conv.'),
    (r'\._batch_norm_layer\.', '.bn.'),
    (r'\._nonlocal_layer\._alignment_function\.scale$', '.nonlocal_block.scale'),
    (r'\._nonlocal_layer\.(query|key|value)_conv\.', r'.nonlocal_block.\1.'),
    (r'\._nonlocal_layer\.gamma$', '.nonlocal_block.gamma'),
    (r'\._encoder_network\.', '.encoder.'),
    (r'\._decoder_network\._var$', '.constant'),
    (r'\._decoder_network\.', '.decoder.'),
    (r'\._merge_decoder_network\._conv2d_layer\.', '.merge_decoder.conv.'),
    (r'\._merge_(de|en)coder_network\._nonlocal_layer\.', r'.merge_\1coder.nonlocal_block.'),
    (r'^merge\._nonlocal_layer\.', 'merge.nonlocal_block.'),
    (r'\._merge_encoder_network\._conv2d_layer_a\.', '.merge_encoder.conv_a.'),
    (r'\._merge_encoder_network\._conv2d_layer\.', '.merge_encoder.conv_b.'),
    (r'\._conv2d_layer\.', '.conv.'),                                               # the final merge
    (r'\._gamma$', '.decoder_attention.gate'),
    (r'\._encoder_gamma$', '.encoder_attention.gate'),
    (r'\._ctx_layer_norm_layer\.', '.decoder_attention.context_norm.'),
    (r'\._attention_layer_norm_layer2\.', '.decoder_attention.attended_norm.'),
    (r'\._attention_layer_norm_layer\.', '.decoder_attention.newest_norm.'),
    (r'\._cond_attention_layer_norm_layer\.', '.encoder_attention.feature_norm.'),
    (r'\._encoder_attention_layer_norm_layer\.', '.encoder_attention.attended_norm.'),
    (r'\._(decoder|encoder)_attention\._alignment_function\.scale$', r'.\1_attention.scale'),
    (r'\.layer\.bias$', '.bias'),
    (r'\.bn\.gamma$', '.bn.weight'), (r'\.bn\.beta$', '.bn.bias'),
    (r'\.bn\.moving_mean$', '.bn.running_mean'), (r'\.bn\.moving_variance$', '.bn.running_var'),
    (r'(norm(?:s\.\d+)?)\.gamma$', r'\1.weight'), (r'(norm(?:s\.\d+)?)\.beta$', r'\1.bias'),
]


def hvae_name(path):
    """One official object path -> the name of hvae's parameter or buffer, e.g.
    _latent_layer.1._decoder_network._residual_blocks.0._nodes.1._conv2d_layers.0.v
    -> layers.1.decoder.blocks.0.nodes.1.conv.v"""
    for pattern, repl in PATH_RULES:
        path = re.sub(pattern, repl, path)
    return path


def to_torch_layout(name, array):
    """TF layouts -> NCHW: kernels (kh, kw, in, out) -> (out, in, kh, kw), the constant
    (1, h, w, C) -> (1, C, h, w)."""
    t = torch.as_tensor(np.asarray(array))
    if t.ndim == 4:
        return t.permute(0, 3, 1, 2) if name.endswith('.constant') else t.permute(3, 2, 0, 1)
    return t


@torch.no_grad()
def load_official_attentive(vae, weights, paths):
    """Load the official model's weights: weights {key: array} (TF layouts, BatchNorm moving
    statistics included), paths {key: official object path}. -> {key: hvae name it went into};
    the depth-wise attention scales, when held at 1, go nowhere (their key maps to None; they must
    be 1). Every hvae parameter and buffer (but BatchNorm's step counters) must be covered."""
    state = vae.state_dict()
    done, mapped = set(), {}
    for key, path in paths.items():
        name = hvae_name(path)
        if name not in state and re.search(r'_attention\.scale$', name) and not vae.config['trainable_scales']:
            if not np.allclose(np.asarray(weights[key]), 1.0):
                raise ValueError(f'{path}: a depth-wise scale of {float(np.asarray(weights[key]))} where hvae holds it at 1')
            mapped[key] = None
            continue
        if name not in state:
            raise KeyError(f'{path} -> {name}: no such hvae parameter')
        t = to_torch_layout(name, weights[key])
        if t.shape != state[name].shape:
            raise ValueError(f'{path} -> {name}: shape {tuple(t.shape)} where hvae has {tuple(state[name].shape)}')
        state[name].copy_(t)
        done.add(name)
        mapped[key] = name
    missing = [k for k in state if k not in done and not k.endswith('num_batches_tracked')]
    if missing:
        raise KeyError(f'{len(missing)} hvae tensors not in the official weights, e.g. {missing[0]}')
    return mapped


# the train.py flags a converted checkpoint keeps: the model's shape and where its data is
KEPT = set(MODEL_KEYS) | {'preset', 'depth', 'dataset', 'data_root', 'folders', 'download'}


def convert(path, config):
    """-> an hvae checkpoint dict holding the official weights at `path` under `config`."""
    if config['model'] != 'vdvae':
        raise ValueError(f"the official weights are very deep VAE weights; the config's model is {config['model']!r}")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'{path}: no such file') from None
    except Exception as e:
        raise ValueError(f'{path} is not a readable PyTorch state dict ({type(e).__name__}: {str(e)[:100]})') from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f'{path} is not a state dict (a dict of tensors)')
    bad = nonfinite(state)
    if bad:
        raise ValueError(f'{path}: {len(bad)} tensors hold NaN or inf, e.g. {bad[0]}')
    vae = VAE(config)
    try:
        load_official_vdvae(vae, state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the {config['preset']} preset: {str(e).splitlines()[1].strip()[:160]}") from None
    weights = vae.state_dict()
    return dict(format=CHECKPOINT_FORMAT, config=config, step=0, model=weights, ema=weights,
                counts=dict(images=0, elapsed=0.0), source=os.path.basename(str(path)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('state_dict', help='the official .th file')
    p.add_argument('-o', '--out', required=True, help='the hvae checkpoint to write')
    args, rest = p.parse_known_args(argv)
    flags = train.parse_args(rest)
    ignored = [k for k, v in vars(flags).items()
               if k not in KEPT and v is not None and not (k in ('resume', 'dry_run') and not v)]
    if ignored:
        raise ValueError(f"--{ignored[0]} steers a run; convert.py reads only the model's shape and its data")
    config = train.make_config(flags)
    if config['dataset'] in data.IMAGE_SHAPES:   # before the work: a model that cannot read its data
        data.check_shape(*data.IMAGE_SHAPES[config['dataset']], config, config['dataset'])
    figures.check_out(args.out, '-o')   # before the work; and never over a file, the input included
    if os.path.lexists(args.out):
        raise ValueError(f'{args.out} already exists: remove it or choose another -o')
    ckpt = convert(args.state_dict, config)
    figures.write_atomic(args.out, lambda tmp: torch.save(ckpt, tmp))
    n = sum(t.numel() for t in ckpt['model'].values())
    print(f"wrote {args.out}: {config['preset']} preset, {n:,} parameters from {args.state_dict}")


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f'error: {e}')
