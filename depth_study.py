"""
The depth study: train the NVAE baseline (local couplings only) and the attentive VAE at depths 2,
4, 8 and 16 for a fixed number of steps each, evaluate each on the test split, and print a markdown
table: this project's version of the attentive VAE paper's depth table (DESIGN.md 2.6: local
model, L = 2, 4, 8, 16, 30 -> 3.50, 3.26, 3.06, 2.96, 2.91 bits/dim).

  python depth_study.py --data_root ../shared/data --steps 200 --out_dir runs/depth
  python depth_study.py --data_root ../shared/data --depths 2 4 --models local --steps 20   # a quick look

Models: the official architecture at CPU size, `nvae_cpu` (local) and `attentive_cpu`, with
`--depth L` stochastic layers at their one latent scale, 16x16, each with its own encoder and
decoder tower, as in the paper's depth study.
Each run lives in out_dir/MODEL-dL; a finished run is not trained again (delete its folder to redo it),
a shorter one trains on to --steps, and a folder trained with another seed, batch size or data root,
or past --steps, is refused. Its eval.json is reused only for the same checkpoint and settings.
Runs use one thread unless OMP_NUM_THREADS says otherwise: on a shared 2-core machine two threads
per process made training 10x slower.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from figures import write_atomic
from model import load_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))
PRESET = {'local': 'nvae_cpu', 'attentive': 'attentive_cpu'}


def run(cmd, log):
    """Run a script of this repository, appending its output to `log`; stop the study on failure."""
    with open(log, 'a') as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        env = {'OMP_NUM_THREADS': '1', **os.environ}
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {p.returncode}); see {log}")


def check_run(out, model, depth, args):
    """Refuse, in one line, a run folder trained with other settings or past --steps: its results
    would not be this study's. A folder without checkpoints is a fresh run."""
    paths = sorted(glob.glob(os.path.join(out, 'ckpt-*.pt')))
    if not paths:
        return
    ckpt = load_checkpoint(paths[-1])
    c, want = ckpt['config'], dict(preset=PRESET[model], num_layers=depth, seed=args.seed,
                                   batch_size=args.batch_size, data_root=args.data_root)
    clash = [f'{k} {c.get(k)!r} (asked: {v!r})' for k, v in want.items() if c.get(k) != v]
    if clash:
        raise ValueError(f"{out} holds a run with other settings: {', '.join(clash)}; "
                         'delete the folder or choose another --out_dir')
    if ckpt['step'] > args.steps:
        raise ValueError(f"{out} holds a run trained to step {ckpt['step']}, past --steps {args.steps}; "
                         'delete the folder or choose another --out_dir')


def eval_settings(ckpt, args):
    """What an eval.json was computed from: the checkpoint (name, size, time) and the flags."""
    st = os.stat(ckpt)
    return dict(checkpoint=os.path.basename(ckpt), size=st.st_size, mtime_ns=st.st_mtime_ns,
                seed=args.seed, batch_size=args.batch_size, data_root=args.data_root, iw=args.iw)


def reusable(record, settings):
    """An eval.json is reused only for the same checkpoint and settings; one with the IW bound also
    serves a study without it."""
    stored = record.get('study') if isinstance(record, dict) else None
    if not isinstance(stored, dict):
        return False
    same = lambda k: stored.get(k) == settings[k]
    return all(same(k) for k in settings if k != 'iw') and (same('iw') or settings['iw'] == 0)


def train_and_evaluate(model, depth, args):
    """-> the evaluation record of one (model, depth), training it first unless already done."""
    out = os.path.join(args.out_dir, f'{model}-d{depth}')
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, 'study.log')
    ckpt = os.path.join(out, f'ckpt-{args.steps:08d}.pt')
    t0 = time.time()
    if not os.path.exists(ckpt):
        resume = ['--resume'] if glob.glob(os.path.join(out, 'ckpt-*.pt')) else []
        run(['train.py', '--preset', PRESET[model], '--depth', str(depth), '--max_steps', str(args.steps),
             '--batch_size', str(args.batch_size), '--data_root', args.data_root, '--no_download',
             '--out_dir', out, '--log_every', '25', '--keep', '1', '--seed', str(args.seed), *resume], log)
    result, settings = os.path.join(out, 'eval.json'), eval_settings(ckpt, args)
    record = read_json(result) if os.path.exists(result) else None
    if not reusable(record, settings):
        run(['evaluate.py', ckpt, '--json', result, '--kl_png', os.path.join(out, 'kl.png'),
             '--data_root', args.data_root, *(['--iw', str(args.iw)] if args.iw else [])], log)
        record = dict(read_json(result), study=settings)
        text = json.dumps(record, indent=1)
        write_atomic(result, lambda tmp: Path(tmp).write_text(text))
    with open(os.path.join(out, 'log.jsonl')) as f:
        record['train_minutes'] = [json.loads(l) for l in f if '"minutes"' in l][-1]['minutes']
    print(f"{model} depth {depth}: {record['nelbo']:.3f} {record['unit']}, "
          f"{len(record['active_layers'])}/{depth} active ({(time.time() - t0) / 60:.1f} min)", flush=True)
    return dict(record, model=model, depth=depth)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, OSError):   # unreadable: evaluate again
        return None


def table(records, args):
    """The results as a markdown table."""
    iw = args.iw > 0
    head = ['model', 'depth', 'params', 'steps', 'test bits/dim (neg. ELBO)']
    head += [f'test bits/dim (IW, K = {args.iw})'] if iw else []
    head += ['active layers', 'rate (bits/image)', 'train minutes']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in records:
        row = [r['model'], str(r['depth']), f"{r['params']:,}", str(r['step']),
               f"{r['nelbo']:.3f} +- {r['nelbo_se']:.3f}"]
        row += [f"{r['iw_nll']:.3f} +- {r['iw_nll_se']:.3f}"] if iw else []
        row += [f"{len(r['active_layers'])} / {r['depth']}", f"{r['rate_bits']:.0f}", f"{r['train_minutes']:.1f}"]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_root', default='data')
    p.add_argument('--out_dir', default='runs/depth')
    p.add_argument('--models', nargs='+', choices=sorted(PRESET), default=['local', 'attentive'])
    p.add_argument('--depths', type=int, nargs='+', default=[2, 4, 8, 16])
    p.add_argument('--steps', type=int, default=200, help='training steps per run (a fixed budget)')
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--iw', type=int, default=0, help='also the importance-weighted bound with K samples')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.iw < 0 or min(args.depths) < 2:
        raise ValueError('need --steps and --batch_size >= 1, every depth >= 2 (the NVAE-style models need '
                         'two layers) and --iw >= 0')
    args.out_dir, args.data_root = os.path.abspath(args.out_dir), os.path.abspath(os.path.expanduser(args.data_root))
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f'--out_dir {args.out_dir} is a file, not a folder')
    for m in args.models:   # every run folder is checked before any is trained
        for d in args.depths:
            check_run(os.path.join(args.out_dir, f'{m}-d{d}'), m, d, args)
    records = [train_and_evaluate(m, d, args) for m in args.models for d in args.depths]
    text = table(records, args)
    write_atomic(os.path.join(args.out_dir, 'table.md'), lambda tmp: Path(tmp).write_text(text + '\n'))
    print(text)
    print(f"active: KL of at least {100 * records[0]['active_share']:g}% of the rate; "
          f"wrote {os.path.join(args.out_dir, 'table.md')}")


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f'error: {e}')
