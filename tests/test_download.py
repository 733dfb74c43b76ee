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
import sample
import t2i
from common import UserError
from conftest import run_cli
from model import GPT, GPTConfig, gpt_config

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
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
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


# ------------------------------------------------------------- the command lines, by name
def official_vq_file():
    """tests/data/official_vq_tiny.pt (recorded from the official vq_model.py) in the layout of the
    released vq_ds16_c2i.pt: fp32 weights under "model"."""
    fx = torch.load(os.path.join(os.path.dirname(__file__), "data", "official_vq_tiny.pt"),
                    weights_only=True)
    sd = {k: v.float() for k, v in fx["state_dict"].items()}
    sd["quantize.codebook_used"] = torch.zeros(65536)
    buf = io.BytesIO()
    torch.save({"model": sd}, buf)
    return sd, buf.getvalue()


def test_sample_fetches_the_official_pair_by_name_once(host, capsys):
    """sample.py --gpt-ckpt c2i_B_256.pt --vq-ckpt vq_ds16_c2i.pt: both fetched on the first run,
    loaded with the served weights, read from the cache on the next run (no request). The GPT is
    one whose shapes tell its config (64-wide heads), in the official trainer's layout."""
    vq_sd, Host.files["vq_ds16_c2i.pt"] = official_vq_file()
    torch.manual_seed(0)
    gpt_sd = GPT(gpt_config("nano", n_layer=2, dim=64, n_head=1, vocab_size=64, block_size=16,
                            num_classes=10)).state_dict()
    buf = io.BytesIO()
    torch.save({"model": gpt_sd, "args": argparse.Namespace(gpt_model="GPT-B")}, buf)
    Host.files["c2i_B_256.pt"] = buf.getvalue()
    argv = ["--gpt-ckpt", "c2i_B_256.pt", "--vq-ckpt", "vq_ds16_c2i.pt", "--image-size", "8",
            "--class", "1", "--per-class", "1", "--out", "x.png"]  # the tiny GPT's 4x4 codes
    code, _, err = run_cli(sample.main, argv, capsys)
    assert code == 0, err
    assert Host.requests == ["/vq_ds16_c2i.pt", "/c2i_B_256.pt"]
    assert sorted(os.listdir(host)) == ["c2i_B_256.pt", "vq_ds16_c2i.pt"]
    gpt, vq, gpt_path, vq_path = sample.load_models("c2i_B_256.pt", "vq_ds16_c2i.pt", 8)
    assert (gpt_path, vq_path) == (str(host / "c2i_B_256.pt"), str(host / "vq_ds16_c2i.pt"))
    for model, sd in ((gpt, gpt_sd), (vq, vq_sd)):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    picture = open("x.png", "rb").read()
    code, _, err = run_cli(sample.main, argv + ["--overwrite"], capsys)
    assert code == 0 and len(Host.requests) == 2 and open("x.png", "rb").read() == picture


def test_init_from_takes_an_official_name(host):
    """train.py --init-from c2i_B_256.pt: t2i.init_from reads the fetched file."""
    config = common.load_checkpoint(os.path.join(os.path.dirname(__file__), "data",
                                                 "official_gpt_tiny.pt"))["mha"]["config"]
    model = GPT(GPTConfig(**config))
    t2i.init_from(model, {}, "c2i_B_256.pt", None, "GPT-B")
    assert Host.requests == ["/c2i_B_256.pt"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in STATE.items())


@pytest.mark.parametrize("argv, command", [
    (["--class", "207"], "python sample.py --gpt-ckpt c2i_B_256.pt --vq-ckpt vq_ds16_c2i.pt "
     "--class 207"),
    (["--prompt", "a red circle"], "python sample.py --gpt-ckpt t2i_XL_stage1_256.pt --vq-ckpt "
     "vq_ds16_t2i.pt --t5 flan-t5-xl")])
def test_no_models_names_the_command_that_fetches_them(host, capsys, argv, command):
    """No demo models and no flags: one line with the command that fetches the official pair and
    its size; nothing is downloaded unasked."""
    code, _, err = run_cli(sample.main, argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and command in err and " GB" in err, err
    assert Host.requests == [] and not host.exists()
