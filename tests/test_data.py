"""
Tests for data.py. The real-data tests read the offline CIFAR-10 and MNIST copies in
../shared/data (or $HVAE_DATA) and fail, never skip, when they are missing.
"""

import gzip
import hashlib
import io
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402

SHARED = Path(os.environ.get('HVAE_DATA') or REPO.parent / 'shared' / 'data')
CIFAR_DIR = SHARED / 'cifar-10-batches-py'
MNIST_DIR = SHARED / 'mnist'


def need(path):
    assert path.exists(), f'shared test data missing: {path} (set HVAE_DATA to the folder holding cifar-10-batches-py/ and mnist/)'


@pytest.fixture(scope='module')
def cifar():
    need(CIFAR_DIR)
    return data.load_dataset('cifar10', SHARED, download=False)


@pytest.fixture(scope='module')
def cifar_raw():
    # the 50k training images in file order, read independently of data.py: (50000, 3072) uint8
    need(CIFAR_DIR)
    rows = []
    for i in range(1, 6):
        with open(CIFAR_DIR / f'data_batch_{i}', 'rb') as f:
            rows.append(pickle.load(f, encoding='bytes')[b'data'])
    return np.concatenate(rows)


@pytest.fixture(scope='module')
def mnist():
    need(MNIST_DIR)
    return data.load_dataset('mnist', SHARED, download=False)


def row_hashes(x):
    x = np.asarray(x).reshape(len(x), -1)
    return sorted(hashlib.md5(r.tobytes()).hexdigest() for r in x)


def fake_cifar(folder, n=10, seed=0):
    # five training batches and a test batch of n random images each, official layout
    folder.mkdir(parents=True)
    rng = np.random.RandomState(seed)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        d = {b'data': rng.randint(0, 256, (n, 3072)).astype(np.uint8), b'labels': [0] * n}
        with open(folder / name, 'wb') as f:
            pickle.dump(d, f, protocol=2)


