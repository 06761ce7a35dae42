"""fileio: the one JSON rule and the one verified download (both corpora use it)."""
import hashlib
import io
import json
import math

import pytest

import fileio
from fileio import DataError


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    path = tmp_path / 'a.json'
    fileio.write_json(str(path), {'x': [1.5, math.nan, math.inf, -math.inf], 'y': (2, {'z': math.nan})})
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f'non-strict JSON constant {c}')) == \
        {'x': [1.5, None, None, None], 'y': [2, {'z': None}]}
    assert text.endswith('\n') and not list(tmp_path.glob('.*.tmp'))


def fake_urlopen(payload, seen):
    def urlopen(url, timeout=None):
        seen.append(url)
        return io.BytesIO(payload)
    return urlopen


def test_fetch_verified_downloads_once_then_checks_every_time(tmp_path, monkeypatch):
    data, seen = b'hello corpus\n', []
    monkeypatch.setattr(fileio.urllib.request, 'urlopen', fake_urlopen(data, seen))
    digest = hashlib.md5(data).hexdigest()
    path = fileio.fetch_verified(str(tmp_path), 'sub/f.txt', 'http://example.invalid/f.txt', digest, 'md5')
    assert path == str(tmp_path / 'sub' / 'f.txt') and open(path, 'rb').read() == data
    assert fileio.fetch_verified(str(tmp_path), 'sub/f.txt', 'http://x', digest, 'md5') == path
    assert seen == ['http://example.invalid/f.txt']  # present: not downloaded again
    (tmp_path / 'sub' / 'f.txt').write_bytes(b'changed')
    with pytest.raises(DataError, match=r"md5 \w+ does not match the file's " + digest):
        fileio.fetch_verified(str(tmp_path), 'sub/f.txt', 'http://x', digest, 'md5', name='the file')


def test_a_wrong_download_never_lands(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.urllib.request, 'urlopen', fake_urlopen(b'an error page', []))
    with pytest.raises(DataError, match='sha256 .* does not match'):
        fileio.fetch_verified(str(tmp_path), 'c.txt', 'http://x', '0' * 64)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file
    with pytest.raises(DataError, match='c.txt not found at'):
        fileio.fetch_verified(str(tmp_path), 'c.txt', 'http://x', '0' * 64, fetch=False)
