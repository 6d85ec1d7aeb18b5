"""Images from requests are untrusted: what is fetched, from where, how much, and how many pixels."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from herd.serving.media import MediaPolicy, decode_image, load_request_image
from herd.serving.protocol import APIError
from tests.conftest import SHARED_DATA

PHOTO = SHARED_DATA / "images" / "chelsea.png"


def png_bytes(width=8, height=6, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def refused(url, policy, match):
    with pytest.raises(APIError, match=match) as caught:
        load_request_image(url, policy, param="messages[0].content[1].image_url")
    assert caught.value.status == 400 and caught.value.param == "messages[0].content[1].image_url"


@contextlib.contextmanager
def image_host(routes):
    """An http server on loopback answering path -> (status, headers, body, delay_s)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, headers, body, delay = routes[self.path]
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            time.sleep(delay)
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_data_url_decodes_to_the_same_pixels():
    data = png_bytes()
    image = load_request_image(data_url(data), MediaPolicy())
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))


def test_bad_data_urls():
    refused("data:image/png," + "abc", MediaPolicy(), "base64")
    refused("data:image/png;base64,@@@not base64@@@", MediaPolicy(), "valid base64")
    refused(data_url(b"not an image at all"), MediaPolicy(), "not an image")
    refused(data_url(png_bytes(64, 64)), MediaPolicy(max_bytes=100), "over the limit of 100 bytes")


def test_local_paths_and_file_urls_are_refused_unless_allowed(tmp_path):
    inside = tmp_path / "media" / "cat.png"
    inside.parent.mkdir()
    inside.write_bytes(png_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    for url in (str(PHOTO), f"file://{PHOTO}", str(inside), f"file://{inside}"):
        refused(url, MediaPolicy(), "local files are not accepted")
    allowed = MediaPolicy(allowed_local_path=inside.parent)
    assert load_request_image(str(inside), allowed).size == (8, 6)
    assert load_request_image(f"file://{inside}", allowed).size == (8, 6)
    refused(str(outside), allowed, "not a file under the allowed media folder")
    refused(str(inside.parent / ".." / "secret.png"), allowed, "not a file under the allowed media folder")
    refused("ftp://example.com/cat.png", allowed, "ftp: URLs are not accepted")


def test_http_fetch_limits():
    small, big = png_bytes(), png_bytes(256, 256)
    routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, small, 0),
        "/big.png": (200, {"Content-Length": str(len(big))}, big, 0),
        "/big-chunked.png": (200, {}, big, 0),
        "/slow.png": (200, {}, small, 2.0),
        "/missing.png": (404, {}, b"", 0),
        "/to-file": (302, {"Location": f"file://{PHOTO}"}, b"", 0),
        "/to-ftp": (302, {"Location": "ftp://127.0.0.1/cat.png"}, b"", 0),
    }
    with image_host(routes) as host:
        assert load_request_image(f"{host}/ok.png", MediaPolicy()).size == (8, 6)
        policy = MediaPolicy(max_bytes=len(small) + 10, timeout_s=0.5)
        refused(f"{host}/big.png", policy, "over the limit")
        refused(f"{host}/big-chunked.png", policy, "over the limit")
        refused(f"{host}/slow.png", policy, "could not fetch|took over")
        refused(f"{host}/missing.png", policy, "could not fetch")
        refused(f"{host}/to-file", policy, "could not fetch.*not allowed")
        refused(f"{host}/to-ftp", policy, "could not fetch.*non-http")
        refused(f"{host}/ok.png", MediaPolicy(allow_remote=False), "remote images are switched off")


def test_pixel_limit_is_checked_before_decoding():
    # A PNG declaring 5000x5000 pixels, cut off after its header: decoding it would fail with a broken-data
    # error; the pixel limit refuses it from the header alone.
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    header_only = buffer.getvalue()[:64]
    with pytest.raises(APIError, match="5000x5000 pixels, over the limit"):
        decode_image(header_only, MediaPolicy(max_pixels=4096 * 4096))
    assert decode_image(png_bytes(), MediaPolicy(max_pixels=48)).size == (8, 6)
    with pytest.raises(APIError, match="over the limit of 47 pixels"):
        decode_image(png_bytes(), MediaPolicy(max_pixels=47))


def test_a_real_photo_round_trips():
    image = load_request_image(data_url(PHOTO.read_bytes()), MediaPolicy())
    assert image.size == Image.open(PHOTO).size