def fake_cifar_tarball(tmp_path):
    fake_cifar(tmp_path / 'src' / 'cifar-10-batches-py')
    tarball = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(tarball, 'w:gz') as tar:
        tar.add(tmp_path / 'src' / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    return tarball

# -----------------------------------------------------------------------------
# CIFAR-10 from the shared copy

def test_cifar10_splits_have_reference_sizes_and_uint8(cifar):
    assert cifar['train'].shape == (45000, 3, 32, 32)
    assert cifar['valid'].shape == (5000, 3, 32, 32)
    assert cifar['test'].shape == (1000, 3, 32, 32)  # the shared copy holds the first 1000 test images
    assert all(cifar[k].dtype == torch.uint8 for k in ('train', 'valid', 'test'))
    assert (cifar['shift'], cifar['scale'], cifar['binary']) == (-120.63838, 1 / 64.16736, False)


def test_cifar10_train_and_valid_are_exactly_the_50k_training_images(cifar, cifar_raw):
    union = torch.cat([cifar['train'], cifar['valid']]).numpy()
    assert row_hashes(union) == row_hashes(cifar_raw)


def test_cifar10_valid_is_the_reference_sklearn_holdout(cifar, cifar_raw):
    # sklearn train_test_split(test_size=5000, random_state=11172018): test = perm[:5000], train = perm[5000:]
    perm = np.random.RandomState(11172018).permutation(50000)
    assert np.array_equal(cifar['valid'].numpy().reshape(5000, -1), cifar_raw[perm[:5000]])
    assert np.array_equal(cifar['train'][:100].numpy().reshape(100, -1), cifar_raw[perm[5000:5100]])


def test_cifar10_first_image_keeps_planar_rgb_layout(cifar, cifar_raw):
    union = torch.cat([cifar['train'], cifar['valid']])
    hits = ((union[:, 0, 0, :3] == torch.tensor([59, 43, 50], dtype=torch.uint8)).all(1)).nonzero().flatten()
    assert len(hits) >= 1
    img = cifar_raw[0].reshape(3, 32, 32)
    assert any(np.array_equal(union[i].numpy(), img) for i in hits)
    assert img[1, 0, 0] != img[0, 0, 0] or img[2, 0, 0] != img[0, 0, 0]  # the planes are R, G, B, not interleaved


def test_cifar10_channel_means_equal_published_values(cifar):
    sums = sum(cifar[k].numpy().sum(axis=(0, 2, 3), dtype=np.int64) for k in ('train', 'valid'))  # exact
    means = sums / (50000 * 32 * 32)
    assert np.allclose(means, [125.306918046875, 122.950394140625, 113.86538318359375], rtol=0, atol=1e-6)


def test_cifar10_test_split_is_test_batch_in_order(cifar):
    assert cifar['test'][0, 0, 0, :3].tolist() == [158, 159, 165]

# -----------------------------------------------------------------------------
# MNIST from the shared copy

def test_mnist_splits_have_expected_shapes(mnist):
    assert mnist['train'].shape == (55000, 1, 28, 28)
    assert mnist['valid'].shape == (5000, 1, 28, 28)
    assert mnist['test'].shape == (10000, 1, 28, 28)
    assert mnist['binary'] is True and all(mnist[k].dtype == torch.uint8 for k in ('train', 'valid', 'test'))


def test_mnist_train_stays_greyscale_while_heldout_splits_are_binarised(mnist):
    grey = lambda x: ((x > 0) & (x < 255)).sum().item()
    assert grey(mnist['train']) > 1_000_000
    for k in ('valid', 'test'):
        x = mnist[k]
        assert grey(x) == 0 and (x == 0).any() and (x == 255).any()


def test_mnist_binarisation_is_fixed_across_loads(mnist):
    again = data.load_dataset('mnist', SHARED, download=False)
    assert torch.equal(again['test'], mnist['test']) and torch.equal(again['valid'], mnist['valid'])
    assert torch.equal(again['train'], mnist['train'])


def test_mnist_binarised_test_follows_pixel_intensities(mnist):
    # bernoulli(x / 255): pixels at 0 stay 0, pixels at 255 become 255, and the ink fraction is the mean intensity
    raw = torch.from_numpy(data.read_idx(MNIST_DIR / 't10k-images-idx3-ubyte.gz', 2051).copy())[:, None]
    assert (mnist['test'][raw == 0] == 0).all() and (mnist['test'][raw == 255] == 255).all()
    assert abs(mnist['test'].float().mean().item() / 255 - raw.float().mean().item() / 255) < 2e-3


def test_mnist_is_found_directly_in_data_root(tmp_path):
    need(MNIST_DIR)
    for f in data.MNIST_FILES:
        (tmp_path / f).symlink_to(MNIST_DIR / f)
    assert data.load_dataset('mnist', tmp_path, download=False)['test'].shape == (10000, 1, 28, 28)


def test_mnist_download_writes_complete_files(tmp_path, monkeypatch):
    need(MNIST_DIR)
    monkeypatch.setattr(data, 'MNIST_URL', MNIST_DIR.as_uri() + '/')
    info = data.load_dataset('mnist', tmp_path)
    assert info['train'].shape == (55000, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / 'mnist').iterdir()) == sorted(data.MNIST_FILES)  # no .part left


def corrupt_mnist(tmp_path, raw):
    folder = tmp_path / 'mnist'
    folder.mkdir()
    (folder / data.MNIST_FILES[1]).symlink_to(MNIST_DIR / data.MNIST_FILES[1])
    (folder / data.MNIST_FILES[0]).write_bytes(raw)
    return folder / data.MNIST_FILES[0]


def test_mnist_bad_magic_is_a_value_error_naming_the_file(tmp_path):
    need(MNIST_DIR)
    path = corrupt_mnist(tmp_path, gzip.compress((2049).to_bytes(4, 'big') + bytes(100)))
    with pytest.raises(ValueError, match='magic') as e:
        data.load_dataset('mnist', tmp_path, download=False)
    assert str(path) in str(e.value)


