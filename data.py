"""
Datasets for hvae: CIFAR-10, MNIST, downsampled ImageNet and folders of images. Tensor datasets
come back whole as uint8 (N, C, H, W); training moves the train split to the device once and
indexes batches out of it (Batches). Folders are decoded on the fly by DataLoader workers
(FolderBatches). prepare() turns a uint8 batch into the encoder input and the likelihood target.
"""

import gzip
import hashlib
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

DATASETS = ('cifar10', 'mnist', 'imagenet32', 'imagenet64', 'folder')
CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR_MD5 = 'c58f30108f718f92721af3b95e74349a'
MNIST_URL = 'https://ossci-datasets.s3.amazonaws.com/mnist/'
MNIST_FILES = ('train-images-idx3-ubyte.gz', 't10k-images-idx3-ubyte.gz')  # labels are not needed
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp')
# the encoder input (x + shift) * scale as the official code normalises each fixed dataset
# (openai/vdvae data.py), so that its released weights read their inputs as trained
NORMALISATION = {'cifar10': (-120.63838, 1 / 64.16736), 'imagenet32': (-116.2373, 1 / 69.37404),
                 'imagenet64': (-115.92961967, 1 / 69.37404)}

# -----------------------------------------------------------------------------
# files: download, checksum, split

def fetch(url, path):
    # stream url into path.part, then rename, so an interrupted download never looks complete
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + '.part')
    print(f'downloading {url} -> {path}')
    try:
        with urllib.request.urlopen(url) as r, open(part, 'wb') as f:
            total, done = int(r.headers.get('Content-Length') or 0), 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                print(f'\r  {done / 1e6:.1f} of {total / 1e6:.1f} MB', end='', flush=True)
        print()
    except OSError as e:
        raise FileNotFoundError(f'could not download {url} ({e}); place {path.name} in {path.parent} yourself') from None
    os.replace(part, path)

def md5(path):
    h = hashlib.md5()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

def holdout(n, seed, valid_first=False):
    # a seeded permutation; 5000 images (at most a tenth) held out for validation
    perm = np.random.RandomState(seed).permutation(n)
    k = max(1, min(5000, n // 10))
    return (perm[k:], perm[:k]) if valid_first else (perm[:-k], perm[-k:])

def moments(chunks):
    # shift = -mean and scale = 1/std over every pixel of some uint8 tensors, with exact int64 sums
    s = s2 = n = 0
    for x in chunks:
        x = x.long()
        s, s2, n = s + x.sum().item(), s2 + (x * x).sum().item(), n + x.numel()
    if n == 0:
        raise ValueError('no readable training images to compute the input normalisation from')
    mean = s / n
    std = max(s2 / n - mean * mean, 0.0) ** 0.5
    return -mean, 1.0 / (std or 1.0)

# -----------------------------------------------------------------------------
# CIFAR-10: pickled batches, from the folder, the tarball or the web

def read_cifar_batch(path):
    # one pickled batch -> (N, 3, 32, 32) uint8; each row holds the R, G, B planes
    with open(path, 'rb') as f:
        try:
            d = pickle.load(f, encoding='latin1')
            d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}  # keys may be bytes
            x = np.asarray(d['data'])
        except Exception as e:
            raise ValueError(f'{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})') from None
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f'{path}: expected uint8 data of shape (N, 3072), found {x.dtype} {x.shape}')
    return x.reshape(-1, 3, 32, 32)

