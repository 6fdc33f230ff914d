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
Each run lives in out_dir/MODEL-dL; a finished run is not trained again (delete its folder to redo it).
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
    result = os.path.join(out, 'eval.json')
    if not os.path.exists(result):
        run(['evaluate.py', ckpt, '--json', result, '--kl_png', os.path.join(out, 'kl.png'),
             '--data_root', args.data_root, *(['--iw', str(args.iw)] if args.iw else [])], log)
    with open(result) as f:
        record = json.load(f)
    with open(os.path.join(out, 'log.jsonl')) as f:
        record['train_minutes'] = [json.loads(l) for l in f if '"minutes"' in l][-1]['minutes']
    print(f"{model} depth {depth}: {record['nelbo']:.3f} {record['unit']}, "
          f"{len(record['active_layers'])}/{depth} active ({(time.time() - t0) / 60:.1f} min)", flush=True)
    return dict(record, model=model, depth=depth)


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
    if args.steps < 1 or args.batch_size < 1 or args.iw < 0 or min(args.depths) < 1:
        raise ValueError('need --steps, --batch_size and every depth >= 1, and --iw >= 0')
    args.out_dir, args.data_root = os.path.abspath(args.out_dir), os.path.abspath(os.path.expanduser(args.data_root))
    records = [train_and_evaluate(m, d, args) for m in args.models for d in args.depths]
    text = table(records, args)
    with open(os.path.join(args.out_dir, 'table.md'), 'w') as f:
        f.write(text + '\n')
    print(text)
    print(f"active: KL of at least {100 * records[0]['active_share']:g}% of the rate; "
          f"wrote {os.path.join(args.out_dir, 'table.md')}")


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f'error: {e}')