def test_mnist_short_body_is_a_value_error_naming_the_file(tmp_path):
    need(MNIST_DIR)
    header = b''.join(v.to_bytes(4, 'big') for v in (2051, 10, 28, 28))
    path = corrupt_mnist(tmp_path, gzip.compress(header + bytes(28 * 28 * 9)))
    with pytest.raises(ValueError, match='header promises') as e:
        data.load_dataset('mnist', tmp_path, download=False)
    assert str(path) in str(e.value)


def test_mnist_truncated_gzip_is_a_value_error_naming_the_file(tmp_path):
    need(MNIST_DIR)
    path = corrupt_mnist(tmp_path, (MNIST_DIR / data.MNIST_FILES[0]).read_bytes()[:100_000])
    with pytest.raises(ValueError, match='gzip') as e:
        data.load_dataset('mnist', tmp_path, download=False)
    assert str(path) in str(e.value)

# -----------------------------------------------------------------------------
# missing and corrupt CIFAR-10, tarball and download paths (small fakes)

def test_missing_data_without_download_names_the_path(tmp_path):
    for name in ('cifar10', 'mnist', 'imagenet32'):
        with pytest.raises(FileNotFoundError) as e:
            data.load_dataset(name, tmp_path / 'nowhere', download=False)
        assert str(tmp_path / 'nowhere') in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(FileNotFoundError, match='place cifar-10-batches-py.*without --no_download'):
        data.load_dataset('cifar10', tmp_path, download=False)


def test_unknown_dataset_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match='cifar10, mnist, imagenet32, imagenet64, folder'):
        data.load_dataset('svhn', tmp_path)


def test_cifar_tarball_with_wrong_md5_is_rejected(tmp_path):
    (tmp_path / 'cifar-10-python.tar.gz').write_bytes(b'not a tarball')
    with pytest.raises(ValueError, match='md5') as e:
        data.load_dataset('cifar10', tmp_path, download=False)
    assert data.CIFAR_MD5 in str(e.value) and 'delete' in str(e.value)


def test_cifar_tarball_with_right_md5_is_extracted_and_split(tmp_path, monkeypatch):
    tarball = fake_cifar_tarball(tmp_path)
    monkeypatch.setattr(data, 'CIFAR_MD5', data.md5(tarball))
    info = data.load_dataset('cifar10', tmp_path, download=False)
    assert (tmp_path / 'cifar-10-batches-py' / 'test_batch').exists()
    assert (len(info['train']), len(info['valid']), len(info['test'])) == (45, 5, 10)


def test_cifar_download_lands_in_place_then_md5_is_checked(tmp_path, monkeypatch):
    src = fake_cifar_tarball(tmp_path / 'server')
    monkeypatch.setattr(data, 'CIFAR_URL', src.as_uri())
    with pytest.raises(ValueError, match='md5'):
        data.load_dataset('cifar10', tmp_path / 'root')
    assert [p.name for p in (tmp_path / 'root').iterdir()] == ['cifar-10-python.tar.gz']  # renamed, no .part
    assert (tmp_path / 'root' / 'cifar-10-python.tar.gz').read_bytes() == src.read_bytes()


def test_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'CIFAR_URL', (tmp_path / 'absent.tar.gz').as_uri())
    with pytest.raises(FileNotFoundError, match='could not download') as e:
        data.load_dataset('cifar10', tmp_path)
    assert str(tmp_path) in str(e.value)


def test_corrupt_cifar_pickle_is_a_value_error_naming_the_file(tmp_path):
    fake_cifar(tmp_path / 'cifar-10-batches-py')
    bad = tmp_path / 'cifar-10-batches-py' / 'data_batch_3'
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(ValueError) as e:
        data.load_dataset('cifar10', tmp_path)
    assert str(bad) in str(e.value)


def test_cifar_pickle_of_wrong_size_is_a_value_error_naming_the_file(tmp_path):
    fake_cifar(tmp_path / 'cifar-10-batches-py')
    bad = tmp_path / 'cifar-10-batches-py' / 'test_batch'
    with open(bad, 'wb') as f:
        pickle.dump({'data': np.zeros((4, 3000), np.uint8)}, f)
    with pytest.raises(ValueError, match='3072') as e:
        data.load_dataset('cifar10', tmp_path)
    assert str(bad) in str(e.value)


