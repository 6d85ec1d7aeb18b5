"""Images from requests: untrusted input, fetched and decoded under limits.

Only `data:` URLs and http(s) URLs are taken (http(s) unless the operator switched remote media
off); a local path or `file://` URL only inside the folder the operator allowed. Fetches stop at a
size and a time limit and never follow a redirect away from http(s); decoding stops before
reading the pixels when the header declares more than `max_pixels` (decompression bombs). The
library's `load_image` (which accepts any path) only ever sees the decoded PIL image.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import PIL.Image

from ..image_utils import load_image
from .protocol import APIError

MB = 1 << 20


@dataclass
class MediaPolicy:
    allow_remote: bool = True
    allowed_local_path: Path | None = None
    max_bytes: int = 20 * MB
    timeout_s: float = 10.0
    # 8192 x 4096: far above what Mllama / Llama 4 tile (they resize to a few 336-560 pixel tiles)
    max_pixels: int = 8192 * 4096


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_image")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (at most 5) only to other http(s) URLs."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlparse(newurl).scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirected to a non-http(s) URL ({urlparse(newurl).scheme}:)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "herd-serve"})
    deadline = time.monotonic() + policy.timeout_s
    try:
        with opener.open(request, timeout=policy.timeout_s) as reply:
            declared = reply.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise _refuse(param, f"the image at {url} is {int(declared)} bytes, over the limit of "
                                     f"{policy.max_bytes} bytes")
            chunks, size = [], 0
            while True:
                chunk = reply.read(64 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                if size > policy.max_bytes:
                    raise _refuse(param, f"the image at {url} is over the limit of {policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise _refuse(param, f"fetching {url} took over {policy.timeout_s:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except APIError:
        raise
    except (OSError, ValueError) as error:  # URLError, HTTPError, timeouts
        raise _refuse(param, f"could not fetch the image at {url}: {error}") from None


def _data_url(url: str, policy: MediaPolicy, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise _refuse(param, "a data: URL must be data:image/<type>;base64,<data>")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise _refuse(param, f"the image is over the limit of {policy.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(param, "the data: URL does not hold valid base64") from None


def _local_file(url: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.allowed_local_path is None:
        raise _refuse(param, "local files are not accepted; send the image as a data: URL or an http(s) URL "
                             "(the operator can allow a folder with --allowed-local-media-path)")
    raw = unquote(urlparse(url).path) if url.startswith("file://") else url
    root = Path(policy.allowed_local_path).resolve()
    path = Path(raw).expanduser().resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise _refuse(param, f"{raw} is not a file under the allowed media folder {root}")
    if path.stat().st_size > policy.max_bytes:
        raise _refuse(param, f"{raw} is over the limit of {policy.max_bytes} bytes")
    return path.read_bytes()


def image_bytes(url: str, policy: MediaPolicy, param: str = "messages") -> bytes:
    """The bytes an image_url names, under the policy (blocking: call it from a worker thread)."""
    scheme = urlparse(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
    if scheme == "data":
        return _data_url(url, policy, param)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise _refuse(param, "remote images are switched off on this server (--no-remote-media); send a "
                                 "data: URL")
        return _fetch(url, policy, param)
    if scheme in ("file", ""):
        return _local_file(url, policy, param)
    raise _refuse(param, f"{scheme}: URLs are not accepted; send an http(s) or a data: URL")


def decode_image(data: bytes, policy: MediaPolicy, param: str = "messages") -> PIL.Image.Image:
    """An RGB image from untrusted bytes; the pixel count is checked from the header, before decoding."""
    try:
        image = PIL.Image.open(io.BytesIO(data))  # reads the header only
    except PIL.Image.DecompressionBombError as error:
        raise _refuse(param, f"the image is too large: {error}") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError) as error:
        raise _refuse(param, f"not an image PIL can read ({type(error).__name__})") from None
    width, height = image.size
    if width * height > policy.max_pixels:
        raise _refuse(param, f"the image is {width}x{height} pixels, over the limit of {policy.max_pixels} pixels")
    try:
        image.load()
        return load_image(image)  # EXIF orientation and RGB, as the library loads images
    except PIL.Image.DecompressionBombError as error:
        raise _refuse(param, f"the image is too large: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise _refuse(param, f"the image data is broken ({type(error).__name__}: {error})") from None


def load_request_image(url: str, policy: MediaPolicy, param: str = "messages") -> PIL.Image.Image:
    return decode_image(image_bytes(url, policy, param), policy, param)