def fetch_cifar10(root, allow_download):
    # -> the folder of pickled batches, downloaded and extracted first where missing
    folder, tarball = root / 'cifar-10-batches-py', root / 'cifar-10-python.tar.gz'
    if not folder.is_dir():  # an existing folder is used as is: copies of it may have other md5s
        if not tarball.exists():
            if not allow_download:
                raise FileNotFoundError(f'CIFAR-10 not found in {root}: place cifar-10-batches-py/ there (from {CIFAR_URL}), '
                                        'or let train.py download it (without --no_download)')
            fetch(CIFAR_URL, tarball)
        got = md5(tarball)
        if got != CIFAR_MD5:
            raise ValueError(f'{tarball}: md5 is {got}, expected {CIFAR_MD5}; the file is corrupt or incomplete, delete it and retry')
        with tarfile.open(tarball) as tar:  # the 'data' filter refuses unsafe members, where Python has it
            tar.extractall(root, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
    return folder

def load_cifar10(root, allow_download):
    folder = fetch_cifar10(root, allow_download)
    train = np.concatenate([read_cifar_batch(folder / f'data_batch_{i}') for i in range(1, 6)])  # (50000, 3, 32, 32)
    test = read_cifar_batch(folder / 'test_batch')
    # the reference's split: sklearn's train_test_split(test_size=5000, random_state=11172018)
    tr, va = holdout(len(train), 11172018, valid_first=True)
    return train[tr], train[va], test

# -----------------------------------------------------------------------------
# MNIST: gzipped IDX files

def read_idx(path, magic):
    # IDX: big-endian int32 magic (its low byte is the number of dims), the dims, then uint8 values
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
    except Exception as e:
        raise ValueError(f'{path}: not a readable gzip file ({type(e).__name__}: {e})') from None
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim or int.from_bytes(raw[:4], 'big') != magic:
        raise ValueError(f'{path}: bad IDX header, expected magic number {magic}')
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise ValueError(f'{path}: holds {len(body)} values but its header promises {dims} = {int(np.prod(dims))}')
    return np.frombuffer(body, np.uint8).reshape(dims)

def binarize(x, seed):
    # a fixed Bernoulli draw, stored back as 0/255 uint8
    g = torch.Generator().manual_seed(seed)
    return (torch.bernoulli(torch.from_numpy(np.array(x)).float() / 255, generator=g) * 255).to(torch.uint8)

def fetch_mnist(root, allow_download):
    # -> the folder holding the IDX files (root/mnist or root itself), downloaded first where missing
    have = lambda d: all((d / f).exists() for f in MNIST_FILES)
    folder = next((d for d in (root / 'mnist', root) if have(d)), root / 'mnist')
    if not have(folder):
        if not allow_download:
            raise FileNotFoundError(f'MNIST not found in {folder}: place {" and ".join(MNIST_FILES)} there (from {MNIST_URL}), '
                                    'or let train.py download them (without --no_download)')
        for f in MNIST_FILES:
            if not (folder / f).exists():
                fetch(MNIST_URL + f, folder / f)
    return folder

def load_mnist(root, allow_download):
    folder = fetch_mnist(root, allow_download)
    train = read_idx(folder / MNIST_FILES[0], 2051)[:, None]  # (60000, 1, 28, 28)
    test = read_idx(folder / MNIST_FILES[1], 2051)[:, None]  # (10000, 1, 28, 28)
    tr, va = holdout(len(train), 42)
    # train stays greyscale (binarised afresh by prepare); valid and test are binarised once, for good
    return torch.from_numpy(train[tr]), binarize(train[va], 1), binarize(test, 0)

# -----------------------------------------------------------------------------
# downsampled ImageNet: user-supplied .npz or .npy files

def read_array_file(path, size):
    # .npz: 'data' uint8 (N, 3*S*S) in R, G, B planes; .npy: uint8 (N, S, S, 3) -> (N, 3, S, S)
    try:
        if path.suffix == '.npz':
            with np.load(path) as z:
                x = z['data']
        else:
            x = np.load(path, mmap_mode='r')
    except Exception as e:
        raise ValueError(f'{path}: not a readable numpy file ({type(e).__name__}: {e})') from None
    if path.suffix == '.npz' and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * size * size:
        return x.reshape(-1, 3, size, size)
    if path.suffix == '.npy' and x.dtype == np.uint8 and x.shape[1:] == (size, size, 3):
        return x.transpose(0, 3, 1, 2)
    raise ValueError(f'{path}: expected uint8 (N, {3 * size * size}) in a .npz or (N, {size}, {size}, 3) in a .npy, found {x.dtype} {x.shape}')

class ImageArray:
    # images = array[indices], without making that copy: uint8 (N, C, H, W) on the host, often a
    # memory-mapped .npy that every rank of a node reads through the one page cache. Indexing
    # (an int, a slice, indices) gives a uint8 tensor.
    def __init__(self, array, indices):
        self.array, self.indices = array, np.asarray(indices)
        self.shape = (len(self.indices), *array.shape[1:])

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        rows = self.indices[i.cpu().numpy() if isinstance(i, torch.Tensor) else i]
        if np.ndim(rows) == 0:
            return torch.from_numpy(np.ascontiguousarray(self.array[rows]))
        order = np.argsort(rows, kind='stable')           # read the file front to back, then restore the order
        picked = np.ascontiguousarray(self.array[rows[order]])
        out = np.empty_like(picked)
        out[order] = picked
        return torch.from_numpy(out)

    def nbytes(self):
        return len(self) * int(np.prod(self.array.shape[1:])) * self.array.itemsize

def load_imagenet(root, size):
    # one copy at most: a single .npy is memory-mapped (no copy, shared by the node's ranks); several
    # files or an .npz are read into one array; train and valid are views of it through their indices
    folder = root / f'imagenet{size}'
    def read(split):
        files = sorted(p for p in (folder / split).glob('*') if p.suffix in ('.npz', '.npy'))
        if not files:
            raise FileNotFoundError(f'no .npz or .npy files in {folder / split}: put the {size}x{size} downsampled ImageNet '
                                    f'train files in {folder}/train/ and its validation files in {folder}/valid/ '
                                    f'(https://image-net.org/download-images, login needed)')
        arrays = [read_array_file(p, size) for p in files]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    train = read('train')
    tr, va = holdout(len(train), 42)
    test = read('valid')
    return ImageArray(train, tr), ImageArray(train, va), ImageArray(test, np.arange(len(test)))

# -----------------------------------------------------------------------------
# folders of images

def load_image(path, size):
    # any image file -> uint8 (3, S, S): RGB, centre-cropped to a square, resized to S
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ('RGBA', 'LA', 'PA') or 'transparency' in img.info:  # alpha: composite onto white
            img = Image.alpha_composite(Image.new('RGBA', img.size, 'white'), img.convert('RGBA'))
        img = img.convert('RGB')
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        img = img.resize((size, size), Image.LANCZOS if s > size else Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()

class ImageFolder(torch.utils.data.Dataset):
    # a list of image files; an unreadable one gives None (replaced in training, dropped in evaluation)
    def __init__(self, files, image_size):
        self.files, self.image_size = [str(f) for f in files], image_size
        self.shape = (len(self.files), 3, image_size, image_size)  # as a tensor split's
        self.reported = set()  # per process: print each bad file once

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return load_image(self.files[i], self.image_size)
        except Exception as e:
            if i not in self.reported:
                self.reported.add(i)
                print(f'unreadable image {self.files[i]} ({type(e).__name__}: {e})')
            return None

def collate(items):
    # drop the Nones of unreadable images; also say how many there were
    good = [x for x in items if x is not None]
    return (torch.stack(good) if good else None), len(items) - len(good)

def collate_in_place(items):
    # a training batch at full size: zeros where an image was unreadable, and those places
    bad = [i for i, x in enumerate(items) if x is None]
    good = next((x for x in items if x is not None), None)
    return (torch.stack([torch.zeros_like(good) if x is None else x for x in items]) if good is not None else None), bad

def list_images(folder):
    return sorted(p for p in folder.rglob('*') if p.suffix.lower() in IMAGE_EXTS and p.is_file())

def stored_folder(root, size, files):
    # the split a checkpoint stored (file names relative to root): images added since are left out,
    # so test images never move into training
    splits = {k: [root / f for f in names] for k, names in files.items()}
    gone = [f for names in splits.values() for f in names if not f.is_file()]
    if gone:
        raise FileNotFoundError(f"{len(gone)} images of the checkpoint's train/valid/test split are missing from {root} "
                                f"(e.g. {gone[0]}): point data_root at the folder the run was trained on")
    return [ImageFolder(splits[k], size) for k in ('train', 'valid', 'test')]

def load_folder(root, size, folders='', files=None):
    # files: a stored split (stored_folder); folders: comma-separated sub-folders of root to read,
    # e.g. FFHQ's images1024x1024 (beside it, thumbnails128x128 holds the same faces again)
    if size is None:
        raise ValueError("the 'folder' dataset needs image_size (the side of the square training images)")
    if not root.is_dir():
        raise FileNotFoundError(f'image folder {root} not found: point data_root at a folder of png/jpg/jpeg/webp images')
    if files is not None:
        return stored_folder(root, size, files)
    missing = [f for f in folders.split(',') if f and not (root / f).is_dir()]
    if missing:
        raise FileNotFoundError(f"no sub-folder {missing[0]}/ in {root}: --folders names the sub-folders of data_root "
                                f"to read ('' for all of it)")
    pick = lambda files, idx: [files[i] for i in sorted(idx)]
    if (root / 'train').is_dir() and (root / 'test').is_dir() and not folders:
        train, test = list_images(root / 'train'), list_images(root / 'test')
        if (root / 'valid').is_dir():
            valid = list_images(root / 'valid')
        else:  # hold out 5% of train/ (at least one image) for validation
            perm = np.random.RandomState(42).permutation(len(train))
            k = max(1, len(train) // 20)
            train, valid = pick(train, perm[k:]), pick(train, perm[:k])
    else:  # one folder, or the named sub-folders as one: 90% train, 5% valid, 5% test (at least one image each)
        files = sorted(f for sub in folders.split(',') if sub for f in list_images(root / sub)) if folders else list_images(root)
        perm = np.random.RandomState(42).permutation(len(files))
        k = max(1, len(files) // 20)
        train, valid, test = pick(files, perm[2 * k:]), pick(files, perm[k:2 * k]), pick(files, perm[:k])
    if not (train and valid and test):
        raise FileNotFoundError(f'too few images in {root}: need at least one image each for train, valid and test')
    return [ImageFolder(f, size) for f in (train, valid, test)]

def folder_moments(train):
    idx = np.random.RandomState(0).permutation(len(train))[:1000]
    return moments(x for x in map(train.__getitem__, idx) if x is not None)

# -----------------------------------------------------------------------------
# the entry point

def fetch_dataset(name, data_root, download=True):
    # download and extract what load_dataset would, and nothing else (the datasets that download)
    if name in ('cifar10', 'mnist'):
        (fetch_cifar10 if name == 'cifar10' else fetch_mnist)(Path(data_root).expanduser(), download)

def load_dataset(name, data_root, image_size=None, download=True, record=None, folders=''):
    # -> {'train', 'valid', 'test': uint8 (N, C, H, W) or ImageFolder, 'shift', 'scale', 'binary'}
    # image_size is required for 'folder' and ignored for the fixed-size datasets; record: what a
    # checkpoint stored (dataset_record), whose split and normalisation are then used
    root = Path(data_root).expanduser()
    if name == 'folder':
        train, valid, test = load_folder(root, image_size, folders, record['files'] if record else None)
        shift, scale = (record['shift'], record['scale']) if record else folder_moments(train)
        return dict(train=train, valid=valid, test=test, shift=shift, scale=scale, binary=False)
    info = load_fixed(name, root, download)
    return dict(info, shift=record['shift'], scale=record['scale']) if record else info

def load_fixed(name, root, download):
    if name == 'cifar10':
        train, valid, test = (torch.from_numpy(x) for x in load_cifar10(root, download))
        return dict(train=train, valid=valid, test=test, shift=NORMALISATION[name][0], scale=NORMALISATION[name][1],
                    binary=False)
    if name == 'mnist':
        train, valid, test = load_mnist(root, download)
        return dict(train=train, valid=valid, test=test, shift=0.0, scale=1.0, binary=True)
    if name in ('imagenet32', 'imagenet64'):
        train, valid, test = load_imagenet(root, int(name[8:]))
        return dict(train=train, valid=valid, test=test, shift=NORMALISATION[name][0], scale=NORMALISATION[name][1],
                    binary=False)
    raise ValueError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')

def load_run_dataset(config, record=None, download=False):
    # the dataset of a run's config; record: its checkpoint's 'dataset' (None for checkpoints older than it)
    return load_dataset(config['dataset'], config['data_root'], config['image_size'], download, record,
                        config.get('folders', ''))

def check_fits(info, config, name):
    # the model's input against the dataset's images, in one line before any work: a model of
    # another preset would fail deep inside a convolution, or score 0/1 pixels as colour levels
    check_shape(tuple(info['test'].shape[1:]), info['binary'], config, name)

# the images of the fixed-size datasets, (C, H, W) and binary: for a check without the files (convert.py)
IMAGE_SHAPES = {'cifar10': ((3, 32, 32), False), 'mnist': ((1, 28, 28), True),
                'imagenet32': ((3, 32, 32), False), 'imagenet64': ((3, 64, 64), False)}

def check_shape(got, got_binary, config, name):
    S, pad, binary = config['image_size'], config.get('pad', 0), config.get('likelihood', 'dmol') == 'bernoulli'
    want = (config.get('image_channels', 3), S - 2 * pad, S - 2 * pad)
    if got != want or got_binary != binary:
        kind = lambda shape, b: 'x'.join(map(str, shape)) + (' binary' if b else '')
        raise ValueError(f"{name} images are {kind(got, got_binary)}, the model takes {kind(want, binary)} "
                         "(image_channels x image_size - 2 pad, likelihood): use the dataset's preset")

def dataset_record(info, data_root):
    # what a checkpoint keeps of its data: the input normalisation and, for folders, the split as file
    # names relative to data_root, so that a resumed run, evaluate.py and sample.py see the same ones
    # whatever was added to the folder since
    record = dict(shift=float(info['shift']), scale=float(info['scale']))
    if isinstance(info['train'], ImageFolder):
        root = Path(data_root).expanduser()
        record['files'] = {k: [os.path.relpath(f, root) for f in info[k].files] for k in ('train', 'valid', 'test')}
    return record

def prepare(batch, info, bits=8, pad=0):
    # uint8 (B, C, H, W) -> (x_in, target), both float32 (B, C, H + 2 pad, W + 2 pad) on the batch's device
    if info['binary']:
        x = torch.bernoulli(batch.float() / 255)  # dynamic binarisation: a fresh draw each call
        x_in, target = x, x.clone()
    elif bits == 8:
        x = batch.float()
        x_in, target = (x + info['shift']) * info['scale'], x / 127.5 - 1
    elif bits == 5:
        k = (batch >> 3).float()  # 32 levels, 0..31
        x_in, target = (k * 255 / 31 + info['shift']) * info['scale'], k * 2 / 31 - 1
    else:
        raise ValueError(f'bits must be 8 or 5, got {bits}')
    if pad:
        x_in, target = F.pad(x_in, (pad,) * 4), F.pad(target, (pad,) * 4)
    return x_in, target

# -----------------------------------------------------------------------------
# batches

class Batches:
    # an endless stream of training batches, indexed straight out of a uint8 tensor on the device, or
    # out of host memory (a tensor or an ImageArray) and copied to the device batch by batch
    def __init__(self, images, batch_size, seed=0, rank=0, world_size=1, device=None):
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.device = torch.device(device) if device is not None else images.device
        self.resident = isinstance(images, torch.Tensor) and images.device == self.device
        self.rank, self.world_size = rank, world_size
        if self.steps_per_epoch < 1:
            raise ValueError(f'{len(images)} images are too few for batch size {batch_size} on {world_size} rank(s)')
        self.epoch, self.index = 0, 0  # position of the next batch
        self.cached = (None, None)  # (epoch, its shard on the device)

    @property
    def steps_per_epoch(self):
        # the same on every rank, so that all ranks change epoch together
        return len(self.images) // self.world_size // self.batch_size

    def shard(self, epoch):
        # this rank's indices for one epoch: every world_size-th entry of a seeded permutation
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
        perm = torch.randperm(len(self.images), generator=g)
        return perm[self.rank::self.world_size][:self.steps_per_epoch * self.batch_size]

    def advance(self):
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0

    def next(self):
        if self.cached[0] != self.epoch:
            self.cached = (self.epoch, self.shard(self.epoch).to(self.device if self.resident else 'cpu'))
        i = self.index * self.batch_size
        x = self.images[self.cached[1][i:i + self.batch_size]]  # (B, C, H, W) uint8
        self.advance()
        if not self.resident and self.device.type == 'cuda':   # pinned, so that the copy overlaps compute
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def state_dict(self):
        return {'epoch': self.epoch, 'index': self.index, 'global_batch': self.batch_size * self.world_size}

    def load_state_dict(self, state):
        # the position counts images, so that a run may resume on another number of processes: with
        # the same global batch (world_size x batch_size) every step sees the same images
        epoch, index = int(state['epoch']), int(state['index'])
        index = index * int(state.get('global_batch', self.batch_size * self.world_size)) // (self.batch_size * self.world_size)
        if epoch < 0 or not 0 <= index < self.steps_per_epoch:
            raise ValueError(f'batch position {state} is outside this dataset ({self.steps_per_epoch} steps per epoch)')
        self.epoch, self.index = epoch, index

class FolderBatches(Batches):
    # the same stream over an ImageFolder, decoded by DataLoader workers; unreadable files are replaced
    def __init__(self, dataset, batch_size, seed=0, rank=0, world_size=1, num_workers=2, device='cpu'):
        super().__init__(dataset, batch_size, seed, rank, world_size, device)
        self.num_workers = num_workers
        self.skipped = 0  # unreadable files replaced so far
        self.loader = None

    def batch_indices(self):
        # lists of dataset indices from the current position on, forever
        epoch, index = self.epoch, self.index
        while True:
            shard = self.shard(epoch)
            for i in range(index, self.steps_per_epoch):
                yield shard[i * self.batch_size:(i + 1) * self.batch_size].tolist()
            epoch, index = epoch + 1, 0

    def next(self):
        if self.loader is None:
            self.loader = iter(torch.utils.data.DataLoader(
                self.images, batch_sampler=self.batch_indices(), num_workers=self.num_workers,
                collate_fn=collate_in_place, pin_memory=self.device.type == 'cuda'))
        x, bad = next(self.loader)
        if bad:
            x = self.replace(x, bad)
        self.skipped += len(bad)
        self.advance()
        return x.to(self.device, non_blocking=True)

    def replace(self, x, bad):
        # an unreadable image gives its place to the next readable one of this rank's shard (in the
        # epoch's order, wrapping round): no batch shrinks, so shapes (no recompile under --compile)
        # and data positions stay the same on every rank
        shard = self.shard(self.epoch).tolist()
        start = self.index * self.batch_size
        rows = list(x) if x is not None else [None] * len(bad)
        for pos in bad:
            for k in range(1, len(shard)):
                image = self.images[shard[(start + pos + k) % len(shard)]]
                if image is not None:
                    break
            else:
                raise ValueError(f'no readable image among the {len(shard)} files of this rank\'s share of the epoch')
            rows[pos] = image
        return torch.stack(rows)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.loader = None  # restart the workers at the new position

DEVICE_SHARE = 0.1   # a training split is kept on a GPU when it takes at most this share of its memory

def device_memory(device):
    # bytes of memory of a CUDA device; None for the CPU, whose memory is the host's
    return torch.cuda.get_device_properties(device).total_memory if device.type == 'cuda' else None

def keeps_on_device(split, device, memory=None):
    # CIFAR-10 (138 MB) and MNIST go to any GPU; ImageNet-64 (15.1 GB) stays in host memory on a 24 GB
    # or 80 GB one. On the CPU, tensors are used where they are and ImageArrays read from their file.
    memory = device_memory(device) if memory is None else memory
    nbytes = split.nbytes() if isinstance(split, ImageArray) else split.numel() * split.element_size()
    if memory is None:
        return isinstance(split, torch.Tensor)
    return nbytes <= DEVICE_SHARE * memory

def make_batches(split, batch_size, seed=0, rank=0, world_size=1, device='cpu', num_workers=2, memory=None):
    # memory: the device's bytes, to decide where the split lives (default: read from the device)
    device = torch.device(device)
    if isinstance(split, ImageFolder):
        return FolderBatches(split, batch_size, seed, rank, world_size, num_workers, device)
    if keeps_on_device(split, device, memory):
        images = split if isinstance(split, torch.Tensor) else split[np.arange(len(split))]
        return Batches(images.to(device), batch_size, seed, rank, world_size)
    return Batches(split, batch_size, seed, rank, world_size, device)

def eval_batches(split, batch_size, device='cpu', rank=0, world_size=1, num_workers=2):
    # every image once (rank's share: every world_size-th), in order, as uint8 (B, C, H, W) on
    # device; the last batch may be smaller
    if isinstance(split, ImageFolder):
        share = torch.utils.data.Subset(split, range(rank, len(split), world_size))
        loader = torch.utils.data.DataLoader(share, batch_size, num_workers=num_workers, collate_fn=collate)
        for x, _ in loader:
            if x is not None:
                yield x.to(device)
    else:
        share = split[rank::world_size] if world_size > 1 else split
        for i in range(0, len(share), batch_size):
            yield share[i:i + batch_size].to(device)
