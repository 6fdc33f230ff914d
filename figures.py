"""
Figures drawn with Pillow alone: the KL of every layer as a bar chart (evaluate.py writes one) and
as a heatmap over training steps (the attentive VAE paper's per-layer KL figure), and labelled
image grids (sample.py --layers_figure).

  python figures.py kl_heatmap runs/cpu/log.jsonl --out figures/cpu_kl_heatmap.png
  python figures.py kl_heatmap runs/cpu/log.jsonl --share --out kl_share.png   # colour: share of the rate

Layer 0 is the top of the decoder (the coarsest, first sampled); KL in bits per image.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

INK, GRID, BAR = (30, 30, 30), (225, 225, 225), (70, 110, 180)
# a dark-to-light colour scale (navy, purple, magenta, orange, pale yellow): brighter = more KL
SCALE_ANCHORS = np.array([(20, 20, 60), (75, 30, 125), (170, 50, 110), (235, 115, 50), (250, 235, 130)], float)
MAX_TEXT_WIDTH = 1600   # a title or subtitle widens a figure up to this many pixels, no further


# -----------------------------------------------------------------------------
# shared helpers

def check_out(path, flag='--out', image=False, source=None):
    """Refuse, before any work, an output path we could not write: its folder missing, a folder
    itself, (image=True) an extension Pillow cannot write, or the input file `source` itself."""
    folder = os.path.dirname(os.path.abspath(path))
    if source is not None and os.path.isfile(path) and os.path.isfile(source) and os.path.samefile(path, source):
        raise ValueError(f'{flag} {path} is the input {source}: writing it would destroy it')
    if not os.path.isdir(folder):
        raise ValueError(f'{flag} {path}: the folder {folder} does not exist')
    if os.path.isdir(path):
        raise ValueError(f'{flag} {path} is a folder; give a file name')
    if not os.access(folder, os.W_OK):
        raise ValueError(f'{flag} {path}: the folder {folder} is not writable')
    if image and Image.registered_extensions().get(os.path.splitext(path)[1].lower()) not in Image.SAVE:
        raise ValueError(f'{flag} {path}: not an image extension Pillow writes; use .png (or .jpg, .webp, .bmp, ...)')


def write_atomic(path, write):
    """write(tmp) to a temp file beside `path`, then rename it onto `path`: an interrupted write
    leaves the old file or none, never half of one. The temp name keeps the extension, from which
    Pillow picks the format."""
    root, ext = os.path.splitext(path)
    tmp = f'{root}.tmp{ext}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def font(size):
    """Pillow's built-in font at `size` pixels (older Pillow without sizes: the small bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text_size(draw, s, f):
    left, top, right, bottom = draw.textbbox((0, 0), s, font=f)
    return right - left, bottom - top


def vertical_text(image, s, f, centre):
    """Paste `s` rotated 90 degrees (reading bottom to top) centred at `centre`."""
    w, h = text_size(ImageDraw.Draw(image), s, f)
    label = Image.new('RGB', (w + 4, h + 8), 'white')
    ImageDraw.Draw(label).text((2, 0), s, fill=INK, font=f)
    label = label.rotate(90, expand=True)
    image.paste(label, (int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)))


def colour(t):
    """t in [0, 1] -> an RGB tuple on the colour scale."""
    pos = min(max(float(t), 0.0), 1.0) * (len(SCALE_ANCHORS) - 1)
    i = min(int(pos), len(SCALE_ANCHORS) - 2)
    return tuple(int(round(c)) for c in SCALE_ANCHORS[i] + (pos - i) * (SCALE_ANCHORS[i + 1] - SCALE_ANCHORS[i]))


def nice_ticks(hi, n=5, cover=False):
    """Round tick values 0, step, 2 step, ... up to hi (past it, to the next tick, with cover)."""
    if hi <= 0:
        return [0.0]
    raw = hi / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    last = math.ceil(hi / step - 1e-9) if cover else int(hi / step + 1e-9)
    return [i * step for i in range(last + 1)]