def test_cifar_pickle_with_str_keys_loads_like_bytes_keys(tmp_path):
    fake_cifar(tmp_path / 'a' / 'cifar-10-batches-py')
    for name in (tmp_path / 'a' / 'cifar-10-batches-py').iterdir():
        d = pickle.loads(name.read_bytes())
        name.write_bytes(pickle.dumps({k.decode(): v for k, v in d.items()}))
    fake_cifar(tmp_path / 'b' / 'cifar-10-batches-py')
    a, b = data.load_dataset('cifar10', tmp_path / 'a'), data.load_dataset('cifar10', tmp_path / 'b')
    assert torch.equal(a['train'], b['train']) and torch.equal(a['test'], b['test'])

# -----------------------------------------------------------------------------
# downsampled ImageNet (tiny fakes)

def test_imagenet_npz_planar_and_npy_hwc_files_give_the_same_images(tmp_path):
    rng = np.random.RandomState(0)
    hwc = {s: rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8) for s, n in (('train', 40), ('valid', 6))}
    for root, kind in ((tmp_path / 'npz', 'npz'), (tmp_path / 'npy', 'npy')):
        for split, x in hwc.items():
            (root / 'imagenet32' / split).mkdir(parents=True)
            for j, part in enumerate(np.array_split(x, 2)):  # two files per split, concatenated in name order
                if kind == 'npz':
                    np.savez(root / 'imagenet32' / split / f'batch_{j}.npz', data=part.transpose(0, 3, 1, 2).reshape(len(part), -1))
                else:
                    np.save(root / 'imagenet32' / split / f'batch_{j}.npy', part)
    a, b = data.load_dataset('imagenet32', tmp_path / 'npz'), data.load_dataset('imagenet32', tmp_path / 'npy')
    for k in ('train', 'valid', 'test'):
        assert torch.equal(a[k][:], b[k][:])
    assert a['train'].shape == (36, 3, 32, 32) and a['valid'].shape == (4, 3, 32, 32)
    assert torch.equal(a['test'][:], torch.from_numpy(hwc['valid']).permute(0, 3, 1, 2))
    assert (a['shift'], a['scale']) == (-116.2373, 1 / 69.37404)   # the official constants, not these images' moments


def test_a_single_imagenet_npy_is_memory_mapped_and_train_and_valid_are_views_of_it(tmp_path):
    x = np.random.RandomState(1).randint(0, 256, (50, 32, 32, 3)).astype(np.uint8)
    for split in ('train', 'valid'):
        (tmp_path / 'imagenet32' / split).mkdir(parents=True)
        np.save(tmp_path / 'imagenet32' / split / 'all.npy', x)
    info = data.load_dataset('imagenet32', tmp_path)
    train, valid = info['train'], info['valid']
    assert isinstance(train.array.base, np.memmap) and train.array is valid.array     # no copy of the file
    rows = np.concatenate([train.indices, valid.indices])
    assert sorted(rows) == list(range(50))                                            # the holdout split
    idx = torch.tensor([7, 3, 3, 0])                                                  # any order, repeats
    assert torch.equal(train[idx], torch.from_numpy(x[train.indices[[7, 3, 3, 0]]]).permute(0, 3, 1, 2))


def test_batches_from_host_memory_are_the_resident_batches_in_the_same_order():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    resident = data.make_batches(images, 4, seed=3, rank=1, world_size=2, memory=10**12)
    host = data.make_batches(data.ImageArray(images.numpy(), np.arange(64)), 4, seed=3, rank=1, world_size=2, memory=10**3)
    assert resident.resident and not host.resident
    for _ in range(20):                                                               # across an epoch boundary
        assert torch.equal(resident.next(), host.next())
    assert resident.state_dict() == host.state_dict()


