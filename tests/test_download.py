"""The official weights by name (common.weights_file, common.download), with no network: a server
on 127.0.0.1 inside the test plays the weights host, NANOLLAMAGEN_WEIGHTS_URL points at it, and
torch's hub cache is a temporary folder."""
import argparse
import hashlib
import http.server
import io
import os
import threading

import pytest
import torch

import common
from common import UserError

# a tiny GPT's weights in the official key names, recorded from the official gpt.py
STATE = common.load_checkpoint(os.path.join(os.path.dirname(__file__), "data",
                                            "official_gpt_tiny.pt"))["mha"]["state_dict"]


class Host(http.server.BaseHTTPRequestHandler):
    files, requests, cut, etag = {}, [], False, None

    def do_GET(self):
        Host.requests.append(self.path)
        body = Host.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if Host.etag:
            self.send_header("X-Linked-ETag", f'"{Host.etag}"')
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if Host.cut else body)  # cut: the connection drops

    def log_message(self, *args):
        pass


@pytest.fixture
def host(tmp_path, monkeypatch):
    buf = io.BytesIO()  # the official trainer's layout: {"model": state dict, "args": ...}
    torch.save({"model": STATE, "args": argparse.Namespace(gpt_model="GPT-B")}, buf)
    Host.files = {"c2i_B_256.pt": buf.getvalue()}
    Host.requests, Host.cut, Host.etag = [], False, None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Host)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NANOLLAMAGEN_WEIGHTS_URL", f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no file of an official name here
    yield tmp_path / "hub" / "checkpoints"
    server.shutdown()


def test_fetched_by_name_once_then_read_from_the_cache(host):
    path = common.weights_file("c2i_B_256.pt")
    assert path == str(host / "c2i_B_256.pt") and Host.requests == ["/c2i_B_256.pt"]
    got = common.unwrap_state_dict(common.load_checkpoint(path))
    assert got.keys() == STATE.keys() and all(torch.equal(got[k], v) for k, v in STATE.items())
    assert common.weights_file("c2i_B_256.pt") == path and len(Host.requests) == 1


def test_a_dropped_connection_leaves_no_file_under_the_final_name(host):
    Host.cut = True
    with pytest.raises(UserError, match=r"c2i_B_256\.pt .*cut short.*by hand to"):
        common.weights_file("c2i_B_256.pt")
    assert not host.exists() or os.listdir(host) == []


def test_a_wrong_checksum_is_refused(host):
    Host.etag = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(UserError, match=r"SHA-256 .* is not the published"):
        common.weights_file("c2i_B_256.pt")
    assert not host.exists() or os.listdir(host) == []
    Host.etag = hashlib.sha256(Host.files["c2i_B_256.pt"]).hexdigest()  # the stated one: kept
    assert os.path.isfile(common.weights_file("c2i_B_256.pt"))


def test_a_file_on_disk_wins_over_the_name(host):
    with open("c2i_B_256.pt", "wb") as f:
        f.write(b"mine")
    assert common.weights_file("c2i_B_256.pt") == "c2i_B_256.pt" and Host.requests == []
    assert common.weights_file("not_official.pt") == "not_official.pt" and Host.requests == []


def test_offline_names_the_file_the_url_and_where_to_put_it(host, monkeypatch):
    monkeypatch.setenv("NANOLLAMAGEN_WEIGHTS_URL", "http://127.0.0.1:9/")  # nothing listens
    with pytest.raises(UserError) as e:
        common.weights_file("vq_ds16_c2i.pt")
    line = str(e.value)
    assert "http://127.0.0.1:9/vq_ds16_c2i.pt" in line and str(host / "vq_ds16_c2i.pt") in line
    assert "\n" not in line