def fmt(v):
    if v == int(v) or abs(v) >= 10:
        return f'{v:.0f}'
    return f'{v:.1f}' if abs(v) >= 1 else f'{v:.2f}'


def shorten(draw, s, f, room):
    """s, or its start and '...' if it is wider than room pixels."""
    if text_size(draw, s, f)[0] <= room:
        return s
    s = s[:int(len(s) * room / text_size(draw, s, f)[0])]   # about the right length, then trim
    while s and text_size(draw, s + '...', f)[0] > room:
        s = s[:-1]
    return s + '...'


def canvas(width, height, title, subtitle=''):
    """A white image with a title (and a smaller subtitle) at the top, widened to fit them up to
    MAX_TEXT_WIDTH pixels (longer ones end in '...') -> (image, draw)."""
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    room = max(width, MAX_TEXT_WIDTH) - 40
    title, subtitle = shorten(measure, title, font(22), room), shorten(measure, subtitle, font(15), room)
    width = max(width, text_size(measure, title, font(22))[0] + 40, text_size(measure, subtitle, font(15))[0] + 40)
    image = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(image)
    draw.text((width // 2, 14), title, fill=INK, font=font(22), anchor='mt')
    if subtitle:
        draw.text((width // 2, 44), subtitle, fill=(90, 90, 90), font=font(15), anchor='mt')
    return image, draw


# -----------------------------------------------------------------------------
# per-layer KL as bars (evaluate.py)

def bar_chart(values, path, title, subtitle='', ylabel='KL (bits per image)', xlabel='layer (0 = top of the decoder)'):
    """One bar per layer with its value; y axis from 0, labelled ticks and gridlines."""
    n = len(values)
    bar_w = max(14, min(60, 900 // max(n, 1)))
    left, right, top, bottom = 100, 30, 90, 80
    plot_w, plot_h = n * bar_w, 380
    image, draw = canvas(max(left + plot_w + right, 640), top + plot_h + bottom, title, subtitle)
    x0, y0 = left, top + plot_h                                    # the plot's bottom-left corner
    ticks = nice_ticks(max(max(values), 1e-9), cover=True)
    y_max = ticks[-1] if ticks[-1] > 0 else 1.0
    small = font(14)
    for t in ticks:
        y = y0 - plot_h * t / y_max
        draw.line([(x0, y), (x0 + plot_w, y)], fill=GRID)
        draw.text((x0 - 8, y), fmt(t), fill=INK, font=small, anchor='rm')
    every = max(1, math.ceil(n / 30))                              # thin out the labels of deep models
    for i, v in enumerate(values):
        xa = x0 + i * bar_w
        h = plot_h * max(v, 0.0) / y_max
        draw.rectangle([xa + 2, y0 - h, xa + bar_w - 3, y0], fill=BAR)
        if i % every == 0:
            draw.text((xa + bar_w / 2, y0 + 6), str(i), fill=INK, font=small, anchor='mt')
        if n <= 24 and bar_w >= 28:
            draw.text((xa + bar_w / 2, y0 - h - 3), fmt(v), fill=INK, font=font(11), anchor='mb')
    draw.line([(x0, top), (x0, y0), (x0 + plot_w, y0)], fill=INK, width=2)
    draw.text((x0 + plot_w / 2, y0 + 34), xlabel, fill=INK, font=font(16), anchor='mt')
    vertical_text(image, ylabel, font(16), (30, top + plot_h / 2))
    image.save(path)
    return image


# -----------------------------------------------------------------------------
# per-layer KL over training as a heatmap (the attentive VAE paper's figure)

def heatmap(matrix, columns, path, title, subtitle='', scale_label='KL (bits per image)',
            xlabel='training step', ylabel='layer (0 = top of the decoder)', vmax=None):
    """matrix: (rows, cols), row 0 drawn at the top; columns: the x value of each column.
    Colour from 0 to vmax (default: the largest value; larger values get the top colour and the
    colour bar's top reads '>= vmax'), with a labelled colour bar on the right."""
    matrix = np.asarray(matrix, float)
    rows, cols = matrix.shape
    cell_h = max(12, min(36, 520 // rows))
    cell_w = max(8, min(90, 760 // cols))
    left, right, top, bottom = 110, 150, 90, 80
    plot_w, plot_h = cols * cell_w, rows * cell_h
    image, draw = canvas(max(left + plot_w + right, 700), top + plot_h + bottom, title, subtitle)
    x0, y0 = left, top
    hi = vmax or max(matrix.max(), 1e-9)
    for r in range(rows):
        for c in range(cols):
            draw.rectangle([x0 + c * cell_w, y0 + r * cell_h, x0 + (c + 1) * cell_w - 1, y0 + (r + 1) * cell_h - 1],
                           fill=colour(matrix[r, c] / hi))
    small = font(14)
    every_row = max(1, math.ceil(rows * 16 / plot_h))
    for r in range(0, rows, every_row):
        draw.text((x0 - 8, y0 + (r + 0.5) * cell_h), str(r), fill=INK, font=small, anchor='rm')
    label_w = max(text_size(draw, str(v), small)[0] for v in columns) + 10
    every_col = max(1, math.ceil(label_w / cell_w))
    for c in range(0, cols, every_col):
        draw.text((x0 + (c + 0.5) * cell_w, y0 + plot_h + 6), str(columns[c]), fill=INK, font=small, anchor='mt')
    draw.rectangle([x0 - 1, y0 - 1, x0 + plot_w, y0 + plot_h], outline=INK)
    draw.text((x0 + plot_w / 2, y0 + plot_h + 34), xlabel, fill=INK, font=font(16), anchor='mt')
    vertical_text(image, ylabel, font(16), (30, y0 + plot_h / 2))
    # the colour bar: value increases upwards
    bx, bw, bh = x0 + plot_w + 30, 22, max(plot_h, 120)
    for i in range(bh):
        draw.line([(bx, y0 + bh - 1 - i), (bx + bw, y0 + bh - 1 - i)], fill=colour(i / (bh - 1)))
    draw.rectangle([bx - 1, y0 - 1, bx + bw, y0 + bh], outline=INK)
    for t in nice_ticks(hi, 4):
        y = y0 + bh - 1 - (bh - 1) * t / hi
        draw.line([(bx + bw, y), (bx + bw + 5, y)], fill=INK)
        draw.text((bx + bw + 8, y), fmt(t), fill=INK, font=small, anchor='lm')
    if matrix.max() > hi:
        draw.text((bx + bw / 2, y0 - 6), f'>= {fmt(hi)}', fill=INK, font=small, anchor='mb')
    vertical_text(image, scale_label, font(15), (bx + bw + 75, y0 + bh / 2))
    write_atomic(path, image.save)
    return image


def parses(line):
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def kl_record(path, n, line):
    """One line of a log.jsonl -> (step, kl_per_layer) or None for a record without kl_per_layer."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} line {n}: not JSON ({e.msg}); give a run\'s log.jsonl') from None
    if not isinstance(rec, dict):
        what = {list: 'a list', str: 'a string', type(None): 'null'}.get(type(rec), 'a number')
        raise ValueError(f'{path} line {n}: {what}, not a record {{...}}; give a run\'s log.jsonl')
    if 'kl_per_layer' not in rec:
        return None
    kl, step = rec['kl_per_layer'], rec.get('step')
    number = lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool)   # null: train.py's NaN
    if not isinstance(kl, list) or not kl or not all(number(v) for v in kl):
        raise ValueError(f'{path} line {n}: kl_per_layer must be a non-empty list of numbers, not {str(kl)[:40]}')
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f'{path} line {n}: a record with kl_per_layer needs an integer step, not {step!r}')
    return step, kl


def read_kl_log(path):
    """The training records of a log.jsonl that carry kl_per_layer -> (steps, (L, T) KL in bits/image).
    A cut last line (a run killed mid-write) and records with a NaN, infinite or null KL (a window
    of skipped steps) are left out with a note on stderr; any other bad line is an error naming it."""
    if os.path.isdir(path):
        raise ValueError(f'{path} is a folder; give a run\'s log.jsonl')
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f'{path} is not a text file (a checkpoint or an image?); give a run\'s log.jsonl') from None
    while lines and not lines[-1].strip():
        lines.pop()
    steps, kls, bad = [], [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if n == len(lines) and line.lstrip().startswith('{') and not parses(line):   # cut short mid-write
            print(f'note: {path} line {n} is cut short (a run stopped mid-write?): skipped', file=sys.stderr)
            break
        rec = kl_record(path, n, line)
        if rec is None:
            continue
        if not all(v is not None and math.isfinite(v) for v in rec[1]):
            bad.append(rec[0])
            continue
        if kls and len(rec[1]) != len(kls[0]):
            raise ValueError(f'{path} line {n}: {len(rec[1])} layers in kl_per_layer, the records before had {len(kls[0])}')
        steps.append(rec[0])
        kls.append(rec[1])
    if bad:
        print(f'note: {path}: skipped {len(bad)} record(s) with a NaN or infinite kl_per_layer (steps '
              f'{", ".join(map(str, bad[:5]))}{", ..." if len(bad) > 5 else ""})', file=sys.stderr)
    if not kls:
        raise ValueError(f'{path}: no records with {"finite " if bad else ""}kl_per_layer')
    return steps, np.array(kls, float).T / math.log(2)      # nats -> bits


def kl_heatmap(log_path, out, share=False, title=None, vmax=None):
    steps, bits = read_kl_log(log_path)
    if share:   # each column: that window's share of the rate, in percent
        bits = 100 * bits / np.maximum(bits.sum(0, keepdims=True), 1e-12)
    what = 'share of the rate (%)' if share else 'KL (bits per image)'
    title = title or f'KL per layer during training: {log_path}'
    subtitle = (f'{bits.shape[0]} layers; mean over each logging window of training batches; '
                f'brighter = more {"of the rate" if share else "information"}')
    if vmax and bits.max() > vmax:
        subtitle += f'; above {fmt(vmax)}: top colour'
    return heatmap(bits, steps, out, title, subtitle, scale_label=what, vmax=vmax)


# -----------------------------------------------------------------------------
# labelled image grids (sample.py)

def labelled_grid(grid, row_labels, title, subtitle='', column_labels=None):
    """grid: uint8 (H, W, 3) of equal rows -> a PIL image with a title, a label left of each row
    and, optionally, labels above given column centres ({x: text})."""
    H, W = grid.shape[:2]
    f, left, top = font(16), 150, 80 if column_labels else 64
    image, draw = canvas(max(W + left + 20, 640), H + top + 16, title, subtitle)
    x0 = left + max(0, (image.width - left - 20 - W) // 2)
    image.paste(Image.fromarray(grid), (x0, top))
    row_h = H / len(row_labels)
    for i, label in enumerate(row_labels):
        draw.text((x0 - 10, top + (i + 0.5) * row_h), label, fill=INK, font=f, anchor='rm')
    for x, label in (column_labels or {}).items():
        draw.text((x0 + x, top - 4), label, fill=INK, font=font(14), anchor='mb')
    return image


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='figure', required=True)
    h = sub.add_parser('kl_heatmap', help='KL per layer over training steps from a run\'s log.jsonl')
    h.add_argument('log')
    h.add_argument('--out', default='kl_heatmap.png')
    h.add_argument('--share', action='store_true', help='colour by share of the rate instead of bits')
    h.add_argument('--title', help='default: names the log file')
    h.add_argument('--vmax', type=float, help='top of the colour scale (default: the largest value)')
    args = p.parse_args(argv)
    if args.vmax is not None and not (math.isfinite(args.vmax) and args.vmax > 0):
        raise ValueError(f'--vmax must be a finite positive number, not {args.vmax}')
    check_out(args.out, '--out', image=True)   # before reading the log
    image = kl_heatmap(args.log, args.out, args.share, args.title, args.vmax)
    print(f'wrote {args.out} ({image.width}x{image.height})')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:   # bad input, an unreadable log, an unwritable output: one line
        sys.exit(f'error: {e}')