def test_cifar10_lives_on_a_24gb_gpu_and_imagenet64_stays_in_host_memory_one_batch_at_a_time():
    GB24 = 24 * 10**9
    cifar = torch.empty(45000, 3, 32, 32, dtype=torch.uint8)                          # 138 MB
    assert data.keeps_on_device(cifar, torch.device('cuda'), GB24)
    fake = np.broadcast_to(np.zeros((1, 3, 64, 64), np.uint8), (1_281_167, 3, 64, 64))   # ImageNet-64, no memory
    train = data.ImageArray(fake, np.arange(1_276_167))                              # 15.7 GB
    assert not data.keeps_on_device(train, torch.device('cuda'), GB24)
    assert not data.keeps_on_device(train, torch.device('cuda'), 80 * 10**9)
    batches = data.make_batches(train, 4, memory=GB24)
    assert not batches.resident and batches.next().shape == (4, 3, 64, 64)


def test_imagenet_file_of_wrong_shape_is_a_value_error_naming_it(tmp_path):
    for split in ('train', 'valid'):
        (tmp_path / 'imagenet64' / split).mkdir(parents=True)
        np.save(tmp_path / 'imagenet64' / split / 'x.npy', np.zeros((3, 32, 32, 3), np.uint8))  # 32, not 64
    with pytest.raises(ValueError, match='64, 64, 3') as e:
        data.load_dataset('imagenet64', tmp_path)
    assert 'x.npy' in str(e.value)


def test_missing_imagenet_says_which_files_go_where(tmp_path):
    with pytest.raises(FileNotFoundError, match='imagenet32/train') as e:
        data.load_dataset('imagenet32', tmp_path)
    assert 'login' in str(e.value)

# -----------------------------------------------------------------------------
# prepare()

CIFAR_INFO = dict(shift=-120.63838, scale=1 / 64.16736, binary=False)
MNIST_INFO = dict(shift=0.0, scale=1.0, binary=True)
ALL_LEVELS = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()


def test_prepare_8bit_maps_the_ends_to_plus_minus_one_and_normalises_the_input():
    x_in, target = data.prepare(ALL_LEVELS, CIFAR_INFO)
    assert x_in.dtype == target.dtype == torch.float32 and x_in.shape == target.shape == (2, 3, 16, 16)
    assert target.min().item() == -1.0 and target.max().item() == 1.0
    assert len(target.unique()) == 256
    assert torch.allclose(x_in.double(), (ALL_LEVELS.double() - 120.63838) / 64.16736, atol=1e-6)


def test_prepare_matches_the_official_code_on_its_reference_images(cifar_raw):
    path = SHARED / 'reference' / 'vdvae_reference_small.pt'
    need(path)
    ref = torch.load(path, weights_only=True)
    images = ref['images_uint8_nhwc'].permute(0, 3, 1, 2)  # the first four images of data_batch_1
    assert np.array_equal(images.numpy().reshape(4, -1), cifar_raw[:4])
    x_in, target = data.prepare(images, CIFAR_INFO)
    assert torch.allclose(x_in, ref['x_in_nhwc'].permute(0, 3, 1, 2), rtol=0, atol=1e-6)
    assert torch.equal(target, ref['target_nhwc'].permute(0, 3, 1, 2))


