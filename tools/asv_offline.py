"""Make a published asv dashboard render without network access.

asv's index.html loads jQuery, flot, bootstrap and three small plugins from
CDNs, so the published pages show nothing on an offline machine. This script
fetches the same versions once from the npm registry (``npm pack``, checked
against the pinned tarball hashes below), keeps the tarballs in a cache
directory, copies the files next to the published pages and rewrites the
page's ``<script>``/``<link>`` tags to those local copies.

    python tools/asv_offline.py .asv/html [--cache .asv/vendor]

It fails, naming the URL, when the page references an external resource it
does not know: an asv upgrade that changes its CDN list must update
``VENDOR`` rather than silently publish a page that needs the network.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile

# CDN URL in asv 0.6's index.html -> (npm package, tarball integrity, file in
# the tarball). stupidtable 1.0.1 was never published to npm; 1.1.3 is the
# same plugin with the same ``$.fn.stupidtable`` API.
_JQUERY = ("jquery@3.3.1", "sha512-Ubldcmxp5np52/ENotGxlLe6aGMvmF4R8S6tZjsP6Knsaxd/xp3Zrh50cG93lR6nPXyUFwzN3ZSOQI0wRJNdGg==")
_FLOT = ("flot@0.8.3", "sha512-xg2otcTJDvS+ERK+my4wxG/ASq90QURXtoM4LhacCq0jQW2jbyjdttbRNqU2cPykrpMvJ6b2uSp6SAgYAzj9tQ==")
_ORDERBARS = ("flot-orderbars@1.0.0", "sha512-Jv51fvzevUjNXEeozpwEKfPjhiZhfiJddv0WHjduUTCmSF+7T5K7C9c9Y1wIVmUhDBv5fLMjgbwKecT0GIKPZA==")
_STUPIDTABLE = ("stupid-table-plugin@1.1.3", "sha512-2Vk7XouQPxUQPRe9w0Fu7ZZ8kHLK7rDoLMsCgtKxRNJ7f4dSOGvW9CkHsq5wD6QsaEnWoyLBYH3xOEsrK3yWBg==")
_MD5 = ("blueimp-md5@2.19.0", "sha512-DRQrD6gJyy8FbiE4s+bDoXS9hiW3Vbx5uCdwvcCf3zLHL+Iv7LtGHLpr+GZV8rHG8tK766FGYBwRbu8pELTt+w==")
_BOOTSTRAP = ("bootstrap@3.1.1", "sha512-TAzqS8E/ISpVHP29gYhy+1NSV+FJwApDVQhDfgLYsIuUDJiqJzH2DfORN5tiu+Ie2iBLrzEG34t4Rf465cigqg==")

_CDNJS_FLOT = "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/"
VENDOR = {
    "https://code.jquery.com/jquery-3.3.1.min.js": (*_JQUERY, "dist/jquery.min.js"),
    _CDNJS_FLOT + "jquery.flot.min.js": (*_FLOT, "jquery.flot.js"),
    _CDNJS_FLOT + "jquery.flot.time.min.js": (*_FLOT, "jquery.flot.time.js"),
    _CDNJS_FLOT + "jquery.flot.selection.min.js": (*_FLOT, "jquery.flot.selection.js"),
    _CDNJS_FLOT + "jquery.flot.categories.min.js": (*_FLOT, "jquery.flot.categories.js"),
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js": (
        *_ORDERBARS, "js/jquery.flot.orderBars.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": (
        *_STUPIDTABLE, "stupidtable.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": (*_MD5, "js/md5.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js": (
        *_BOOTSTRAP, "dist/js/bootstrap.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css": (
        *_BOOTSTRAP, "dist/css/bootstrap.min.css"),
}
# Files the stylesheet loads by relative URL (../fonts/ from css/).
EXTRA_FILES = [
    (*_BOOTSTRAP, f"dist/fonts/glyphicons-halflings-regular.{ext}") for ext in ("eot", "svg", "ttf", "woff")
]

_TAG = re.compile(r"<(script|link)\b[^>]*>", re.IGNORECASE)
_URL_ATTR = re.compile(r"""\b(src|href)=(["'])(https?://[^"']+)\2""", re.IGNORECASE)
# Subresource-integrity and CORS attributes only make sense for the CDN
# copies; on file:// a crossorigin request is refused outright.
_DROP_ATTRS = re.compile(r"""\s+(integrity|crossorigin|referrerpolicy)=(["'])[^"']*\2""", re.IGNORECASE)


def local_path(spec: str, member: str) -> str:
    """Where a vendored file lands, relative to the html directory."""
    name, version = spec.rsplit("@", 1)
    return f"vendor/{name}-{version}/{member}"


def _tarball_name(spec: str) -> str:
    name, version = spec.rsplit("@", 1)
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def _integrity(path: str) -> str:
    with open(path, "rb") as f:
        digest = hashlib.sha512(f.read()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def fetch(spec: str, integrity: str, cache: str) -> str:
    """The npm tarball of ``spec`` in ``cache``, packed once and hash-checked."""
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, _tarball_name(spec))
    if not os.path.exists(path):
        if shutil.which("npm") is None:
            raise SystemExit(f"npm is needed once to fetch {spec} into {cache}")
        subprocess.run(["npm", "pack", "--silent", spec], cwd=cache, check=True, stdout=subprocess.DEVNULL)
    got = _integrity(path)
    if got != integrity:
        os.remove(path)
        raise SystemExit(f"{spec}: tarball integrity {got} does not match the pinned {integrity}")
    return path


def _extract(tarball: str, member: str) -> bytes:
    with tarfile.open(tarball, "r:gz") as tar:
        f = tar.extractfile(f"package/{member}")
        if f is None:
            raise SystemExit(f"{tarball} has no file {member}")
        return f.read()


def install_vendor(html_dir: str, cache: str) -> None:
    """Copy every vendored file into ``html_dir/vendor``."""
    for spec, integrity, member in list(VENDOR.values()) + EXTRA_FILES:
        data = _extract(fetch(spec, integrity, cache), member)
        dest = os.path.join(html_dir, local_path(spec, member))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(data)


def rewrite(html: str) -> str:
    """``html`` with every known CDN URL in script/link tags made local."""

    def tag(m: re.Match) -> str:
        text = m.group(0)
        url = _URL_ATTR.search(text)
        if url is None:
            return text
        if url.group(3) not in VENDOR:
            raise SystemExit(f"unknown external resource in asv's page: {url.group(3)}; add it to VENDOR")
        spec, _, member = VENDOR[url.group(3)]
        text = text.replace(url.group(0), f"{url.group(1)}={url.group(2)}{local_path(spec, member)}{url.group(2)}")
        return _DROP_ATTRS.sub("", text)

    return _TAG.sub(tag, html)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html_dir", help="the directory `asv publish` wrote (html_dir in asv.conf.json)")
    p.add_argument("--cache", default=None, help="where npm tarballs are kept (default: <html_dir>/../vendor)")
    args = p.parse_args(argv)
    index = os.path.join(args.html_dir, "index.html")
    if not os.path.isfile(index):
        raise SystemExit(f"{index} not found: run `asv publish` first")
    cache = args.cache or os.path.join(os.path.dirname(os.path.abspath(args.html_dir)), "vendor")
    install_vendor(args.html_dir, cache)
    with open(index, encoding="utf-8") as f:
        html = f.read()
    with open(index, "w", encoding="utf-8") as f:
        f.write(rewrite(html))
    print(f"{index}: {len(VENDOR)} CDN resources replaced by local copies under {args.html_dir}/vendor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
