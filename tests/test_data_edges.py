"""Edges of the data and the command line: evaluation windows drawn without replacement over
every valid start, an impossible n_eval refused in one line (text and classification), the
last training window reachable, a byte-order mark kept out of the vocabulary, and config
flags in both spellings with a suggestion for a mistyped one."""
from dataclasses import replace

import pytest
import torch

import config
import prepare_data
from config import get_config
from conftest import TINY_TEXT
from fileio import DataError
from prepare_data import make_task


def short_config(tmp_path, text, **kw):
    path = tmp_path / 'short.txt'
    path.write_text(text, encoding='utf-8')
    prepare_data.load_corpus.cache_clear()
    return get_config('cpu', dataset=str(path), **{'block_size': 8, 'n_eval': 4, **kw})


# ----------------------------------------------------------------------------- evaluation windows

def test_eval_windows_are_every_valid_start_once_when_all_are_asked_for(tmp_path):
    # 300 characters: validation = the last 30, so 30 - 8 = 22 windows of 8 + 1 characters
    cfg = short_config(tmp_path, 'abcdefghij' * 30)
    n_val = len(make_task(cfg).corpus.val)
    n_windows = n_val - cfg.block_size
    task = make_task(replace(cfg, n_eval=n_windows))
    assert sorted(task.eval_indices.tolist()) == list(range(n_windows)), "each start once, the last one included"
    last = task.corpus.val[-cfg.block_size - 1:]
    row = list(task.eval_indices).index(n_windows - 1)
    assert torch.equal(task.eval_x[row], last[:-1]) and torch.equal(task.eval_y[row], last[1:])


def test_eval_windows_are_distinct_and_fixed_by_eval_seed(tiny_config):
    task = make_task(replace(tiny_config, n_eval=400))  # 878 windows in the tiny corpus' validation split
    starts = task.eval_indices.tolist()
    assert len(set(starts)) == 400, "no window twice"
    assert make_task(replace(tiny_config, n_eval=400)).eval_indices.tolist() == starts
    assert make_task(replace(tiny_config, n_eval=400, eval_seed=7)).eval_indices.tolist() != starts


def test_more_eval_windows_than_exist_is_a_one_line_error(tmp_path):
    cfg = short_config(tmp_path, 'abcdefghij' * 30, n_eval=23)  # 22 windows
    with pytest.raises(DataError) as e:
        make_task(cfg)
    msg = str(e.value)
    assert '\n' not in msg and 'n_eval 23' in msg and 'the 22 distinct evaluation windows' in msg
    assert 'lower --n_eval to at most 22' in msg and 'short.txt' in msg
    make_task(replace(cfg, n_eval=22))  # exactly all of them is fine


def test_eval_starts_draws_a_few_of_many_without_a_full_permutation():
    starts = prepare_data.eval_starts(10 ** 9, 256, 1000, seed=1)
    assert starts.dtype.name == 'int64' and len(set(starts.tolist())) == 1000
    assert 0 <= starts.min() and starts.max() <= 10 ** 9 - 256 - 1


def test_the_last_training_window_can_be_drawn(tmp_path):
    # 40 distinct characters (a window's first input gives its start): the training split,
    # the first 36, holds 36 - 2 = 34 windows of 2 + 1 characters
    cfg = short_config(tmp_path, ''.join(chr(0x100 + i) for i in range(40)), block_size=2, n_eval=1)
    task = make_task(cfg)
    train, T = task.corpus.train, cfg.block_size
    stream = task.train_batches(64, torch.Generator().manual_seed(0))
    firsts = {int(x[0]) for _ in range(8) for x in next(stream)[0]}
    starts = {int((train == c).nonzero()[0]) for c in firsts}
    assert starts == set(range(len(train) - T)), "every start, the last one included"


# ----------------------------------------------------------------------------- byte-order mark

def test_a_byte_order_mark_is_not_a_character_of_the_corpus(tmp_path):
    plain, marked = tmp_path / 'plain.txt', tmp_path / 'marked.txt'
    plain.write_text(TINY_TEXT, encoding='utf-8')
    marked.write_text(TINY_TEXT, encoding='utf-8-sig')  # writes U+FEFF first
    assert marked.read_bytes()[:3] == b'\xef\xbb\xbf'
    a, b = prepare_data.CharCorpus(str(plain)), prepare_data.CharCorpus(str(marked))
    assert '\ufeff' not in b.chars and b.chars == a.chars
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.sha256 != b.sha256, "the file's identity is its bytes"


# ----------------------------------------------------------------------------- classification

@pytest.mark.parametrize('n_eval', [5000, 500])
def test_classification_refuses_an_n_eval_other_than_its_split(mnist1d_dir, n_eval):
    cfg = get_config('mnist_ffn', n_eval=n_eval)
    with pytest.raises(DataError) as e:
        make_task(cfg, mnist1d_dir)
    msg = str(e.value)
    assert '\n' not in msg and f'n_eval {n_eval}' in msg and 'validation split, 1000 examples' in msg
    assert make_task(get_config('mnist_ffn'), mnist1d_dir).config_updates()['n_eval'] == 1000  # the default


# ----------------------------------------------------------------------------- flags

def parser():
    p = config.Parser(prog='prog')
    config.add_config_args(p)
    p.add_argument('--results-dir')
    return p


def test_every_config_flag_takes_both_spellings():
    p = parser()
    for f in config.fields(config.Config):
        if '_' in f.name:
            value = '1' if f.type in (int, float) else 'true' if f.type is bool else 'x'
            under = vars(p.parse_args([f'--{f.name}', value]))[f.name]
            dashed = vars(p.parse_args([f"--{f.name.replace('_', '-')}", value]))[f.name]
            assert under == dashed is not None, f.name
    args = p.parse_args(['--max-iters', '7', '--n_embd', '32', '--eval-seed=3'])
    assert config.config_from_args(args).max_iters == 7 and (args.n_embd, args.eval_seed) == (32, 3)
    help_text = p.format_help()
    assert '--max_iters' in help_text and '--max-iters INT' not in help_text, "--help lists each field once"


@pytest.mark.parametrize('argv,hint', [
    (['--max_iter', '3'], 'unrecognized arguments: --max_iter 3; did you mean --max_iters?'),
    (['--max-iter', '3'], 'unrecognized arguments: --max-iter 3; did you mean --max-iters?'),
    (['--results_dir', 'r'], 'did you mean --results-dir?'),
    (['--n_emb', '8', '--maxiters', '3'], 'did you mean --n_embd for --n_emb, --max_iters for --maxiters?'),
    (['--n_emb', '8', '--qqqqqq'], 'did you mean --n_embd for --n_emb? (--help lists every flag)'),
])
def test_a_mistyped_flag_gets_the_closest_one_in_one_line(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and hint in err, err
    assert 'valid flags' not in err


def test_a_flag_like_none_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(['--zzzz', '1'])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and '(valid flags: ' in err and ' --max_iters ' in err
    assert '--max-iters' not in err, "each field once, as --help spells it"