def test_prepare_5bit_target_has_exactly_32_levels_2k_over_31_minus_1():
    x_in, target = data.prepare(ALL_LEVELS, CIFAR_INFO, bits=5)
    levels = target.unique().double()
    assert len(levels) == 32
    assert torch.allclose(levels, torch.arange(32, dtype=torch.float64) * 2 / 31 - 1, atol=1e-7)
    assert target.min().item() == -1.0 and target.max().item() == 1.0
    k = (ALL_LEVELS // 8).double()
    assert torch.allclose(x_in.double(), (k * 255 / 31 - 120.63838) / 64.16736, atol=1e-6)  # input from the quantised image


def test_prepare_rejects_other_bit_depths():
    with pytest.raises(ValueError, match='bits'):
        data.prepare(ALL_LEVELS, CIFAR_INFO, bits=4)


def test_prepare_binary_draws_fresh_zero_one_samples():
    x = torch.full((64, 1, 28, 28), 128, dtype=torch.uint8)
    a, ta = data.prepare(x, MNIST_INFO)
    b, _ = data.prepare(x, MNIST_INFO)
    assert set(a.unique().tolist()) == {0.0, 1.0} and torch.equal(a, ta)
    assert not torch.equal(a, b)  # dynamic: a new draw each call
    assert abs(a.mean().item() - 128 / 255) < 0.01


def test_prepare_leaves_a_binarised_batch_unchanged():
    x = (torch.rand(8, 1, 28, 28) < 0.3).to(torch.uint8) * 255
    x_in, target = data.prepare(x, MNIST_INFO)
    assert torch.equal(x_in, x.float() / 255) and torch.equal(target, x.float() / 255)


def test_prepare_pad_2_makes_28_into_32_with_zero_border():
    x = torch.full((4, 1, 28, 28), 255, dtype=torch.uint8)
    for info in (MNIST_INFO, CIFAR_INFO):
        x_in, target = data.prepare(x, info, pad=2)
        assert x_in.shape == target.shape == (4, 1, 32, 32)
        for t in (x_in, target):
            inner = torch.zeros_like(t, dtype=torch.bool)
            inner[..., 2:30, 2:30] = True
            assert (t[~inner] == 0).all() and (t[inner] != 0).all()

# -----------------------------------------------------------------------------
# Batches

def ids(n):
    # images whose single pixel is their own index (mod 256 is enough for n <= 256)
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)


def test_one_epoch_visits_each_image_at_most_once_and_drops_the_remainder():
    b = data.Batches(ids(103), 10)
    assert b.steps_per_epoch == 10
    seen = torch.cat([b.next().flatten() for _ in range(10)]).tolist()
    assert len(seen) == len(set(seen)) == 100
    assert b.state_dict() == {'epoch': 1, 'index': 0, 'global_batch': 10} and b.epoch == 1


def test_batches_follow_the_documented_permutation():
    b = data.Batches(ids(50), 5, seed=7, rank=1, world_size=2)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(7 + 1_000_003 * 0))
    assert b.next().flatten().tolist() == perm[1::2][:5].tolist()


def test_two_ranks_are_disjoint_and_cover_the_epoch_minus_remainders():
    shards = []
    for rank in range(2):
        b = data.Batches(ids(101), 8, seed=3, rank=rank, world_size=2)
        assert b.steps_per_epoch == 6  # the same on every rank, though rank 0 holds 51 images and rank 1 holds 50
        shards.append(set(torch.cat([b.next().flatten() for _ in range(6)]).tolist()))
    assert not shards[0] & shards[1]
    assert len(shards[0]) == len(shards[1]) == 48


def test_epochs_are_shuffled_differently():
    b = data.Batches(ids(64), 64)
    first, second = b.next().flatten().tolist(), b.next().flatten().tolist()
    assert sorted(first) == sorted(second) and first != second


def test_resume_draws_exactly_the_batches_of_an_unbroken_run():
    images = torch.randint(0, 256, (37, 3, 4, 4), dtype=torch.uint8)
    run = data.Batches(images, 4, seed=5)
    for _ in range(13):  # k = 13 crosses an epoch boundary (9 steps per epoch)
        run.next()
    state = run.state_dict()
    assert all(type(v) is int for v in state.values())
    rest = [run.next() for _ in range(20)]
    resumed = data.Batches(images, 4, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next()) for a in rest)


def test_load_state_dict_rejects_a_position_past_the_epoch():
    b = data.Batches(ids(20), 4)
    with pytest.raises(ValueError):
        b.load_state_dict({'epoch': 0, 'index': 5})


def test_too_few_images_for_a_batch_is_an_error():
    with pytest.raises(ValueError, match='too few'):
        data.Batches(ids(7), 4, world_size=2)


def test_make_batches_and_eval_batches_on_tensors():
    x = ids(23)
    b = data.make_batches(x, 5, device='cpu')
    assert isinstance(b, data.Batches) and b.next().shape == (5, 1, 1, 1)
    out = list(data.eval_batches(x, 5))
    assert [len(o) for o in out] == [5, 5, 5, 5, 3] and torch.equal(torch.cat(out), x)

