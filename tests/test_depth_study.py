"""depth_study.py: a rerun reuses a run's eval.json only for the same checkpoint and settings,
refuses a run folder trained with other settings or past --steps, and refuses bad flags in one line
before any work; table.md is written atomically."""
import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import depth_study  # noqa: E402
from conftest import real_data  # noqa: E402


def flags(out_dir, *more, steps=2):
    return ['--data_root', real_data(), '--depths', '2', '--models', 'local', '--steps', str(steps),
            '--batch_size', '4', '--out_dir', str(out_dir), *more]


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    """One tiny study: the local model at depth 2, 2 steps of batch 4, evaluated (about 10 s)."""
    out = tmp_path_factory.mktemp('study')
    depth_study.main(flags(out))
    return out


@pytest.fixture
def copy(study, tmp_path):
    out = tmp_path / 'study'
    shutil.copytree(study, out)
    return out


def no_work(monkeypatch):
    monkeypatch.setattr(depth_study, 'run', lambda cmd, log: pytest.fail(f'ran {cmd[0]}'))


def test_a_rerun_with_the_same_settings_does_no_work(copy, monkeypatch, capsys):
    no_work(monkeypatch)
    depth_study.main(flags(copy))
    assert '| local | 2 |' in capsys.readouterr().out


def test_more_steps_train_on_and_evaluate_the_new_checkpoint(copy, capsys):
    depth_study.main(flags(copy, steps=4))     # was: trained to step 4, reported step 2's eval.json
    record = json.loads((copy / 'local-d2' / 'eval.json').read_text())
    assert record['step'] == 4 and record['study']['checkpoint'] == 'ckpt-00000004.pt'
    assert [l for l in (copy / 'table.md').read_text().splitlines() if l.startswith('| local')][0].split(' | ')[3] == '4'


@pytest.mark.parametrize('more, words', [
    (['--seed', '1'], 'seed 0 (asked: 1)'),
    (['--batch_size', '8'], 'batch_size 4 (asked: 8)'),
    (['--steps', '1'], 'trained to step 2, past --steps 1'),      # was: printed step 2's row
])
def test_a_run_folder_with_other_settings_is_refused_before_any_work(copy, monkeypatch, more, words):
    no_work(monkeypatch)
    with pytest.raises(ValueError, match=f"{copy / 'local-d2'} holds a run .*{re.escape(words)}"):
        depth_study.main(flags(copy) + more)


def test_another_data_root_is_refused(copy, monkeypatch, tmp_path):
    no_work(monkeypatch)
    other = tmp_path / 'data'
    os.symlink(real_data(), other)
    with pytest.raises(ValueError, match=f'data_root .*asked: {str(other)!r}'):
        depth_study.main(flags(copy)[2:] + ['--data_root', str(other)])


def test_an_eval_json_is_reused_only_for_its_checkpoint_and_settings(copy):
    args = argparse.Namespace(seed=0, batch_size=4, data_root=real_data(), iw=0)
    ckpt = copy / 'local-d2' / 'ckpt-00000002.pt'
    record = json.loads((copy / 'local-d2' / 'eval.json').read_text())
    settings = depth_study.eval_settings(ckpt, args)
    assert depth_study.reusable(record, settings)
    assert not depth_study.reusable({k: v for k, v in record.items() if k != 'study'}, settings)   # an old eval.json
    assert not depth_study.reusable(record, dict(settings, iw=2))                  # was: KeyError 'iw_nll'
    assert depth_study.reusable(dict(record, study=dict(settings, iw=2)), settings)   # an IW eval serves the ELBO
    assert not depth_study.reusable(record, dict(settings, data_root='/elsewhere'))
    os.utime(ckpt, ns=(0, 0))                                                      # a rewritten checkpoint
    assert not depth_study.reusable(record, depth_study.eval_settings(ckpt, args))


def test_iw_after_a_run_without_it_evaluates_again(copy, monkeypatch, capsys):
    calls = []

    def fake_evaluate(cmd, log):   # evaluate.py's --json with the IW numbers, without the minutes
        assert cmd[0] == 'evaluate.py' and cmd[cmd.index('--iw') + 1] == '2'
        calls.append(cmd)
        old = json.loads((copy / 'local-d2' / 'eval.json').read_text())
        Path(cmd[cmd.index('--json') + 1]).write_text(json.dumps(dict(old, iw=2, iw_nll=7.0, iw_nll_se=0.1)))

    monkeypatch.setattr(depth_study, 'run', fake_evaluate)
    depth_study.main(flags(copy, '--iw', '2'))
    depth_study.main(flags(copy, '--iw', '2'))     # now reused
    assert len(calls) == 1 and '7.000 +- 0.100' in capsys.readouterr().out


@pytest.mark.parametrize('more, words', [(['--depths', '1'], 'every depth >= 2'), (['--steps', '0'], '--steps')])
def test_bad_flags_are_refused_before_any_work(tmp_path, monkeypatch, more, words):
    no_work(monkeypatch)
    with pytest.raises(ValueError, match=words):
        depth_study.main(flags(tmp_path / 'out') + more)
    assert not (tmp_path / 'out').exists()


def test_a_file_as_out_dir_is_one_error(tmp_path, monkeypatch):
    no_work(monkeypatch)
    (tmp_path / 'f').write_text('')
    with pytest.raises(ValueError, match=f"--out_dir {tmp_path / 'f'} is a file, not a folder"):   # was: NotADirectoryError
        depth_study.main(flags(tmp_path / 'f'))


def test_a_failed_table_write_leaves_the_old_table_whole(copy, monkeypatch):
    no_work(monkeypatch)
    (copy / 'table.md').write_text('old')
    write_text = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):   # a full disk half way through the file
        write_text(self, text[:10])
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(Path, 'write_text', half_then_fail)
    with pytest.raises(OSError, match='No space left'):
        depth_study.main(flags(copy))
    assert (copy / 'table.md').read_text() == 'old' and not list(copy.glob('*.tmp*'))
