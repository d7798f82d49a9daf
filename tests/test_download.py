"""Checkpoints by URL: downloaded once into the cache, atomically, then read
by the safe reader; served here from 127.0.0.1."""
import hashlib
import http.server
import os
import re
import socket
import threading
import time
from collections import Counter

import pytest
import torch
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

from mmvit3.checkpoint import load_file
from mmvit3.cli import check_checkpoint
from mmvit3.fileio import DownloadError, cache_name, download
from mmvit3.testing import write_published_checkpoint

RELEASES = [
    f'https://cloud.tsinghua.edu.cn/f/{key}/?dl=1'
    for key in ('f0c7c73ceabe49b7b161', '3eeab8621a7f43929a87',
                '1d0d7fb840254275b29d')
]


class Files(http.server.BaseHTTPRequestHandler):
    """GET /files/NAME: the file; /drop/NAME: half of it, then the
    connection closes; /slow/NAME: the file in pieces; /f/KEY/?dl=1: a
    redirect to /files/KEY.pth (as the authors' links do); /html: a sign-in
    page; anything else: 404."""
    files = {}
    hits = Counter()

    def do_GET(self):
        self.hits[self.path] += 1
        kind, _, name = self.path.lstrip('/').partition('/')
        if kind == 'f':
            self.send_response(302)
            self.send_header('Location', f'/files/{name.split("/")[0]}.pth')
            self.end_headers()
        elif kind == 'html':
            self.reply(b'<!DOCTYPE html><html>Sign in</html>')
        elif name in self.files and kind in ('files', 'drop', 'slow'):
            self.reply(self.files[name], kind)
        else:
            self.send_error(404)

    def reply(self, data: bytes, kind: str = 'files'):
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if kind == 'drop':
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        for start in range(0, len(data), 1 << 16):
            self.wfile.write(data[start:start + (1 << 16)])
            if kind == 'slow':
                time.sleep(0.01)

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """(base URL, files served, hits per path)."""
    path = str(tmp_path_factory.mktemp('served') / 'hvit3_tiny.pth')
    write_published_checkpoint(path, 'tiny', with_ema=False,
                               with_training_state=False)
    with open(path, 'rb') as f:
        published = f.read()
    small = torch.nn.Linear(3, 2).state_dict()
    small_path = path + '.small'
    torch.save({'state_dict': small}, small_path)
    with open(small_path, 'rb') as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    Files.files.update({
        'hvit3_tiny.pth': published,
        f'small-{digest[:8]}.pth': data,
        'small-deadbeef.pth': data,  # its name promises another hash
        'small.pth': data,
        'abc123.pth': data,
    })
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield (f'http://127.0.0.1:{httpd.server_address[1]}', small, digest)
    httpd.shutdown()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    directory = tmp_path / 'cache'
    monkeypatch.setenv('MMVIT3_CACHE', str(directory))
    return directory


def cached(cache) -> list:
    """The files in the cache, lock files aside."""
    return sorted(n for n in os.listdir(cache) if not n.endswith('.lock'))


def test_downloads_once_with_progress(server, cache, capfd):
    base, small, digest = server
    url = f'{base}/files/small-{digest[:8]}.pth'
    checkpoint = load_file(url)
    torch.testing.assert_close(checkpoint['state_dict'], small)
    progress = capfd.readouterr().err
    assert f'Downloading {url}' in progress and '100%' in progress
    assert cached(cache) == [f'small-{digest[:8]}.pth']

    hits = Files.hits[f'/files/small-{digest[:8]}.pth']
    load_file(url)  # from the cache: no request, no progress
    assert Files.hits[f'/files/small-{digest[:8]}.pth'] == hits
    assert 'Downloading' not in capfd.readouterr().err


def test_release_links_get_distinct_cache_names(server, cache):
    names = [cache_name(url) for url in RELEASES]
    assert len({name for name, _ in names}) == 3
    for (name, hash_prefix), url in zip(names, RELEASES):
        assert re.fullmatch(r'[0-9a-f]{20}_url[0-9a-f]{16}\.pth', name), name
        assert hash_prefix is None
    assert cache_name('https://x.org/a/resnet50-0676ba61.pth') == (
        'resnet50-0676ba61.pth', '0676ba61')
    assert cache_name('https://x.org/hvit3-v1.0.pth?token=1') == (
        'hvit3-v1.0.pth', None)

    base, small, _ = server
    url = f'{base}/f/abc123/?dl=1'  # redirected, as the authors' links are
    torch.testing.assert_close(load_file(url)['state_dict'], small)
    assert cached(cache) == [cache_name(url)[0]]


def test_a_wrong_hash_caches_nothing(server, cache):
    with pytest.raises(DownloadError, match='promises deadbeef'):
        load_file(f'{server[0]}/files/small-deadbeef.pth')
    assert cached(cache) == []


def test_a_dropped_connection_caches_nothing(server, cache):
    url = f'{server[0]}/drop/small.pth'
    with pytest.raises(DownloadError,
                       match='stopped after .*nothing was cached: run again'):
        load_file(url)
    assert cached(cache) == []


def test_an_html_page_caches_nothing(server, cache):
    with pytest.raises(DownloadError,
                       match='an HTML page.*nothing was cached'):
        load_file(f'{server[0]}/html')
    assert cached(cache) == []


def test_a_missing_file_says_so(server, cache):
    with pytest.raises(DownloadError, match='the server answered 404'):
        load_file(f'{server[0]}/files/absent.pth')


def test_offline_names_the_url_and_the_option(cache):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/f/abc/?dl=1'
    with pytest.raises(DownloadError) as info:
        load_file(url)
    message = str(info.value)
    assert url in message
    assert '--cfg-options model.backbone.init_cfg.checkpoint=PATH' in message
    assert str(cache / cache_name(url)[0]) in message
    assert cached(cache) == []


def test_concurrent_requests_download_once(server, cache):
    url = f'{server[0]}/slow/small.pth'
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(
            download(url, progress=False))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1 and Files.hits['/slow/small.pth'] == 1


def test_mmengine_and_the_tools_take_urls(server, cache):
    base, small, _ = server
    url = f'{base}/files/small.pth'
    check_checkpoint(url, 'checkpoint')  # tools/test.py, --resume
    loader = CheckpointLoader._get_checkpoint_loader(url)
    assert loader.__module__ == 'mmvit3.checkpoint'
    model = torch.nn.Linear(3, 2)
    checkpoint = _load_checkpoint(url, map_location='cpu')  # load_from
    model.load_state_dict(checkpoint['state_dict'])
    torch.testing.assert_close(model.state_dict(), small)
    with pytest.raises(FileNotFoundError, match='no such file'):
        check_checkpoint(str(cache / 'absent.pth'), '--resume')


def test_pretrained_backbone_and_timm_by_url(server):
    from mmdet.registry import MODELS
    url = f'{server[0]}/files/hvit3_tiny.pth'
    backbone = MODELS.build(dict(type='HViT3', arch='tiny',
                                 init_cfg=dict(type='Pretrained',
                                               checkpoint=url)))
    backbone.init_weights()
    weights = load_file(url)['model']
    key = 'layers.2.blocks.0.attn.w1'
    assert torch.equal(backbone.state_dict()[key], weights[key])

    import timm
    model = timm.create_model('hvit3_tiny', pretrained=True,
                              pretrained_cfg_overlay=dict(url=url))
    assert torch.equal(model.state_dict()[key], weights[key])