# -----------------------------------------------------------------------------
# folders of images

def write_images(folder, size=20):
    # one image per mode, each coloured by its own index so that they can be told apart
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.new('RGB', (size, size), (200, 10, 10))
    rgb.save(folder / 'a_rgb.png')
    Image.new('L', (size, size), 77).save(folder / 'b_grey.png')
    Image.new('RGB', (size, size), (10, 200, 10)).convert('P', palette=Image.ADAPTIVE).save(folder / 'c_palette.png')
    Image.new('RGBA', (size, size), (10, 10, 200, 255)).save(folder / 'd_rgba.png')
    wide = Image.new('RGB', (2 * size, size), (0, 0, 0))
    wide.paste((250, 250, 250), (size // 2, 0, size // 2 + size, size))  # a white centre square between black sides
    wide.save(folder / 'e_wide.jpg', quality=95)
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3)).astype(np.uint8)).save(buf, 'PNG')
    (folder / 'f_truncated.png').write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (folder / 'g_garbage.png').write_bytes(b'this is not an image')
    (folder / 'notes.txt').write_text('ignored')


def test_image_folder_gives_rgb_square_uint8_for_every_mode(tmp_path):
    write_images(tmp_path)
    files = data.list_images(tmp_path)
    assert [f.name for f in files][:5] == ['a_rgb.png', 'b_grey.png', 'c_palette.png', 'd_rgba.png', 'e_wide.jpg']
    ds = data.ImageFolder(files, 8)
    imgs = [ds[i] for i in range(5)]
    assert all(x.shape == (3, 8, 8) and x.dtype == torch.uint8 for x in imgs)
    assert imgs[0][:, 4, 4].tolist() == [200, 10, 10] and imgs[1][:, 4, 4].tolist() == [77, 77, 77]
    assert imgs[3][:, 4, 4].tolist() == [10, 10, 200]
    assert (imgs[4].int() > 240).all()  # the centre crop kept the white square, not the black sides
    assert ds[5] is None and ds[6] is None  # truncated and garbage files


def test_image_folder_upscales_small_images(tmp_path):
    write_images(tmp_path, size=6)
    assert data.ImageFolder(data.list_images(tmp_path), 16)[0].shape == (3, 16, 16)


def test_folder_dataset_splits_90_5_5_and_needs_image_size(tmp_path):
    for i in range(40):
        Image.new('RGB', (10, 12), (i, i, i)).save(tmp_path / f'{i:02d}.png')
    with pytest.raises(ValueError, match='image_size'):
        data.load_dataset('folder', tmp_path)
    info = data.load_dataset('folder', tmp_path, image_size=8)
    sizes = [len(info[k]) for k in ('train', 'valid', 'test')]
    assert sizes == [36, 2, 2]
    names = [set(info[k].files) for k in ('train', 'valid', 'test')]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    pixels = torch.stack([info['train'][i] for i in range(36)]).double()
    assert abs(info['shift'] + pixels.mean().item()) < 1e-9 and abs(1 / info['scale'] - pixels.std(unbiased=False).item()) < 1e-9


def test_folder_with_train_and_test_subfolders_uses_them(tmp_path):
    for split, n in (('train', 30), ('test', 3)):
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.new('RGB', (8, 8), (i, 0, 0)).save(tmp_path / split / f'{i}.png')
    info = data.load_dataset('folder', tmp_path, image_size=8)
    assert [len(info[k]) for k in ('train', 'valid', 'test')] == [29, 1, 3]
    assert all('/test/' in f for f in info['test'].files) and all('/train/' in f for f in info['valid'].files)


def test_unreadable_images_are_replaced_so_the_batch_keeps_its_size(tmp_path):
    write_images(tmp_path)
    ds = data.ImageFolder(data.list_images(tmp_path), 8)  # 5 good, 2 bad
    readable = torch.stack([ds[i] for i in range(5)])
    for workers in (0, 2):   # counted in the main process also when workers decode
        b = data.make_batches(ds, 7, num_workers=workers)
        assert isinstance(b, data.FolderBatches)
        x = b.next()
        assert x.shape == (7, 3, 8, 8) and x.dtype == torch.uint8 and b.skipped == 2
        assert all((readable == image).all((1, 2, 3)).any() for image in x)   # every image a readable one
        b.next()
        assert b.skipped == 4 and b.epoch == 2


def test_unreadable_images_keep_every_rank_s_batches_full_and_positions_together(tmp_path):
    """Batch 1 per rank (as for FFHQ): a rank whose image is unreadable gets another image of its own
    shard in that place; both ranks end the epoch at the same position."""
    write_images(tmp_path)
    ds = data.ImageFolder(data.list_images(tmp_path), 8)  # 5 good, 2 bad: 3 steps per epoch on 2 ranks
    bad = {5, 6}
    for rank in (0, 1):
        b = data.FolderBatches(ds, 1, rank=rank, world_size=2, num_workers=0)
        shard = b.shard(0).tolist()
        batches = [b.next() for _ in range(b.steps_per_epoch)]
        assert all(x.shape == (1, 3, 8, 8) for x in batches)
        assert b.state_dict() == {'epoch': 1, 'index': 0, 'global_batch': 2}
        assert b.skipped == len(bad & set(shard))
        for i, x in zip(shard, batches):
            if i in bad:   # the next readable image of the shard took its place
                assert any(torch.equal(x[0], ds[j]) for j in shard if j not in bad)
            else:
                assert torch.equal(x[0], ds[i])
    assert any(bad & set(data.FolderBatches(ds, 1, rank=r, world_size=2).shard(0).tolist()) for r in (0, 1))


def test_folder_batches_resume_where_they_stopped(tmp_path):
    for i in range(30):
        Image.new('RGB', (6, 6), (i * 8, 0, 0)).save(tmp_path / f'{i:02d}.png')
    ds = data.ImageFolder(data.list_images(tmp_path), 4)
    run = data.FolderBatches(ds, 4, seed=2, num_workers=0)
    for _ in range(9):  # 7 steps per epoch: crosses into epoch 1
        run.next()
    state = run.state_dict()
    rest = [run.next() for _ in range(10)]
    resumed = data.FolderBatches(ds, 4, seed=2, num_workers=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next()) for a in rest)
    tensors = data.Batches(torch.stack([ds[i] for i in range(30)]), 4, seed=2)  # the same order as tensor batches
    tensors.load_state_dict(state)
    assert all(torch.equal(a, tensors.next()) for a in rest)


def test_eval_batches_over_a_folder_yield_the_readable_images_in_order(tmp_path):
    write_images(tmp_path)
    ds = data.ImageFolder(data.list_images(tmp_path), 8)
    out = list(data.eval_batches(ds, 3, num_workers=0))
    assert [len(o) for o in out] == [3, 2]  # the last batch held one unreadable file only, so it is dropped
    assert torch.equal(torch.cat(out), torch.stack([ds[i] for i in range(5)]))


def test_folders_reads_only_the_named_sub_folders_and_ffhq_presets_leave_out_the_thumbnails(tmp_path):
    for sub in ('images1024x1024/00000', 'thumbnails128x128/00000'):   # FFHQ's download, the same faces twice
        (tmp_path / sub).mkdir(parents=True)
        for i in range(30):
            Image.new('RGB', (8, 8), (i, 0, 0)).save(tmp_path / sub / f'{i:05d}.png')
    info = data.load_dataset('folder', tmp_path, 8, folders='images1024x1024')
    files = info['train'].files + info['valid'].files + info['test'].files
    assert len(files) == 30 and all('/images1024x1024/' in f for f in files)
    assert sum(len(data.load_dataset('folder', tmp_path, 8)[k]) for k in ('train', 'valid', 'test')) == 60
    with pytest.raises(FileNotFoundError, match='no sub-folder images/ in'):
        data.load_dataset('folder', tmp_path, 8, folders='images')
    import train
    assert train.PRESETS['ffhq256']['folders'] == train.PRESETS['ffhq1024']['folders'] == 'images1024x1024'
